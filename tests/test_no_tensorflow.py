"""Training, evaluating and predicting need no TensorFlow once a TFDS dataset is prepared
(resident: the decoded splits come from the array cache, ``tfds_source.load_arrays``; streamed:
Grain reads the ArrayRecord files through TFDS's data source), nor on a folder of images, so
TensorFlow never starts and never touches an accelerator's memory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnjax import parallel
from cnnjax.train import setup as setup_lib

ROOT = Path(__file__).resolve().parents[1]

# Every import finder wrapped so that it does not find TensorFlow: to ``import`` and to
# ``importlib.util.find_spec`` alike, TensorFlow looks not installed. (``sys.modules["tensorflow"]
# = None`` is not that: TFDS takes the key's presence for an imported TensorFlow.)
BLOCK = """
import sys

class Hide:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, attr):
        return getattr(self.finder, attr)

sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
"""
NO_TENSORFLOW = (
    BLOCK
    + """
import json
from cnnjax import configs
from cnnjax.tools import evaluate, predict
from cnnjax.train import loop
runs = json.loads(sys.argv[2])  # workdir -> the config's overrides of tiny
for workdir, overrides in runs.items():
    config = configs.get("tiny")
    config.data.data_dir = sys.argv[1]
    config.num_epochs = 1
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    loop.train_and_evaluate(config, workdir)
    assert evaluate.evaluate_run(workdir)["test_accuracy"] > 0.2
    images = evaluate.trained.load_run(workdir).image_shape
    zeros = __import__("numpy").zeros((2, *images), "uint8")
    assert predict.load_predictor(workdir).predict(zeros).shape[0] == 2
    print("trained, evaluated, predicted:", workdir)
assert "tensorflow" not in sys.modules, "imported"
"""
)


def image_folder(root: Path, per_class: int = 40) -> Path:
    """A folder of 3 classes of 16 px PNG images (a bright square at a class's corner)."""
    rng = np.random.default_rng(0)
    for label, (y, x) in enumerate([(0, 0), (0, 8), (8, 0)]):
        (root / f"class{label}").mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 60, (16, 16), np.uint8)
            image[y : y + 8, x : x + 8] += 150
            Image.fromarray(image).save(root / f"class{label}" / f"{i}.png")
    return root


@pytest.mark.slow
def test_training_evaluating_and_predicting_with_tensorflow_unimportable(tiny_config, tmp_path):
    """One process (one start-up) trains, evaluates and predicts three runs: resident, streamed
    and on a folder of images."""
    setup_lib.open_data(tiny_config, parallel.make_mesh())  # prepares the dataset and its cache
    runs = {
        str(tmp_path / "resident"): {},
        str(tmp_path / "streamed"): {"data.in_memory": "no"},
        str(tmp_path / "folder"): {
            "dataset": f"folder:{image_folder(tmp_path / 'images')}",
            "data.limit_examples": 0,
            "batch_size": 16,
            "data.eval_batch_size": 8,
        },
    }
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", NO_TENSORFLOW, tiny_config.data.data_dir, json.dumps(runs)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.count("trained, evaluated, predicted:") == 3


def test_the_shim_does_block_tensorflow():
    """The hook above is a real block: with it, importing TensorFlow fails."""
    code = BLOCK + "import importlib.util\nassert importlib.util.find_spec('tensorflow') is None\n"
    code += "import tensorflow.python"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1 and "No module named 'tensorflow'" in out.stderr
