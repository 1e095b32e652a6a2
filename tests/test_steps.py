"""Train/eval steps: learning, no retracing, sharded == single device, eval semantics."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnjax import models, parallel
from cnnjax.run.state import create_train_state
from cnnjax.train import steps


def make_state(name="cifar_cnn", tx=None):
    model = models.get(name, num_classes=10)
    tx = optax.adam(1e-3) if tx is None else tx
    return create_train_state(model, tx, jax.random.key(0), (16, 16, 3))


def make_batch(seed=0, n=16):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "image": jax.random.normal(k1, (n, 16, 16, 3)),
        "label": jax.random.randint(k2, (n,), 0, 10),
    }


def test_loss_falls_on_a_fixed_batch():
    state, batch = make_state("simple_cnn"), make_batch()
    step = jax.jit(steps.train_step)
    losses = []
    for _ in range(30):
        state, m = step(state, batch, jax.random.key(1))
        losses.append(float(m["loss"] / m["count"]))
    assert losses[-1] < 0.2 * losses[0]
    assert int(state.step) == 30


def test_train_step_traces_once():
    state = make_state()
    step = jax.jit(chex.assert_max_traces(steps.train_step, n=1), donate_argnums=0)
    for i in range(4):
        state, _ = step(state, make_batch(i), jax.random.key(0))
    assert int(state.step) == 4


def test_batchnorm_stats_move_in_train_and_eval_is_pure():
    state, batch = make_state(), make_batch()
    new_state, _ = jax.jit(steps.train_step)(state, batch, jax.random.key(0))
    before = jax.tree.leaves(state.batch_stats)
    after = jax.tree.leaves(new_state.batch_stats)
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))
    logits1 = steps.predict_logits(new_state, batch["image"])
    logits2 = steps.predict_logits(new_state, batch["image"])
    np.testing.assert_array_equal(logits1, logits2)  # dropout off, stats frozen


def assert_within_ulps(actual, desired, ulps: float) -> None:
    """Every leaf of ``actual`` within ``ulps`` units of ``desired``'s largest magnitude (in its
    dtype's epsilon), so entries near zero are held to the scale of their leaf; integer leaves
    (the metrics' ``stop_step``) equal."""
    for (path, a), d in zip(
        jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(desired), strict=True
    ):
        a, d = np.asarray(a), np.asarray(d)
        if not np.issubdtype(d.dtype, np.floating):
            np.testing.assert_array_equal(a, d, err_msg=jax.tree_util.keystr(path))
            continue
        bound = ulps * np.finfo(d.dtype).eps * max(float(np.max(np.abs(d))), 1e-30)
        err = float(np.max(np.abs(a - d)))
        assert err <= bound, f"{jax.tree_util.keystr(path)}: {err:.3g} > {bound:.3g}"


def run_steps(mesh, num_steps: int, dtype=jnp.float32):
    """``num_steps`` SGD-momentum steps of cifar_cnn (BatchNorm, dropout) on ``mesh``, with the
    whole state (params and every buffer) in ``dtype``."""
    model = models.get("cifar_cnn", num_classes=10, dtype=dtype)
    state = create_train_state(model, optax.sgd(0.1, 0.9), jax.random.key(0), (16, 16, 3))
    cast = lambda x: (
        jnp.asarray(x, dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x
    )
    state = jax.device_put(jax.tree.map(cast, state), parallel.replicated(mesh))
    step = jax.jit(steps.train_step)
    for i in range(num_steps):
        batch = jax.tree.map(cast, make_batch(i))
        state, sums = step(state, jax.device_put(batch, parallel.batch_sharding(mesh)), KEY)
    return jax.device_get(
        {"params": state.params, "opt_state": state.opt_state, "stats": state.batch_stats}
    ), jax.device_get(sums)


KEY = jax.random.key(7)


def test_one_sharded_step_equals_single_device():
    """One step on 4 fake CPU devices vs 1: the same gradients, updated params, BatchNorm
    statistics and metric sums, up to the order of float32 additions.

    BatchNorm has no axis_name: XLA reduces its statistics over the global (sharded) batch; a
    per-device reduction (statistics of 4 of the 16 images) would be far off. After the first
    step the momentum trace in ``opt_state`` is the gradient itself (0.9 * 0 + g), so the state
    holds it.

    Tolerance: the two programs differ only in how the batch reductions are associated (four
    partial sums and an all-reduce vs one sum). Rounding errors of a reassociated sum of n terms
    add up like a random walk, about sqrt(n) ulps of the result's scale; the longest reduction
    here is a first-layer kernel gradient over 16 images x 16 x 16 positions, n = 4096, so 64
    ulps of each leaf's largest entry (measured: 14 on an AVX-512 EPYC).
    """
    cpus = jax.devices("cpu")
    assert len(cpus) == 4, "conftest sets 4 fake CPU devices"
    many = run_steps(parallel.make_mesh(cpus), 1)
    one = run_steps(parallel.make_mesh(cpus[:1]), 1)
    assert_within_ulps(many, one, ulps=np.sqrt(16 * 16 * 16))


def test_sharded_steps_equal_single_device_in_float64():
    """Three steps, 4 devices vs 1, computed in float64 throughout.

    In float32 this comparison is chaotic: SGD at lr 0.1 with momentum through BatchNorm on 16
    images amplifies a one-step rounding difference 18-35x per step, so three steps end 1e-4 to
    1e-3 apart, passing or failing by CPU generation. In float64 the same dynamics start from a
    one-step difference of at most 64 float64 ulps (as above) and grow at most 35x per step:
    64 * 35**3 ulps ~ 6e-10 of each leaf's scale, so 1e-9 (4.5e6 ulps) still separates
    reassociation from any real difference in semantics.
    """
    with jax.enable_x64(True):
        many = run_steps(parallel.make_mesh(jax.devices("cpu")), 3, jnp.float64)
        one = run_steps(parallel.make_mesh(jax.devices("cpu")[:1]), 3, jnp.float64)
    assert jax.tree.leaves(many)[0].dtype == np.float64
    assert_within_ulps(many, one, ulps=64 * 35**3)


def test_eval_step_counts_only_masked_examples():
    state, batch = make_state(), make_batch()
    mask = jnp.arange(16) < 10
    m = steps.eval_step(state, {**batch, "mask": mask})
    full = steps.eval_step(state, {**{k: v[:10] for k, v in batch.items()}, "mask": mask[:10]})
    chex.assert_trees_all_close(m, full, rtol=1e-5)
    assert float(m["count"]) == 10 and float(m["confusion"].sum()) == 10


def test_label_smoothing_and_soft_labels():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    hard = steps.cross_entropy(logits, jnp.array([0]))
    smooth = steps.cross_entropy(logits, jnp.array([0]), label_smoothing=0.3)
    soft = steps.cross_entropy(logits, jnp.array([[0.8, 0.1, 0.1]]))
    expected = -(
        0.8 * jax.nn.log_softmax(logits)[0, 0] + 0.1 * jax.nn.log_softmax(logits)[0, 1:].sum()
    )
    np.testing.assert_allclose(smooth, soft, rtol=1e-6)
    np.testing.assert_allclose(soft[0], expected, rtol=1e-6)
    assert float(smooth[0]) > float(hard[0])
