"""Training a resident dataset needs no TensorFlow once the dataset is prepared: the decoded
splits come from the array cache (``tfds_source.load_arrays``), so TensorFlow never starts and never
touches an accelerator's memory at training time."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnnjax.train import parallel
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
from cnnjax import configs
from cnnjax.train import hooks, loop, resume
from cnnjax.train import setup as setup_lib
config = configs.get("tiny")
config.data.data_dir = sys.argv[1]
config.num_epochs = 1
line = loop.train_and_evaluate(config, sys.argv[2])
assert "tensorflow" not in sys.modules, "imported"
print("test_accuracy", line["test_accuracy"])
"""
)


@pytest.mark.slow
def test_resident_training_runs_with_tensorflow_unimportable(tiny_config, tmp_path):
    setup_lib.open_data(tiny_config, parallel.make_mesh())  # prepares the array cache
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", NO_TENSORFLOW, tiny_config.data.data_dir, str(tmp_path / "run")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "test_accuracy" in out.stdout


def test_the_shim_does_block_tensorflow():
    """The hook above is a real block: with it, importing TensorFlow fails."""
    code = BLOCK + "import importlib.util\nassert importlib.util.find_spec('tensorflow') is None\n"
    code += "import tensorflow.python"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1 and "No module named 'tensorflow'" in out.stderr
