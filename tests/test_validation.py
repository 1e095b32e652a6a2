"""Config value checks (``cnnjax.configs.validation``), the shared rules, the workdir check, and
images too small for a model: all in-process and without data."""

import math

import jax
import pytest

from cnnjax import configs, models, rules
from cnnjax.configs import validation
from cnnjax.errors import CheckpointError, ConfigError, InputTooSmallError
from cnnjax.run import trained
from cnnjax.run.state import init_variables


@pytest.mark.parametrize("preset", configs.names())
def test_every_preset_passes_and_every_key_has_a_rule(preset):
    config = configs.get(preset)
    validation.check(config)
    unchecked = set(configs.flat_keys(config)) - set(validation.RULES) - set(validation.NAMED)
    assert not unchecked


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("num_epochs", -1, "--config.num_epochs=-1 must be an integer >= 1"),
        ("num_epochs", 2.5, "--config.num_epochs=2.5 must be an integer >= 1"),
        ("batch_size", True, "--config.batch_size=True must be an integer >= 1"),
        ("learning_rate", 0.0, "--config.learning_rate=0.0 must be a finite number > 0"),
        ("learning_rate", math.inf, "--config.learning_rate=inf must be a finite number > 0"),
        ("momentum", 1.0, "--config.momentum=1.0 must be a finite number in [0, 1)"),
        ("weight_decay", -1e-4, "--config.weight_decay=-0.0001 must be a finite number >= 0"),
        ("lr_decay_at", (0.5, 1.0), "--config.lr_decay_at=(0.5, 1.0) must be increasing numbers"),
        ("lr_decay_factor", 0.0, "--config.lr_decay_factor=0.0 must be a finite number in (0, 1]"),
        ("label_smoothing", 1.0, "--config.label_smoothing=1.0 must be a finite number in [0, 1)"),
        ("skip_nonfinite", -1, "--config.skip_nonfinite=-1 must be an integer >= 0"),
        ("skip_nonfinite", 0.5, "--config.skip_nonfinite=0.5 must be an integer >= 0"),
        ("seed", -1, "--config.seed=-1 must be an integer in [0, 4294967295]"),
        ("plateau.min_scale", 0.0, "--config.plateau.min_scale=0.0 must be a finite number in (0"),
        ("plateau.patience", -1, "--config.plateau.patience=-1 must be an integer >= 0"),
        ("finetune", "[", "--config.finetune=[ must be a valid regular expression"),
        ("init_from", "", "--config.init_from= must be None or a non-empty string"),
        ("log_every_steps", 0, "--config.log_every_steps=0 must be an integer >= 1"),
        ("steps_per_dispatch", -1, "--config.steps_per_dispatch=-1 must be an integer >= 0"),
        ("grad_accum_steps", 0, "--config.grad_accum_steps=0 must be an integer >= 1"),
        ("profile", "5", "--config.profile=5 must be START:COUNT (the first global step"),
        ("profile", "0:3", "--config.profile=0:3 must be START:COUNT"),
        ("data.validation_fraction", 1.0, "validation_fraction=1.0 must be a finite number in [0"),
        ("data.in_memory", "always", "--config.data.in_memory=always must be one of auto, yes"),
        ("data.in_memory_max_bytes", -1, "in_memory_max_bytes=-1 must be an integer >= 0"),
        ("data.eval_batch_size", 0, "--config.data.eval_batch_size=0 must be an integer >= 1"),
        ("data.limit_examples", -5, "--config.data.limit_examples=-5 must be an integer >= 0"),
        ("checkpointing.every_epochs", 0, "every_epochs=0 must be an integer >= 1"),
        ("checkpointing.max_to_keep", 0, "max_to_keep=0 must be an integer >= 1"),
        ("checkpointing.best_mode", "up", "--config.checkpointing.best_mode=up must be one of max"),
        ("checkpointing.best_metric", "test_accuracy", "best_metric=test_accuracy must be one of"),
    ],
)
def test_bad_values_name_key_value_and_range(key, value, message):
    config = configs.get("default")
    group, _, leaf = key.rpartition(".")
    node = config[group] if group else config
    with node.ignore_type():
        node[leaf] = value
    with pytest.raises(ConfigError) as raised:
        validation.check(config)
    assert message in str(raised.value)


def test_bounds_are_accepted():
    config = configs.get("default")
    config.momentum, config.label_smoothing, config.ema_decay = 0.0, 0.0, 0.999
    config.warmup_epochs = float(config.num_epochs)  # warmup may last the whole run
    config.lr_decay_factor, config.plateau.min_scale = 1.0, 1.0
    config.lr_decay_at = ()
    config.data.image_size, config.data.validation_fraction = 1, 0.0
    config.init_from = "/some/run"
    validation.check(config)


def test_warmup_longer_than_training_names_both_keys():
    config = configs.get("default")
    config.warmup_epochs = config.num_epochs + 0.5
    with pytest.raises(ConfigError, match=r"warmup_epochs=6.5 must be at most --config.num_ep"):
        validation.check(config)


def test_a_config_file_without_a_key_is_not_refused_for_it():
    config = configs.get("default")
    del config["plateau"]
    validation.check(config)


def test_rule_sentences():
    assert rules.number(0, 1, hi_open=True).accepts == "a number in [0, 1)"
    assert rules.number(0, lo_open=True, finite=True).accepts == "a finite number > 0"
    assert rules.number(integer=True).accepts == "an integer"
    assert not rules.number(0, 1).ok(float("nan"))
    assert rules.number(0).ok(math.inf) and not rules.number(0, finite=True).ok(math.inf)
    assert not rules.increasing(0, 1).ok((0.5, 0.5))


def test_workdir_checks(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(CheckpointError, match="afile is a file, not a directory"):
        trained.check_workdir(tmp_path / "afile")
    with pytest.raises(CheckpointError, match=r"afile/w cannot be created: .*Not a directory"):
        trained.check_workdir(tmp_path / "afile" / "w")
    assert trained.check_workdir(tmp_path / "a" / "b").is_dir()
    (tmp_path / "a" / "b" / "config.json").write_text('{"mod')  # a run killed mid-write
    with pytest.raises(CheckpointError, match="config.json is unreadable"):
        trained.check_workdir(tmp_path / "a" / "b")


def test_images_too_small_for_a_model_are_a_config_error():
    with pytest.raises(ConfigError, match=r"\(4, 4, 1\) are too small for LeNet5 \(layer pool2"):
        init_variables(models.get("lenet5"), jax.random.key(0), (4, 4, 1))
    with pytest.raises(ConfigError, match=r"too small for SimpleCNN \(window \(2, 2\) is larger"):
        init_variables(models.get("simple_cnn"), jax.random.key(0), (3, 3, 1))
    assert issubclass(InputTooSmallError, ValueError)  # pooling's error stays a ValueError


def test_model_needs_a_class():
    with pytest.raises(ConfigError, match="num_classes must be an integer >= 1, got 0"):
        models.get("lenet5", num_classes=0)
