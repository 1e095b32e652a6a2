"""Every preset is valid: known names, parseable augmentation, a model that builds."""

import importlib

import jax
import jax.numpy as jnp
import pytest

from cnnjax import cli, configs, trainer
from cnnjax.data import augment
from cnnjax.errors import ConfigError, UnknownNameError

INPUT_SHAPES = {"fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


@pytest.mark.parametrize("name", configs.names())
def test_preset_is_valid(name):
    config = configs.get(name)
    trainer.validate_names(config)
    augment.parse(config.augment)
    model = trainer.build_model(config, 10)
    x = jnp.zeros((2, *INPUT_SHAPES[config.dataset]))
    logits = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x)[0])
    assert logits.shape == (2, 10)
    assert config.num_epochs > 0 and config.batch_size > 0
    module = importlib.import_module(f"cnnjax.configs.{name}")
    assert "python -m cnnjax.train" in module.__doc__  # each preset documents its command


def test_unknown_preset_and_bad_model_kwargs():
    with pytest.raises(UnknownNameError, match="default"):
        configs.resolve("defualt")
    assert cli.resolve_config_arg(["x", "--config=tiny"])[1].endswith("configs/tiny.py")
    assert cli.resolve_config_arg(["--config=my/file.py:arg"]) == ["--config=my/file.py:arg"]
    config = configs.get("tiny")
    config.model_kwargs = "{'no_such_attribute': 1}"
    with pytest.raises(ConfigError, match="does not accept"):
        trainer.build_model(config, 10)
    config.model_kwargs = "small_input=True"
    with pytest.raises(ConfigError, match="dict literal"):
        trainer.build_model(config, 10)
