"""Presets: each module here has a ``get_config()`` returning an ``ml_collections.ConfigDict``.

``--config=NAME`` on the command line names a preset (``default``, ``tiny``...) or a path to any
config file with a ``get_config()``. Overrides (``--config.KEY=VALUE``) may add attributes to the
``model`` group only; any other key the config file does not define is refused by
``check_keys``, naming the closest valid key.
"""

import difflib
from pathlib import Path

from ml_collections import ConfigDict

from cnnjax.errors import ConfigError
from cnnjax.registry import Registry

PRESETS_DIR = Path(__file__).parent
_NOT_PRESETS = ("keys", "validation")  # modules of this package that hold code, not a get_config()
PRESETS: Registry[Path] = Registry(
    "config preset",
    {
        p.stem: p
        for p in sorted(PRESETS_DIR.glob("*.py"))
        if not p.stem.startswith("_") and p.stem not in _NOT_PRESETS
    },
)
OPEN_GROUPS = ("model",)  # groups whose keys are checked against the model, not the file


def names() -> list[str]:
    """Names of the presets shipped with cnnjax."""
    return PRESETS.names()


def resolve(name_or_path: str) -> str:
    """A preset name or a config file path (optionally ``path:arg``) -> a config file path."""
    path, sep, arg = name_or_path.partition(":")
    if path.endswith(".py") or "/" in path:
        return name_or_path
    return str(PRESETS[path]) + sep + arg


def load(name_or_path: str) -> ConfigDict:
    """The ConfigDict of a preset or config file, without overrides (unlocked: the ``model``
    group takes new attributes, ``config.model.small_input = True``)."""
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    path = resolve(name_or_path)
    try:
        config = ConfigFileFlagParser(name="config", lock_config=False).parse(path)
        config.keys()  # a file that failed to load parses to a stand-in that raises on use
        return config
    except Exception as e:  # the config file's own error (missing, syntax, ...) is the user's
        cause = e.__cause__ or e
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[-1].strip()
        raise ConfigError(f"cannot load config file {path}: {reason}") from e


get = load  # for Python users and tests: configs.get("tiny")


def flat_keys(config, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf (``data.eval_batch_size``), groups in ``OPEN_GROUPS`` as
    one key."""
    keys = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ConfigDict | dict) and path not in OPEN_GROUPS:
            keys += flat_keys(value, path + ".")
        else:
            keys.append(path)
    return keys


def check_keys(config: ConfigDict, reference: ConfigDict) -> None:
    """Refuses keys of ``config`` that ``reference`` (the file it came from) lacks: they can
    only be typos of an override.

    Raises:
      ConfigError: the first unknown key, with the closest valid one.
    """
    valid = flat_keys(reference)
    for key in flat_keys(config):
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean --config.{close[0]}?" if close else "see --helpfull"
            raise ConfigError(f"unknown config key --config.{key}; {hint}")
