"""Training curves and confusion-matrix pictures: real PNGs, written atomically."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cnnjax import plots

NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]


def synthetic_lines(epochs: int = 6) -> list[dict]:
    lines = [
        {
            "epoch": e,
            "step": 100 * e,
            "train_loss": 1.5 / e,
            "train_accuracy": 1 - 0.5 / e,
            "eval_loss": 1.6 / e + 0.05,
            "eval_accuracy": 1 - 0.55 / e,
            "learning_rate": 0.1,
        }
        for e in range(1, epochs + 1)
    ]
    lines[-1].update(test_loss=0.4, test_accuracy=0.88)
    return lines


def assert_png(path, min_size=(400, 300)):
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width >= min_size[0] and img.height >= min_size[1], img.size
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 5  # something was drawn


def only_file(directory):
    """The directory holds exactly one entry (no temporary files left behind)."""
    entries = sorted(p.name for p in directory.iterdir())
    assert len(entries) == 1, entries
    return directory / entries[0]


def test_curves_png(tmp_path):
    path = plots.plot_curves(synthetic_lines(), tmp_path / "curves.png")
    assert path == tmp_path / "curves.png" and only_file(tmp_path) == path
    assert_png(path, (800, 300))  # two panels side by side
    with Image.open(path) as img:
        assert img.width > img.height


def test_curves_tolerate_partial_lines_and_refresh_in_place(tmp_path):
    lines = [{"epoch": 2, "train_loss": 0.5, "train_accuracy": 0.8}, {"epoch": 1, "train_loss": 1}]
    path = plots.plot_curves(lines, tmp_path / "curves.png")  # no validation yet, unsorted
    first = path.read_bytes()
    plots.plot_curves(synthetic_lines(2), path)  # the next epoch replaces the picture
    assert path.read_bytes() != first and only_file(tmp_path) == path
    assert_png(path)
    with pytest.raises(ValueError, match="epoch"):
        plots.plot_curves([], tmp_path / "empty.png")


@pytest.mark.parametrize("normalize", [True, False])
def test_confusion_matrix_png(tmp_path, normalize):
    rng = np.random.default_rng(0)
    confusion = rng.integers(0, 10, (5, 5)) + 50 * np.eye(5, dtype=int)
    path = plots.plot_confusion_matrix(
        confusion.tolist(), NAMES, tmp_path / "confusion_matrix.png", normalize=normalize
    )
    assert only_file(tmp_path) == path
    assert_png(path, (500, 450))


def test_confusion_matrix_many_classes_and_bad_shapes(tmp_path):
    confusion = np.eye(100, dtype=int) * 3  # too many for cell values and tick labels
    names = [f"class {i}" for i in range(100)]
    assert_png(plots.plot_confusion_matrix(confusion, names, tmp_path / "big.png"))
    with pytest.raises(ValueError, match=r"\(5, 5\)"):
        plots.plot_confusion_matrix(np.zeros((4, 4)), NAMES, tmp_path / "bad.png")


def test_a_failed_write_keeps_the_old_picture_and_no_temp_file(tmp_path, monkeypatch):
    path = plots.plot_curves(synthetic_lines(), tmp_path / "curves.png")
    before = path.read_bytes()

    def crash(self, f, **kwargs):
        f.write(b"half a png")
        raise OSError("disk full")

    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", crash)
    with pytest.raises(OSError, match="disk full"):
        plots.plot_curves(synthetic_lines(3), path)
    with pytest.raises(OSError, match="disk full"):
        plots.plot_confusion_matrix(np.eye(5), NAMES, tmp_path / "confusion_matrix.png")
    assert only_file(tmp_path) == path and path.read_bytes() == before


def test_import_is_free_and_drawing_leaves_pyplot_alone(tmp_path):
    """No matplotlib at import; drawing never imports pyplot (a notebook's backend stays)."""
    code = (
        "import sys\n"
        "from cnnjax import plots\n"
        "assert 'matplotlib' not in sys.modules\n"
        f"plots.plot_curves([{{'epoch': 1, 'train_loss': 1.0}}], {str(tmp_path / 'c.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_png(tmp_path / "c.png")


def test_training_loss_legend_names_its_targets(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(plots, "save_atomic", lambda fig, path, dpi=100: figures.append(fig))
    plots.plot_curves(synthetic_lines(), tmp_path / "c.png", train_targets="label smoothing 0.1")
    legend = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert legend == ["Training loss (label smoothing 0.1)", "Validation loss"]


def test_train_targets_describe_smoothing_and_mixing():
    from cnnjax import configs
    from cnnjax.train import setup as setup_lib

    config = configs.get("default")
    assert setup_lib.train_targets(config.label_smoothing, config.augment) == "label smoothing 0.1"
    assert setup_lib.train_targets(0.0, "crop(pad=2),mixup(alpha=0.2)") == "mixup"
    assert setup_lib.train_targets(0.0, "") == ""
