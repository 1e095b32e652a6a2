"""Value checks of a training config, run once before any data is read or directory created.

``RULES`` maps every key of ``default.KEYS`` (where each key is declared, with its default and
doc) to what it accepts; the keys chosen by name there (``NAMED``: ``model``, ``optimizer``,
``schedule``, ``augment``) are checked against their registries by ``train.setup.check``.
``check(config)`` raises a one-line ``ConfigError`` naming the key, the value and the valid
range::

    --config.num_epochs=-1 must be an integer >= 1
"""

from cnnjax.configs import default
from cnnjax.configs.keys import ByName
from cnnjax.errors import ConfigError

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
