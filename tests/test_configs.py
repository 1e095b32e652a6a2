"""Every preset is valid: known names, parseable augmentation, a model that builds."""

import importlib

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from cnnjax import cli, configs
from cnnjax.data import augment
from cnnjax.errors import ConfigError, UnknownNameError
from cnnjax.run import trained
from cnnjax.train import setup as setup_lib

INPUT_SHAPES = {"fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


@pytest.mark.parametrize("name", configs.names())
def test_preset_is_valid(name):
    config = configs.get(name)
    setup_lib.check(config)
    augment.parse(config.augment)
    model = setup_lib.build_model(config, 10)
    x = jnp.zeros((2, *INPUT_SHAPES[config.dataset]))
    logits = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x)[0])
    assert logits.shape == (2, 10)
    assert config.num_epochs > 0 and config.batch_size > 0
    module = importlib.import_module(f"cnnjax.configs.{name}")
    assert "python -m cnnjax.train" in module.__doc__  # each preset documents its command


def test_unknown_preset_and_bad_model_attributes():
    with pytest.raises(UnknownNameError, match="default"):
        configs.resolve("defualt")
    assert cli.resolve_config_arg(["x", "--config=tiny"])[1].endswith("configs/tiny.py")
    assert cli.resolve_config_arg(["--config=my/file.py:arg"]) == ["--config=my/file.py:arg"]
    assert cli.resolve_config_arg(["--config.model=resnet20"]) == ["--config.model.name=resnet20"]
    config = configs.get("tiny")
    config.model.no_such_attribute = 1
    with pytest.raises(ConfigError, match="has no attribute 'no_such_attribute'"):
        setup_lib.build_model(config, 10)
    config = configs.get("tiny")
    config.model.name = "resnet18"
    config.model.smal_input = True
    with pytest.raises(ConfigError, match="did you mean 'small_input'"):
        setup_lib.build_model(config, 10)
    config.model = ml_collections.ConfigDict({"name": "resnet18", "small_input": "yes"})
    with pytest.raises(ConfigError, match="small_input='yes' must be like the default"):
        setup_lib.build_model(config, 10)


def test_model_group_builds_the_model_with_its_attributes():
    config = configs.get("cifar10_resnet18")
    model = setup_lib.build_model(config, 10)
    assert model.small_input is True and model.num_classes == 10


def test_unknown_config_keys_name_the_closest():
    reference = configs.get("tiny")
    config = configs.get("tiny")
    config.num_epoch = 3  # a typo of num_epochs
    with pytest.raises(
        ConfigError,
        match=r"unknown config key --config.num_epoch; did you mean --config.num_epochs\?",
    ):
        configs.check_keys(config, reference)
    config = configs.get("tiny")
    config.data.eval_batchsize = 3
    with pytest.raises(ConfigError, match="did you mean --config.data.eval_batch_size"):
        configs.check_keys(config, reference)
    config = configs.get("tiny")
    config.model.small_input = True  # model attributes are the model's to check
    configs.check_keys(config, reference)


def test_config_json_of_older_versions_is_upgraded():
    old = {"model": "resnet18", "model_kwargs": "{'small_input': True}", "dataset": "cifar10"}
    assert trained.upgrade_config(old) == {
        "model": {"name": "resnet18", "small_input": True},
        "dataset": "cifar10",
    }
    new = {"model": {"name": "resnet18"}, "dataset": "cifar10"}
    assert trained.upgrade_config(new) == new
