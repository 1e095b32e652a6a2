"""cnnjax.train.transfer: init_from another run by parameter path (a new head for another class
count), and a frozen backbone that training leaves bit-identical, BatchNorm statistics included."""

import jax
import numpy as np
import optax
import pytest
from conftest import variant

from cnnjax import models
from cnnjax.errors import CheckpointError
from cnnjax.run import trained
from cnnjax.run.state import create_train_state
from cnnjax.train import loop, resume, transfer
from cnnjax.train import setup as setup_lib


def initial_params(config, workdir):
    state = resume.initial_state(setup_lib.setup(config, workdir))
    return jax.device_get(state.params), jax.device_get(state.batch_stats)


def restored(config, workdir):
    run = setup_lib.setup(config, workdir)
    state, _ = resume.restore(run, trained.run_manager(config, workdir, True))
    return jax.device_get(state)


@pytest.mark.slow
def test_frozen_backbone_is_bit_identical(tiny_config, tmp_path):
    config = variant(tiny_config, **{"model.name": "cifar_cnn"}, num_epochs=1, freeze="backbone")
    params0, stats0 = initial_params(config, tmp_path / "setup")
    state = restored(config, tmp_path) if loop.train_and_evaluate(config, tmp_path) else None
    for name in params0:
        same = jax.tree.map(np.array_equal, params0[name], state.params[name])
        assert all(jax.tree.leaves(same)) == (name != "head"), name
    jax.tree.map(np.testing.assert_array_equal, stats0, state.batch_stats)  # BN frozen too


@pytest.fixture(scope="module")
def source(fmnist_data_dir, tmp_path_factory):
    """A finished one-epoch tiny run to transfer from."""
    from cnnjax import configs

    config = configs.get("tiny")
    config.data.data_dir = fmnist_data_dir
    workdir = tmp_path_factory.mktemp("source")
    loop.train_and_evaluate(variant(config, num_epochs=1), workdir)
    return workdir


@pytest.mark.slow
def test_init_from_loads_matching_params_and_rejects_another_model(tiny_config, source, tmp_path):
    pretrained = restored(tiny_config, source).params
    config = variant(tiny_config, init_from=str(source), seed=5)
    loaded, _ = initial_params(config, tmp_path)
    jax.tree.map(np.testing.assert_array_equal, pretrained, loaded)

    other = variant(tiny_config, **{"model.name": "cifar_cnn"}, init_from=str(source))
    with pytest.raises(CheckpointError, match="do not match the pretrained run.*block1_conv1"):
        initial_params(other, tmp_path)


@pytest.mark.slow
def test_init_from_gives_a_new_head_for_another_class_count(tiny_config, source):
    model = models.get("simple_cnn", 3)
    state = create_train_state(model, optax.sgd(0.1), jax.random.key(0), (28, 28, 1))
    loaded = transfer.load_pretrained(state, source)
    assert loaded.params["head"]["fc"]["kernel"].shape == (128, 3)
    np.testing.assert_array_equal(
        loaded.params["conv1"]["conv"]["kernel"],
        restored(tiny_config, source).params["conv1"]["conv"]["kernel"],
    )


def test_merge_keeps_a_fresh_head_of_another_shape_and_names_other_mismatches():
    fresh = {"conv": {"kernel": np.zeros((3, 3, 1, 4))}, "head": {"kernel": np.zeros((4, 3))}}
    pretrained = {"conv": {"kernel": np.ones((3, 3, 1, 4))}, "head": {"kernel": np.ones((4, 10))}}
    merged = transfer.merge(fresh, pretrained, "params")
    np.testing.assert_array_equal(merged["conv"]["kernel"], 1.0)
    np.testing.assert_array_equal(merged["head"]["kernel"], 0.0)
    other = {"conv": {"kernel": np.ones((5, 5, 1, 4))}, "head": pretrained["head"]}
    with pytest.raises(CheckpointError, match=r"1 parameter\(s\) do not match.*params/conv/kernel"):
        transfer.merge(fresh, other, "params")
