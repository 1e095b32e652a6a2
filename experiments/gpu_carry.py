"""Builds ``.carry/``: what a bare, offline GPU image lacks to run cnnjax and gpu_check.sh.

The GPU image has Python 3.12 with jax (CUDA plugin), torch, torchvision, flax, optax, orbax,
chex and pytest, but no TensorFlow, TFDS, ml_collections nor tensorboardX, and no network.
``.carry/`` (git-ignored, under 64 MiB) holds:

- ``wheels/``: cnnjax itself and the pure-Python packages the training path imports that such an
  image lacks (TFDS and the parts of its dependencies it imports without TensorFlow,
  ml_collections, tensorboardX, ...), at the versions installed here, for Python 3.12 on
  x86-64 Linux. TFDS's binary dependencies it does not import on this path (pyarrow,
  array_record) stay out; ``install`` installs with ``--no-deps``.
- ``tensorflow_datasets/fashion_mnist/<version>/``: TFDS's metadata of Fashion-MNIST
  (``dataset_info.json``, ``features.json``, the label names) and cnnjax's decoded-array cache
  (``cnnjax_arrays/*.npz``) of every split the ``default`` and ``fashion_mnist_best`` presets
  read, saved compressed (31 MB instead of 55). TFDS then takes the dataset for prepared, the
  trainer reads the arrays from the cache (``tfds_source.load_arrays``) and TensorFlow is never
  needed; TFDS's own TFRecord files are left out.

    python experiments/gpu_carry.py build     # here: TensorFlow, the Debian files, pip's index
    python experiments/gpu_carry.py install   # there, offline: pip-installs the missing wheels
    python experiments/gpu_carry.py data-dir  # prints the data_dir to pass to the trainer
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".carry"
LIMIT_BYTES = 64 * 2**20  # what one device run can carry
TARGET = ("--python-version", "3.12", "--platform", "manylinux2014_x86_64")
TARGET += ("--platform", "manylinux_2_17_x86_64", "--platform", "manylinux_2_28_x86_64")
TARGET += ("--only-binary=:all:",)
# What the training, evaluation, prediction and export paths import with TensorFlow unimportable
# (traced here, then each hidden in turn: those it cannot do without), less what the GPU image
# has (jax, flax, optax, orbax and their absl-py, etils, numpy, protobuf, packaging, pillow,
# PyYAML, ...). TFDS imports h5py, pyarrow, array_record, requests and simple_parsing only when
# they are there. Installed with --no-deps, so only imports count.
CARRY_PACKAGES = (
    "tensorflow-datasets",
    "dm-tree",  # TFDS's imports on this path
    "immutabledict",
    "promise",  # an sdist only (pure Python): built into a wheel here
    "six",
    "tensorflow-metadata",
    "toml",
    "wrapt",
    "grain",  # streamed input (cnnjax.data.stream), and what it imports
    "array-record",
    "cloudpickle",
    "portpicker",
    "ml_collections",  # configs
    "tensorboardX",  # metrics
    "tqdm",  # the trainer's progress bar
    "psutil",  # the trainer's memory figures
    "matplotlib",  # curves.png, confusion_matrix.png
    "contourpy",
    "cycler",
    "fonttools",
    "kiwisolver",
    "pyparsing",
    "python-dateutil",
    "safetensors",  # the device tests' torchvision comparisons (tests/test_pretrained.py)
)
SDIST_ONLY = ("promise",)
PRESETS = ("default", "fashion_mnist_best")
DATASET = "fashion_mnist"


def wheel_name(path: Path) -> str:
    """``tensorflow_datasets-4.9.10-py3-none-any.whl`` -> ``tensorflow-datasets`` (normalised)."""
    return path.name.split("-")[0].replace("_", "-").lower()


def installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def build_wheels(out: Path) -> list[Path]:
    """cnnjax's wheel and the pinned ``CARRY_PACKAGES`` for the GPU image's Python."""
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(out), str(ROOT)], check=True)
    pin = lambda names: [f"{name}=={metadata.version(name)}" for name in names]
    wheels = [name for name in CARRY_PACKAGES if name not in SDIST_ONLY]
    subprocess.run(
        [*pip, "download", "--no-deps", *TARGET, "-d", str(out), *pin(wheels)], check=True
    )
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(out), *pin(SDIST_ONLY)], check=True)
    return sorted(out.glob("*.whl"))


def trainer_splits(builder, presets=PRESETS) -> set[str]:
    """The TFDS split strings the trainer reads for ``presets`` (``pipeline.split_names``)."""
    from cnnjax import configs
    from cnnjax.data import pipeline

    sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
    fractions = {configs.get(p).data.validation_fraction for p in presets}
    return {s for f in fractions for s in pipeline.split_names(sizes, f).values()}


def build_data(out: Path) -> Path:
    """Fashion-MNIST's TFDS metadata and cnnjax's array cache under ``out``; returns its
    version directory."""
    from cnnjax.data import tfds as tfds_lib
    from cnnjax.data import tfds_source

    with tempfile.TemporaryDirectory() as tmp:
        builder = tfds_lib.builder(DATASET, tmp)  # prepared from the Debian files, or downloaded
        source = Path(builder.data_dir)
        target = out / source.relative_to(tmp)
        if target.exists():
            shutil.rmtree(target)
        (target / tfds_source.ARRAY_CACHE).mkdir(parents=True)
        for path in source.iterdir():  # the metadata: every file but the data shards
            if path.is_file() and not any(s in path.name for s in (".tfrecord", ".array_record")):
                shutil.copy2(path, target / path.name)
        for split in sorted(trainer_splits(builder)):
            arrays = tfds_source.load_arrays(builder, split)  # decodes once
            name = tfds_source.array_cache_path(builder, split).name
            np.savez_compressed(target / tfds_source.ARRAY_CACHE / name, **arrays)
    return target


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build(out: Path = CARRY) -> dict:
    """Wheels and data into ``out``; refuses to leave more than ``LIMIT_BYTES`` there."""
    wheels = build_wheels(out / "wheels")
    data = build_data(out / "tensorflow_datasets")
    size = tree_bytes(out)
    report = {
        "wheels": {w.name: w.stat().st_size for w in wheels},
        "data": {str(p.relative_to(out)): p.stat().st_size for p in data.rglob("*") if p.is_file()},
        "total_bytes": size,
    }
    (out / "carry.json").write_text(json.dumps(report, indent=2))
    if size > LIMIT_BYTES:
        raise SystemExit(f"{out} holds {size / 2**20:.1f} MiB, over the {LIMIT_BYTES >> 20} MiB")
    return report


def missing_wheels(wheels: list[Path], is_installed=installed) -> list[Path]:
    """The carried wheels whose distribution is not installed (cnnjax always: the checkout's)."""
    return [w for w in wheels if wheel_name(w) == "cnnjax" or not is_installed(wheel_name(w))]


def install(carry: Path = CARRY) -> list[str]:
    """Offline ``pip install --no-deps`` of the carried wheels this Python lacks."""
    todo = missing_wheels(sorted((carry / "wheels").glob("*.whl")))
    if todo:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        subprocess.run([*cmd, "--disable-pip-version-check", *map(str, todo)], check=True)
    return [w.name for w in todo]


def data_dir(carry: Path = CARRY) -> Path:
    return carry / "tensorflow_datasets"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("action", choices=("build", "install", "data-dir"))
    p.add_argument("--carry", type=Path, default=CARRY)
    args = p.parse_args(argv)
    if args.action == "build":
        report = build(args.carry)
        print(f"{args.carry}: {report['total_bytes'] / 2**20:.1f} MiB")
        for name, size in {**report["wheels"], **report["data"]}.items():
            print(f"  {size / 2**20:7.2f} MiB  {name}")
    elif args.action == "install":
        print("installed:", ", ".join(install(args.carry)) or "nothing (all present)")
    else:
        print(data_dir(args.carry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
