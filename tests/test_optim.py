"""cnnjax.train.optim, checked by its effect on updates: schedules at known steps, each optimizer's
update against optax's own, weight decay only on kernels, the transfer-learning learning rates,
ReduceLROnPlateau's cooldown and floor."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import configs, models
from cnnjax.run.state import init_variables
from cnnjax.train import optim

STEPS_PER_EPOCH = 10


def config_with(**overrides):
    c = configs.get("default")
    c.num_epochs = 4  # 40 steps
    c.update_from_flattened_dict(overrides)
    return c


def lr_at(config, steps) -> list[float]:
    schedule = optim.create_schedule(config, STEPS_PER_EPOCH)
    return [float(schedule(s)) for s in steps]


def test_constant_schedule():
    assert (
        lr_at(config_with(schedule="constant", learning_rate=0.3), [0, 17, 40])
        == [pytest.approx(0.3, rel=1e-7)] * 3
    )


def test_warmup_cosine_at_known_steps():
    # 10 warmup steps from 0 to 0.2 (linear), then half a cosine down to 0.2 * 0.1 at step 40:
    # at the middle of the decay (step 25) the mean of peak and end, 0.11.
    c = config_with(schedule="warmup_cosine", learning_rate=0.2, final_lr_factor=0.1)
    c.warmup_epochs = 1.0
    got = lr_at(c, [0, 5, 10, 25, 40])
    np.testing.assert_allclose(got, [0.0, 0.1, 0.2, 0.11, 0.02], rtol=1e-6, atol=1e-8)


def test_onecycle_at_known_steps():
    # pct_start = warmup 10 / total 40 = 0.25: from 0.2 / 25 up to 0.2 at step 10 (a cosine
    # ramp: its midpoint, step 5, is the mean 0.1040), then down to 0.2 / 25 / 1e4 at step 40.
    c = config_with(schedule="onecycle", learning_rate=0.2, warmup_epochs=1.0)
    got = lr_at(c, [0, 5, 10, 40])
    np.testing.assert_allclose(got, [0.008, 0.104, 0.2, 0.2 / 25 / 1e4], rtol=1e-5)


def test_onecycle_rise_is_at_most_30_percent_of_a_short_run():
    c = config_with(schedule="onecycle", learning_rate=0.2, warmup_epochs=3.0)  # 30 of 40 steps
    got = lr_at(c, [11, 12, 13])  # peak at 0.3 * 40 = 12
    assert got[1] == pytest.approx(0.2, rel=1e-6) and got[0] < 0.2 and got[2] < 0.2


def test_piecewise_at_known_steps():
    # Decays by 10x at 50% and 75% of the 40 steps.
    c = config_with(schedule="piecewise", learning_rate=0.1, lr_decay_at=(0.5, 0.75))
    got = lr_at(c, [0, 19, 20, 29, 30, 40])
    np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def small_params():
    """A real model's params: conv and dense kernels, dense biases, BatchNorm scales and biases."""
    model = models.get("cifar_cnn", num_classes=3, widths=(2, 2, 2))
    return init_variables(model, jax.random.key(0), (8, 8, 1))["params"]


def leaves_by_path(tree) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def test_decay_mask_is_true_exactly_for_kernels():
    mask = leaves_by_path(optim.decay_mask(small_params()))
    kinds = {path: path.rsplit("'", 2)[-2] for path in mask}  # the leaf's name
    assert set(kinds.values()) == {"kernel", "bias", "scale"}
    assert all(bool(mask[path]) == (kind == "kernel") for path, kind in kinds.items())


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "lamb", "lion"])
def test_weight_decay_alone_moves_kernels_only(name):
    """With zero gradients the whole update is the weight decay's: nonzero on every kernel,
    exactly zero on biases and norm parameters."""
    params = small_params()
    c = config_with(optimizer=name, schedule="constant", learning_rate=0.1, weight_decay=0.01)
    tx, _ = optim.create_optimizer(c, STEPS_PER_EPOCH)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for path, update in leaves_by_path(updates).items():
        if path.endswith("['kernel']"):
            assert np.all(update != 0), path
        else:
            np.testing.assert_array_equal(update, 0, err_msg=path)


def grads_like(params, seed=1):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)]
    )


@pytest.mark.parametrize(
    "name,reference",
    [
        ("adamw", lambda lr, wd, mask: optax.adamw(lr, weight_decay=wd, mask=mask)),
        ("lamb", lambda lr, wd, mask: optax.lamb(lr, weight_decay=wd, mask=mask)),
        ("lion", lambda lr, wd, mask: optax.lion(lr, weight_decay=wd, mask=mask)),
        (
            "adam",  # coupled: L2 added to the gradient (PyTorch's weight_decay for Adam)
            lambda lr, wd, mask: optax.chain(optax.add_decayed_weights(wd, mask), optax.adam(lr)),
        ),
    ],
)
def test_two_updates_equal_optax(name, reference):
    """Two steps (so the moments matter) equal optax's optimizer with a hand-written mask that
    decays the kernels only: the same operations, so bit for bit."""
    params = small_params()
    mask = jax.tree_util.tree_map_with_path(
        lambda path, _: jax.tree_util.keystr(path).endswith("['kernel']"), params
    )
    c = config_with(optimizer=name, schedule="constant", learning_rate=0.01, weight_decay=0.1)
    got_tx, _ = optim.create_optimizer(c, STEPS_PER_EPOCH)
    want_tx = reference(0.01, 0.1, mask)
    results = []
    for tx in (got_tx, want_tx):
        p, state = params, tx.init(params)
        for seed in (1, 2):
            updates, state = tx.update(grads_like(params, seed), state, p)
            p = optax.apply_updates(p, updates)
        results.append(leaves_by_path(p))
    for path, value in results[0].items():
        np.testing.assert_array_equal(value, results[1][path], err_msg=path)


