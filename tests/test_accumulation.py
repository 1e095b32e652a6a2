"""Gradient accumulation (``config.grad_accum_steps``): A micro-batches make one update that
equals the big batch's to the rounding of a reassociated sum; BatchNorm sees each micro-batch;
an accumulating run resumes bit-identically."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import variant
from test_trainer import final_params

from cnnjax import models
from cnnjax.run.state import create_train_state
from cnnjax.train import loop, steps
from cnnjax.train import setup as setup_lib

EPS32 = float(np.finfo(np.float32).eps)


def batch(n=16, size=8, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "image": jax.random.normal(k1, (n, size, size, 1)),
        "label": jax.random.randint(k2, (n,), 0, 10),
    }


@pytest.mark.slow
def test_micro_batches_accumulate_to_the_big_batch_update():
    """simple_cnn has neither BatchNorm nor dropout, so A micro-batches compute the same
    exact gradient as one batch of A times their size; only the order of the sums differs."""
    model = models.get("simple_cnn", num_classes=10)
    tx = optax.sgd(1.0)  # the update is minus the gradient itself
    state = create_train_state(model, tx, jax.random.key(0), (8, 8, 1))
    data, key = batch(), jax.random.key(1)
    step = jax.jit(steps.train_step, static_argnames=("accum_steps",))
    big, big_metrics = step(state, data, key)
    accumulated, metrics = step(state, data, key, accum_steps=4)
    assert int(accumulated.step) == int(big.step) == 1  # one update either way

    # The bound: each gradient entry is the mean over the batch of per-example gradients, each
    # a sum over the kernel's output positions. Both ways sum the same n products (n = batch x
    # positions) in different orders, and a float32 sum of n terms is within (n - 1) eps of
    # the sum of their magnitudes (Higham, Accuracy and Stability, 4.2), bounded here by
    # the mean per-example |gradient| times the positions per example.
    def example_grads(image, label):
        one = {"image": image[None], "label": label[None]}
        return steps.loss_and_grads(state, one, key, 0.0)[0]

    per_example = jax.jit(jax.vmap(example_grads))(data["image"], data["label"])
    magnitude = jax.tree.map(lambda g: jnp.mean(jnp.abs(g), axis=0), per_example)
    n_terms = data["image"].shape[0] * data["image"][0].size  # batch x positions (an upper bound)
    deltas = jax.tree.map(lambda a, b: a - b, accumulated.params, big.params)
    bounds = jax.tree.map(lambda m: 2 * n_terms * EPS32 * m + 1e-30, magnitude)
    for delta, bound in zip(jax.tree.leaves(deltas), jax.tree.leaves(bounds), strict=True):
        assert np.all(np.abs(delta) <= bound)
    # The step's metric sums cover every example once.
    assert float(metrics["count"]) == float(big_metrics["count"]) == 16
    np.testing.assert_allclose(metrics["loss"], big_metrics["loss"], rtol=16 * EPS32)
    assert float(metrics["correct"]) == float(big_metrics["correct"])


class OneNorm(nn.Module):
    """A BatchNorm (momentum 0.9) and a dense head: its running mean is checkable by hand."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def test_batchnorm_normalises_and_updates_once_per_micro_batch():
    state = create_train_state(OneNorm(), optax.sgd(0.1), jax.random.key(0), (4, 4, 3))
    data = batch(n=12, size=4)
    # Examples with distinct means, so each micro-batch's mean differs from the batch's.
    data["image"] = jnp.tile(data["image"], (1, 1, 1, 3)) + jnp.arange(12.0)[:, None, None, None]
    new, _ = jax.jit(steps.train_step, static_argnames=("accum_steps",))(
        state, data, jax.random.key(1), accum_steps=3
    )
    # Micro-batch j holds examples j, j + 3, j + 6, j + 9; the running mean moves 3 times.
    expected = jnp.zeros(3)
    for j in range(3):
        expected = 0.9 * expected + 0.1 * data["image"][j::3].mean(axis=(0, 1, 2))
    got = new.batch_stats["BatchNorm_0"]["mean"]
    np.testing.assert_allclose(got, expected, rtol=16 * EPS32)


def test_micro_batches_must_split_over_the_devices(tiny_config, tmp_path):
    setup_lib.check_micro_batches(32, 2, 4)
    with pytest.raises(setup_lib.ConfigError, match="grad_accum_steps=3 times the 4 devices"):
        setup_lib.check_micro_batches(32, 3, 4)
    # Refused before anything is written to the workdir.
    with pytest.raises(setup_lib.ConfigError, match="grad_accum_steps=3 times the 4 devices"):
        loop.train_and_evaluate(variant(tiny_config, grad_accum_steps=3), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_accumulating_run_resumes_bit_identically(tiny_config, tmp_path):
    """Accumulation happens inside one jitted step, so a checkpoint (or a preemption or kill,
    which resume from one) never holds half an accumulation: resuming replays whole steps."""
    config = variant(tiny_config, grad_accum_steps=2, **{"data.limit_examples": 128})
    loop.train_and_evaluate(config, tmp_path / "straight")
    first = variant(config, num_epochs=1)
    loop.train_and_evaluate(first, tmp_path / "resumed")
    loop.train_and_evaluate(config, tmp_path / "resumed")
    a, meta_a = final_params(config, tmp_path / "straight")
    b, meta_b = final_params(config, tmp_path / "resumed")
    assert meta_a["step"] == meta_b["step"] == 8  # 2 epochs of 4 updates, not 16 micro-steps
    jax.tree.map(np.testing.assert_array_equal, a, b)
