"""Every command-line tool given bad input, as a user runs it: each case is a fresh
``python -m cnnjax.X`` process that must exit non-zero (2 for a user error, 1 for predict's
unreadable files) with exactly one ``error:`` line naming the problem and no traceback. The
cases that touch a trained run leave every byte of it as it was.

Most cases fail before any data is read, so they need neither the dataset nor the trained run.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cnnjax

pytestmark = pytest.mark.slow  # ~40 processes of 3-5 s each

REPO = Path(cnnjax.__file__).resolve().parents[1]  # the cnnjax under test, not an installed one


def run_tool(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "XLA_FLAGS": "",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("CNNJAX_TRACEBACK", None)
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def digest(directory: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``directory``."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Bad (and one good) input files: a regular file, a non-image, an empty file, a config
    file that raises, a 28x28 PNG."""
    from PIL import Image

    d = tmp_path_factory.mktemp("inputs")
    (d / "afile").write_text("not a directory")
    (d / "bad.png").write_text("not a png")
    (d / "empty.png").write_bytes(b"")
    (d / "raising.py").write_text("def get_config():\n    raise RuntimeError('boom')\n")
    Image.fromarray(np.full((28, 28), 128, np.uint8)).save(d / "good.png")
    # Image folders that are not datasets (--config.dataset=folder:PATH)
    for image in (
        "one_class/cat/1.png",
        "empty_class/cat/1.png",
        "not_image/cat/1.png",
        "not_image/dog/2.png",
    ):
        (d / image).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 9, np.uint8)).save(d / image)
    (d / "empty_class" / "dog").mkdir()
    (d / "not_image" / "dog" / "notes.txt").write_text("not an image")
    (d / "no_classes").mkdir()
    return d


@pytest.fixture(scope="module")
def trained(fmnist_data_dir, tmp_path_factory):
    """A one-epoch ``tiny`` run and the digest of its files, taken before any case runs."""
    from cnnjax import configs
    from cnnjax.train import loop

    config = configs.get("tiny")
    config.num_epochs = 1
    config.data.data_dir = fmnist_data_dir
    workdir = tmp_path_factory.mktemp("battery") / "run"
    loop.train_and_evaluate(config, workdir)
    return workdir, digest(workdir)


def _truncate(root: Path, pattern: str) -> None:
    for f in root.glob(pattern):
        if f.is_file():
            f.write_bytes(b"")


def _five_classes(root: Path) -> None:
    info = json.loads((root / "dataset.json").read_text())
    info["num_classes"], info["class_names"] = 5, info["class_names"][:5]
    (root / "dataset.json").write_text(json.dumps(info))


# A copy of the trained run, damaged one way (the original is never touched).
DAMAGE = {
    "empty_checkpoint_files": lambda r: _truncate(r, "checkpoints/**/*"),
    "empty_state_files": lambda r: _truncate(r, "checkpoints/*/state/**/*"),
    "empty_config_json": lambda r: (r / "config.json").write_text("{}"),
    "truncated_config_json": lambda r: (r / "config.json").write_text('{"mod'),
    "five_classes": _five_classes,
}

T = "--config=tiny"
SMALL = ["--model=lenet5", "--input-shape=32,32,1"]

