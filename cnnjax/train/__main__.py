"""Train a model: ``python -m cnnjax.train [--config=PRESET|FILE] [--workdir=DIR]
[--config.KEY=VALUE ...]``.

With no flags it trains the ``default`` preset (Fashion-MNIST) into ``checkpoints/default``.
Running the same command again resumes from the latest checkpoint in the workdir.
Multi-process: ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` on every
process (``python -m cnnjax.launch`` does it on one machine), or nothing under SLURM, Open MPI
and Cloud TPU (``cnnjax.distributed``).
"""

import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from cnnjax import cli, configs
from cnnjax import distributed as _distributed  # noqa: F401  (the multi-process flags)
from cnnjax.train import loop

# accept_new_attributes: model attributes (--config.model.small_input=True) need not be in the
# preset; every other unknown key is refused by configs.check_keys, naming the closest one.
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    configs.resolve("default"),
    "Preset name (" + ", ".join(configs.names()) + ") or path to a config file.",
    lock_config=False,
    accept_new_attributes=True,
    sys_argv=cli.expand_shorthands(sys.argv),
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, metrics). Default: checkpoints/<preset>."
)


def main(argv):
    cli.no_extra_args(argv)
    path = flags.FLAGS["config"].config_filename  # type: ignore[attr-defined]
    configs.check_keys(_CONFIG.value, configs.load(path))
    workdir = _WORKDIR.value or str(Path("checkpoints") / Path(path.split(":")[0]).stem)
    loop.train_and_evaluate(_CONFIG.value, workdir)


if __name__ == "__main__":
    cli.run(main)
