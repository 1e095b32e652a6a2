"""The table of config keys (``cnnjax/configs/default.py`` ``KEYS``): the config it builds, a rule
and a doc for every key, and the reference generated from it (``docs/config.md``)."""

import runpy
from pathlib import Path

from ml_collections import ConfigDict

from cnnjax import configs, rules
from cnnjax.configs import default, keys, validation
from cnnjax.run import metrics

# default.get_config().to_dict() as it was before the table, when each key was a line of
# get_config() and its rule a line of validation.RULES.
FROZEN = {
    "augment": "",
    "batch_size": 256,
    "checkpointing": {
        "best_metric": "eval_accuracy",
        "best_mode": "max",
        "every_epochs": 1,
        "max_to_keep": 2,
    },
    "conv_backend": "auto",
    "data": {
        "channels": 0,
        "data_dir": None,
        "download": True,
        "eval_batch_size": 1000,
        "image_size": None,
        "in_memory": "auto",
        "in_memory_max_bytes": 2147483648,
        "limit_examples": 0,
        "local_dir": None,
        "test_fraction": 0.1,
        "validation_fraction": 0.1,
        "workers": 0,
    },
    "dataset": "fashion_mnist",
    "deterministic": False,
    "dtype": "float32",
    "early_stopping_min_delta": 0.0,
    "early_stopping_patience": 0,
    "ema_decay": 0.0,
    "final_lr_factor": 0.0,
    "finetune": "",
    "finetune_lr_factor": 0.1,
    "flip_tta": False,
    "freeze": "",
    "grad_accum_steps": 1,
    "grad_clip_norm": 0.0,
    "init_from": None,
    "label_smoothing": 0.1,
    "learning_rate": 0.2,
    "log_every_steps": 50,
    "lr_decay_at": (0.5, 0.75),
    "lr_decay_factor": 0.1,
    "model": {"name": "simple_cnn"},
    "momentum": 0.9,
    "nesterov": True,
    "num_epochs": 6,
    "optimizer": "sgd",
    "plateau": {"cooldown": 0, "factor": 0.5, "min_scale": 0.01, "patience": 0},
    "profile": "",
    "remat": "none",
    "schedule": "onecycle",
    "seed": 0,
    "skip_nonfinite": 0,
    "steps_per_dispatch": 0,
    "test_every_epoch": False,
    "warmup_epochs": 1.0,
    "weight_decay": 0.0005,
}
# The keys whose default was config_dict.placeholder(TYPE): None, then only TYPE.
PLACEHOLDERS = {
    "init_from": str,
    "data.data_dir": str,
    "data.local_dir": str,
    "data.image_size": int,
}


def typed(tree: dict) -> dict:
    """``tree`` with each leaf as ``(type, value)``: ``==`` alone takes 1, 1.0 and True as one."""
    return {k: typed(v) if isinstance(v, dict) else (type(v), v) for k, v in tree.items()}


def test_the_table_builds_the_default_config_of_before():
    config = default.get_config()
    assert typed(config.to_dict()) == typed(FROZEN)
    for group in ("model", "data", "checkpointing", "plateau"):
        assert type(config[group]) is ConfigDict
    for path, kind in PLACEHOLDERS.items():
        group, _, leaf = path.rpartition(".")
        assert (config[group] if group else config).get_type(leaf) is kind
    config.init_from, config.model.name, config.data.image_size = "/a/run", "lenet5", 64
    assert typed(default.get_config().to_dict()) == typed(FROZEN)  # nothing shared between calls


def test_every_key_has_one_declaration_a_rule_and_a_doc():
    paths = [k.path for k in default.KEYS]
    assert len(paths) == len(set(paths))
    assert sorted(paths) == sorted(configs.flat_keys(default.get_config()))
    for key in default.KEYS:
        assert isinstance(key.rule, rules.Rule | keys.ByName) and key.rule.accepts, key.path
        assert key.doc.strip(), key.path
        if isinstance(key.rule, rules.Rule):  # the default passes its own rule
            assert key.rule.ok(None if isinstance(key.default, keys.Unset) else key.default)
    assert set(validation.RULES) | set(validation.NAMED) == set(paths)
    assert set(validation.NAMED) == {"model", "optimizer", "schedule", "augment"}


def test_checkpoints_rank_by_the_metrics_of_the_epoch_line():
    rule = validation.RULES["checkpointing.best_metric"]
    assert all(rule.ok(name) for name in metrics.EPOCH_METRICS)
    assert not rule.ok(f"{metrics.TEST}_accuracy")  # on the last epoch only


def test_docs_config_md_is_the_generated_reference(capsys):
    runpy.run_module("cnnjax.configs", run_name="__main__")
    printed = capsys.readouterr().out
    assert printed == keys.markdown(default.KEYS)
    docs = Path(__file__).parent.parent / "docs" / "config.md"
    assert docs.read_text() == printed, "regenerate: python -m cnnjax.configs > docs/config.md"
    assert "| `data.in_memory_max_bytes` | `2147483648` | an integer >= 0 |" in printed
    assert "| `optimizer` | `'sgd'` | an optimizer name, checked against its registry |" in printed