# (id, module, args, exit status, fragment of the error line). In args, {in} is the inputs
# folder, {run} the trained run, {copy} its damaged copy (the id names the damage), {data} the
# TFDS data_dir and {new} a fresh workdir path.
CASES = [
    # train: config values, checked before any data is read
    ("epochs_negative", "train", [T, "--config.num_epochs=-1"], 2,
     "--config.num_epochs=-1 must be an integer >= 1"),
    ("lr_nan", "train", [T, "--config.learning_rate=nan"], 2, "must be a finite number > 0"),
    ("dtype", "train", [T, "--config.dtype=float64"], 2, "one of float32, bfloat16, float16"),
    ("best_metric", "train", [T, "--config.checkpointing.best_metric=accuracy"], 2,
     "best_metric=accuracy must be one of eval_accuracy"),
    ("freeze_regex", "train", [T, "--config.freeze=("], 2, "freeze=( must be a valid regular"),
    ("warmup_too_long", "train", [T, "--config.warmup_epochs=5"], 2,
     "warmup_epochs=5.0 must be at most --config.num_epochs=2"),
    ("key_typo", "train", [T, "--config.batch_sise=3"], 2, "did you mean --config.batch_size"),
    ("wrong_type", "train", [T, "--config.num_epochs=two"], 2, "num_epochs"),
    ("model_attribute", "train", [T, "--config.model.widht=3"], 2, "has no attribute 'widht'"),
    ("config_raises", "train", ["--config={in}/raising.py"], 2, "RuntimeError: boom"),
    ("extra_argument", "train", [T, "extra"], 2, "unexpected arguments: extra"),
    # train: the workdir
    ("workdir_is_file", "train", [T, "--workdir={in}/afile"], 2, "afile is a file, not a dir"),
    ("workdir_under_file", "train", [T, "--workdir={in}/afile/w"], 2, "cannot be created"),
    ("workdir_under_proc", "train", [T, "--workdir=/proc/cnnjax/w"], 2,
     "--workdir=/proc/cnnjax/w cannot be created: /proc/cnnjax"),
    ("other_run", "train", [T, "--workdir={run}", "--config.model.name=lenet5"], 2,
     "holds a different run"),
    ("epochs_negative_on_run", "train", [T, "--workdir={run}", "--config.num_epochs=-1"], 2,
     "num_epochs=-1"),
    ("truncated_config_json", "train", [T, "--workdir={copy}"], 2, "config.json is unreadable"),
    # train: a folder of images that is not a dataset, refused before the workdir is written
    ("folder_no_path", "train", [T, "--workdir={new}", "--config.dataset=folder:"], 2,
     "the dataset folder is empty: --config.dataset=folder:PATH"),
    ("folder_missing", "train", [T, "--workdir={new}", "--config.dataset=folder:{in}/nope"], 2,
     "dataset folder {in}/nope does not exist"),
    ("folder_no_classes", "train",
     [T, "--workdir={new}", "--config.dataset=folder:{in}/no_classes"], 2,
     "no_classes has no class folders"),
    ("folder_one_class", "train", [T, "--workdir={new}", "--config.dataset=folder:{in}/one_class"],
     2, "one_class has one class folder (cat): a classifier needs two or more"),
    ("folder_empty_class", "train",
     [T, "--workdir={new}", "--config.dataset=folder:{in}/empty_class"], 2,
     "empty_class/dog: class folder without images"),
    ("folder_not_an_image", "train",
     [T, "--workdir={new}", "--config.dataset=folder:{in}/not_image"], 2,
     "not_image/dog/notes.txt: not an image file"),
    # train: after the data is read
    ("init_from_other_model", "train",
     [T, "--workdir={new}", "--config.data.data_dir={data}", "--config.init_from={run}",
      "--config.model=lenet5"], 2, "init_from: 8 parameter(s) do not match"),
    ("five_classes", "train",
     [T, "--workdir={new}", "--config.data.data_dir={data}", "--config.init_from={copy}"], 2,
     "init_from: checkpoint"),
    ("image_too_small", "train",
     [T, "--workdir={new}", "--config.data.data_dir={data}", "--config.model=vgg11"], 2,
     "images of shape (28, 28, 1) are too small for VGG"),
    # evaluate
    ("not_a_run", "evaluate", ["--workdir={in}/afile"], 2, "not a cnnjax run directory"),
    ("split", "evaluate", ["--workdir={run}", "--split=train"], 2, "--split"),
    ("no_such_step", "evaluate", ["--workdir={run}", "--step=999999"], 2,
     "no checkpoint at step 999999"),
    ("empty_checkpoint_files", "evaluate", ["--workdir={copy}"], 2, "are unreadable"),
    ("empty_config_json", "evaluate", ["--workdir={copy}"], 2, "config.json lacks model"),
    ("five_classes", "evaluate", ["--workdir={copy}"], 2,
     "holds params/head/fc/bias of shape (10,), the model (5,)"),
    # predict
    ("no_image", "predict", ["--workdir={run}"], 2, "no IMAGE given"),
    ("top_k_zero", "predict", ["--workdir={run}", "--top_k=0", "{in}/good.png"], 2,
     "--top_k must be at least 1"),
    ("not_an_image", "predict", ["--workdir={run}", "{in}/bad.png"], 1, "bad.png: not an image"),
    ("empty_image", "predict", ["--workdir={run}", "{in}/empty.png"], 1, "empty.png: not an"),
    ("missing_image", "predict", ["--workdir={run}", "{in}/nope.png"], 1, "nope.png: no such file"),
    ("empty_state_files", "predict", ["--workdir={copy}", "{in}/good.png"], 2, "is corrupt"),
    # summary
    ("unknown_model", "summary", ["--model=resnet9000"], 2, "unknown model 'resnet9000'"),
    ("no_model", "summary", [], 2, "--model"),
    ("shape_two_numbers", "summary", ["--model=lenet5", "--input-shape=32,32"], 2, "H,W,C"),
    ("shape_too_small", "summary", ["--model=lenet5", "--input-shape=4,4,1"], 2,
     "images of shape (4, 4, 1) are too small for LeNet5 (layer pool2 gets an empty input"),
    ("no_classes", "summary", [*SMALL, "--num-classes=0"], 2, "num_classes must be an integer"),
    ("batch_zero", "summary", [*SMALL, "--batch-size=0"], 2, "batch_size must be at least 1"),
    # inspect_model
    ("nothing", "inspect_model", [], 2, "nothing to inspect"),
    ("shape_letters", "inspect_model", ["--model=lenet5", "--input-shape=a,b,c"], 2, "H,W,C"),
    ("no_images", "inspect_model", [*SMALL, "--num-images=0"], 2, "--num-images must be at"),
    ("class_index", "inspect_model", [*SMALL, "--class_index=10"], 2, "must be in [0, 9]"),
    ("out_under_file", "inspect_model", [*SMALL, "--out={in}/afile/x"], 2, "cannot create"),
    ("unknown_layer", "inspect_model",
     ["--workdir={run}", "--images={in}/good.png", "--layer=nope", "--out={new}"], 2,
     "unknown layer 'nope'"),
]  # fmt: skip