def test_finetuned_paths_get_the_smaller_learning_rate_and_frozen_ones_none():
    """Plain SGD (no momentum, no decay): an all-ones gradient moves every parameter by minus
    its learning rate, so the update shows each path's rate: the head 0.1, fc1 (finetuned)
    0.1 * 0.25, the frozen backbone 0."""
    model = models.get("simple_cnn", num_classes=3)
    params = init_variables(model, jax.random.key(0), (8, 8, 1))["params"]
    c = config_with(optimizer="sgd", momentum=0.0, nesterov=False, weight_decay=0.0)
    c.update({"schedule": "constant", "learning_rate": 0.1})
    c.update({"freeze": "backbone", "finetune": "^fc1/", "finetune_lr_factor": 0.25})
    tx, _ = optim.create_optimizer(c, STEPS_PER_EPOCH)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    rate = {"head": 0.1, "fc1": 0.1 * 0.25, "conv1": 0.0, "conv2": 0.0}
    assert set(updates) == set(rate)
    for layer, want in rate.items():
        for leaf in jax.tree.leaves(updates[layer]):
            np.testing.assert_array_equal(leaf, np.float32(-want), err_msg=layer)


def test_finetune_labels_train_the_head_finetune_the_top_and_freeze_the_rest():
    model = models.get("simple_cnn", num_classes=10)
    params = init_variables(model, jax.random.key(0), (28, 28, 1))["params"]
    config = config_with(freeze="backbone", finetune="^fc1/")
    labels = optim.param_labels(config, params)
    assert labels["head"]["fc"]["kernel"] == "train"
    assert labels["fc1"]["kernel"] == "finetune"
    assert labels["conv1"]["conv"]["kernel"] == "frozen"


def test_plateau_cooldown_and_min_scale():
    """patience 1, factor 0.5, cooldown 1, min_scale 0.2, a loss that never improves after the
    first epoch: halved every second epoch (one epoch of cooldown between reductions), and never
    below 0.2."""
    c = config_with(**{"plateau.patience": 1, "plateau.factor": 0.5})
    c.plateau.update({"cooldown": 1, "min_scale": 0.2})
    plateau = optim.create_plateau(c)
    params = {"w": jnp.ones(2)}
    state, scales = plateau.init(params), []
    for _ in range(8):
        _, state = plateau.update(params, state, value=jnp.float32(1.0))
        scales.append(float(state.scale))
    np.testing.assert_allclose(scales, [1.0, 0.5, 0.5, 0.25, 0.25, 0.2, 0.2, 0.2], rtol=1e-7)


def test_plateau_off_when_patience_is_zero():
    assert optim.create_plateau(config_with(**{"plateau.patience": 0})) is None


def clip_config(**overrides):
    """Plain SGD at lr 1 with gradient clipping at global norm 1: updates are -clipped grads."""
    c = configs.get("default")
    c.update({"optimizer": "sgd", "momentum": 0.0, "nesterov": False, "weight_decay": 0.0})
    c.update({"schedule": "constant", "learning_rate": 1.0, "grad_clip_norm": 1.0})
    c.update(overrides)
    return c


PARAMS = {"a": jnp.ones(4), "b": jnp.ones(4)}
GRADS = {"a": jnp.full(4, 3.0), "b": jnp.full(4, 4.0)}  # norms 6 and 8, global norm 10


def test_grad_clip_norm_is_global_across_finetune_groups():
    # finetune_lr_factor 1: only the clipping could tell the groups apart. One clip over the
    # global norm 10 scales every gradient by 1/10 (each group clipped on its own would give
    # -0.5 everywhere: a global norm of sqrt(2)).
    tx, _ = optim.create_optimizer(clip_config(finetune="^a", finetune_lr_factor=1.0), 10)
    updates, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(updates["a"], -0.3, rtol=1e-6)
    np.testing.assert_allclose(updates["b"], -0.4, rtol=1e-6)


def test_grad_clip_norm_ignores_frozen_gradients():
    # "a" frozen: its zero update takes no share of the norm; "b" alone (norm 8) is clipped to 1.
    tx, _ = optim.create_optimizer(clip_config(freeze="^a"), 10)
    updates, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    np.testing.assert_array_equal(updates["a"], 0.0)
    np.testing.assert_allclose(updates["b"], -0.5, rtol=1e-6)
