"""Training a resident dataset needs no TensorFlow once the dataset is prepared: the decoded
splits come from the array cache (``pipeline.load_arrays``), so TensorFlow never starts and never
touches an accelerator's memory at training time."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnnjax import parallel, trainer

ROOT = Path(__file__).resolve().parents[1]

# ``sys.modules[name] = None`` makes every later ``import name`` raise ImportError.
NO_TENSORFLOW = """
import sys
sys.modules["tensorflow"] = None
from cnnjax import configs, trainer
config = configs.get("tiny")
config.data.data_dir = sys.argv[1]
config.num_epochs = 1
line = trainer.train_and_evaluate(config, sys.argv[2])
assert "tensorflow" not in [m for m, v in sys.modules.items() if v is not None], "imported"
print("test_accuracy", line["test_accuracy"])
"""


@pytest.mark.slow
def test_resident_training_runs_with_tensorflow_unimportable(tiny_config, tmp_path):
    trainer.load_data(tiny_config, parallel.make_mesh())  # prepares the array cache
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", NO_TENSORFLOW, tiny_config.data.data_dir, str(tmp_path / "run")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "test_accuracy" in out.stdout


def test_the_shim_does_block_tensorflow():
    """The shim above is a real block: with it, importing TensorFlow fails."""
    code = 'import sys; sys.modules["tensorflow"] = None\nimport tensorflow'
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1 and "ImportError" in out.stderr