@pytest.mark.parametrize(
    "module, args, status, fragment",
    [pytest.param(m, a, s, f, id=f"{m}-{i}") for i, m, a, s, f in CASES],
)
def test_bad_input_is_one_error_line(module, args, status, fragment, inputs, tmp_path, request):
    text = " ".join(args)
    places = {"in": inputs, "new": tmp_path / "new", "data": None, "run": None, "copy": None}
    if "{run}" in text or "{copy}" in text:
        run, before = request.getfixturevalue("trained")
        places["run"] = run
    if "{copy}" in text:
        places["copy"] = tmp_path / "copy"
        shutil.copytree(run, places["copy"])
        DAMAGE[request.node.callspec.id.split("-", 1)[1]](places["copy"])
    if "{data}" in text:
        places["data"] = request.getfixturevalue("fmnist_data_dir")
    result = run_tool(f"cnnjax.{module}", [a.format(**places) for a in args], cwd=tmp_path)

    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == status, result.stderr[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert fragment.format(**places) in errors[0]
    if "dataset=folder:" in text:  # refused before anything was written
        assert not places["new"].exists()
    if places["run"] is not None:  # byte-identical to the digest taken before the battery
        assert digest(run) == before


def test_every_case_id_is_unique_and_every_damage_is_used():
    ids = [f"{m}-{i}" for i, m, *_ in CASES]
    assert len(ids) == len(set(ids))
    damaged = {i for i, _, args, *_ in CASES if "{copy}" in " ".join(args)}
    assert damaged == set(DAMAGE)
