"""Train a model: ``python -m cnnjax.train [--config=PRESET|FILE] [--workdir=DIR]
[--config.KEY=VALUE ...]``.

With no flags it trains the ``default`` preset (Fashion-MNIST) into ``checkpoints/default``.
Running the same command again resumes from the latest checkpoint in the workdir.
"""

from pathlib import Path

from absl import flags
from ml_collections import config_flags

from cnnjax import cli, configs, runtime

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    configs.resolve("default"),
    "Preset name (" + ", ".join(configs.names()) + ") or path to a config file.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, metrics). Default: checkpoints/<preset>."
)


def default_workdir() -> str:
    """checkpoints/<preset or config file stem>."""
    path = flags.FLAGS["config"].config_filename  # type: ignore[attr-defined]
    return str(Path("checkpoints") / Path(path.split(":")[0]).stem)


def main(argv):
    if len(argv) > 1:
        raise flags.Error(f"unexpected arguments: {' '.join(argv[1:])}")
    runtime.configure_xla()
    runtime.enable_compilation_cache()
    from cnnjax.trainer import train_and_evaluate  # after the XLA flags are set

    train_and_evaluate(_CONFIG.value, _WORKDIR.value or default_workdir())


if __name__ == "__main__":
    cli.run(main)
