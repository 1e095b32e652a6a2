"""Value checks of a training config, run once before any data is read or directory created.

``RULES`` maps every key of ``default.KEYS`` (where each key is declared, with its default and
doc) to what it accepts; the keys chosen by name there (``NAMED``: ``model``, ``optimizer``,
``schedule``, ``augment``) are checked against their registries by ``trainer.validate_names``.
``check(config)`` raises a one-line ``ConfigError`` naming the key, the value and the valid
range::

    --config.num_epochs=-1 must be an integer >= 1

``check_workdir(path)`` makes sure the run directory is one (or can be created), naming the
path that stands in the way.
"""

from pathlib import Path

from cnnjax.configs import default
from cnnjax.configs.keys import ByName
from cnnjax.errors import CheckpointError, ConfigError
from cnnjax.run import workdir as workdir_lib

RULES = {k.path: k.rule for k in default.KEYS if not isinstance(k.rule, ByName)}
NAMED = tuple(k.path for k in default.KEYS if isinstance(k.rule, ByName))

# (key, the key bounding it from above): key <= bound, checked after RULES.
CROSS_RULES = (("warmup_epochs", "num_epochs"),)


def shown(value) -> str:
    """A value as a user types it on the command line (strings without quotes)."""
    return value if isinstance(value, str) else repr(value)


def _lookup(config, key: str):
    """``config["a"]["b"]`` for ``"a.b"``; a missing key is a ``KeyError``."""
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _present(config, key: str) -> bool:
    try:
        _lookup(config, key)
    except (KeyError, AttributeError, TypeError):
        return False
    return True


def check(config) -> None:
    """Checks every key of ``RULES`` that ``config`` has (a user's own config file may leave some
    out: the code then uses no such setting).

    Raises:
      ConfigError: the first bad value, as ``--config.KEY=VALUE must be ...``.
    """
    for key, rule in RULES.items():
        if not _present(config, key):
            continue
        value = _lookup(config, key)
        if not rule.ok(value):
            raise ConfigError(f"--config.{key}={shown(value)} must be {rule.accepts}")
    for key, bound in CROSS_RULES:
        if _present(config, key) and _present(config, bound):
            value, limit = _lookup(config, key), _lookup(config, bound)
            if value > limit:
                raise ConfigError(
                    f"--config.{key}={shown(value)} must be at most --config.{bound}={shown(limit)}"
                )


def check_workdir(workdir, create: bool = True) -> Path:
    """Creates the run directory ``workdir`` if needed (only if ``create``: the first process
    of a multi-host run); returns it.

    Raises:
      CheckpointError: ``workdir`` is a file, lies under one, or cannot be created or written
        (the message names the path and the reason), or holds a damaged ``config.json``.
    """
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise CheckpointError(f"--workdir={workdir} is a file, not a directory")
    if not create:
        return workdir
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        where = e.filename or workdir
        raise CheckpointError(
            f"--workdir={workdir} cannot be created: {where}: {e.strerror or e}"
        ) from None
    try:  # by creating a file: root passes os.access on a read-only mount
        workdir_lib.probe_writable(workdir)
    except OSError as e:
        raise CheckpointError(
            f"--workdir={workdir} is not writable: {e.filename or workdir}: {e.strerror or e}"
        ) from None
    if (workdir / "config.json").exists():  # a run to resume: its config must be readable
        from cnnjax.run import checkpoint

        checkpoint.load_run_config(workdir)
    return workdir
