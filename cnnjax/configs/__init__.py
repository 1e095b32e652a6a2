"""Presets: each module here has a ``get_config()`` returning an ``ml_collections.ConfigDict``.

``--config=NAME`` on the command line names a preset (``default``, ``tiny``...) or a path to any
config file with a ``get_config()``.
"""

from pathlib import Path

from cnnjax.errors import unknown_name

PRESETS_DIR = Path(__file__).parent


def names() -> list[str]:
    """Names of the presets shipped with cnnjax."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.py") if not p.stem.startswith("_"))


def resolve(name_or_path: str) -> str:
    """A preset name or a config file path (optionally ``path:arg``) -> a config file path."""
    path, sep, arg = name_or_path.partition(":")
    if path.endswith(".py") or "/" in path:
        return name_or_path
    if path not in names():
        raise unknown_name("config preset", path, names())
    return str(PRESETS_DIR / f"{path}.py") + sep + arg


def get(name: str):
    """The ConfigDict of preset ``name`` (for Python users and tests)."""
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    return ConfigFileFlagParser(name="config").parse(resolve(name))
