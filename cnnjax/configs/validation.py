"""Value checks of a training config, run once before any data is read or directory created.

``RULES`` maps every documented key (``cnnjax/configs/default.py``) to what it accepts; keys
chosen by name (``model``, ``optimizer``, ``schedule``, ``augment``) are checked against their
registries by ``setup_lib.validate_names``. ``check(config)`` raises a one-line ``ConfigError``
naming the key, the value and the valid range::

    --config.num_epochs=-1 must be an integer >= 1
"""

import re

from cnnjax import rules as r
from cnnjax.errors import ConfigError
from cnnjax.models.common import REMAT_CHOICES

# The keys of every metrics.jsonl epoch line (hooks.epoch_line), so a checkpoint can be ranked
# by any of them; test_* metrics exist on the last epoch only and cannot rank checkpoints.
EPOCH_METRICS = (
    "eval_accuracy",
    "eval_loss",
    "train_accuracy",
    "train_loss",
    "learning_rate",
    "step",
    "train_images_per_sec",
    "wall_s",
)
DTYPES = ("float32", "bfloat16", "float16")

_POSITIVE_INT = r.number(1, integer=True)
_COUNT = r.number(0, integer=True)
_NON_NEGATIVE = r.number(0, finite=True)
_FRACTION_BELOW_1 = r.number(0, 1, hi_open=True, finite=True)  # [0, 1)
_PATH = r.either(r.NONE, r.TEXT)

RULES: dict[str, r.Rule] = {
    "dataset": r.TEXT,
    "dtype": r.choice(*DTYPES),
    "conv_backend": r.choice("auto", "xla", "onednn"),
    "remat": r.choice(*REMAT_CHOICES),  # and blocks[:POLICY] only for models with blocks
    "num_epochs": _POSITIVE_INT,
    "batch_size": _POSITIVE_INT,
    "grad_accum_steps": _POSITIVE_INT,
    "learning_rate": r.number(0, lo_open=True, finite=True),
    "momentum": _FRACTION_BELOW_1,
    "nesterov": r.BOOL,
    "weight_decay": _NON_NEGATIVE,
    "grad_clip_norm": _NON_NEGATIVE,
    "skip_nonfinite": _COUNT,
    "warmup_epochs": _NON_NEGATIVE,  # and <= num_epochs: CROSS_RULES
    "final_lr_factor": _NON_NEGATIVE,
    "lr_decay_at": r.increasing(0, 1),
    "lr_decay_factor": r.number(0, 1, lo_open=True, finite=True),
    "label_smoothing": _FRACTION_BELOW_1,
    "ema_decay": _FRACTION_BELOW_1,
    "flip_tta": r.BOOL,
    "seed": r.number(0, 2**32 - 1, integer=True),
    "deterministic": r.BOOL,
    "plateau.patience": _COUNT,
    "plateau.factor": r.number(0, 1, lo_open=True, hi_open=True, finite=True),
    "plateau.cooldown": _COUNT,
    "plateau.min_scale": r.number(0, 1, lo_open=True, finite=True),
    "early_stopping_patience": _COUNT,
    "early_stopping_min_delta": _NON_NEGATIVE,
    "init_from": _PATH,
    "freeze": r.REGEX,  # "backbone" is a valid regex as well
    "finetune": r.REGEX,
    "finetune_lr_factor": _NON_NEGATIVE,
    "log_every_steps": _POSITIVE_INT,
    "steps_per_dispatch": _COUNT,
    "profile": r.Rule(
        "START:COUNT (the first global step to trace, >= 1, and how many, e.g. 10:5) or empty",
        lambda v: isinstance(v, str) and re.fullmatch(r"([1-9]\d*:[1-9]\d*)?", v) is not None,
    ),
    "test_every_epoch": r.BOOL,
    "data.data_dir": _PATH,
    "data.local_dir": _PATH,
    "data.download": r.BOOL,
    "data.validation_fraction": _FRACTION_BELOW_1,
    "data.in_memory": r.choice("auto", "yes", "no"),
    "data.in_memory_max_bytes": _COUNT,
    "data.image_size": r.either(r.NONE, _POSITIVE_INT),
    "data.eval_batch_size": _POSITIVE_INT,
    "data.limit_examples": _COUNT,
    "checkpointing.every_epochs": _POSITIVE_INT,
    "checkpointing.max_to_keep": _POSITIVE_INT,
    "checkpointing.best_metric": r.choice(*EPOCH_METRICS),
    "checkpointing.best_mode": r.choice("max", "min"),
}
# Checked by name against a registry (setup_lib.validate_names), not here.
NAMED = ("model", "optimizer", "schedule", "augment")

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
