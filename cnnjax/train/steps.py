"""Pure, unjitted train and eval steps. ``loop.py`` jits each exactly once.

A batch is a dict: ``image`` (N, H, W, C) already normalised, ``label`` (N,) int32, and for
evaluation ``mask`` (N,) marking real examples (padding fills the last batch). Metrics are sums
(``loss``, ``correct``, ``count``) so they add up exactly across steps and devices; divide by
``count`` once, on the host, when they are logged.
"""

import jax
import jax.numpy as jnp
import optax

from cnnjax.run.state import frozen_batch_norm


def normalize(images, mean, std, dtype=jnp.float32):
    """uint8 (N, H, W, C) -> ``dtype`` images with per-channel zero mean and unit variance."""
    x = images.astype(jnp.float32) / 255.0
    return ((x - mean) / std).astype(dtype)


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Per-example softmax cross-entropy. logits (N, K); labels (N,) int or (N, K) soft."""
    if labels.ndim == 1:
        labels = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        labels = optax.smooth_labels(labels, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)


def metric_sums(logits, labels, loss, weights=None) -> dict:
    """Summed loss, number correct and example count over the (weighted) batch."""
    weights = jnp.ones(loss.shape, jnp.float32) if weights is None else weights
    hard = labels if labels.ndim == 1 else jnp.argmax(labels, -1)
    correct = (jnp.argmax(logits, -1) == hard).astype(jnp.float32)
    return {
        "loss": jnp.sum(loss * weights),
        "correct": jnp.sum(correct * weights),
        "count": jnp.sum(weights),
    }


# ``stop_step`` of a step the run need not stop at (the min over steps keeps the first real one).
NO_STEP = jnp.iinfo(jnp.int32).max


def all_finite(tree) -> jax.Array:
    """Whether every entry of every leaf is finite: ``optax.apply_if_finite``'s test."""
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def loss_and_grads(state, batch, key, label_smoothing: float, accum_steps: int = 1):
    """Gradients of the mean loss on ``batch``, with ``(loss (N,), logits (N, K), updates)``:
    per-example losses, the logits and the new BatchNorm statistics (training mode).

    With ``accum_steps`` = A > 1 the batch is taken as A micro-batches of N / A examples, run
    one after the other (``lax.scan``: the activations of one micro-batch at a time), and the
    gradient is the mean of theirs: the big batch's own gradient up to rounding, except that
    BatchNorm normalises each micro-batch with its own statistics and updates its running
    statistics once per micro-batch (A momentum updates per optimizer step).
    """
    step_key = jax.random.fold_in(key, state.step)
    if accum_steps == 1:
        return micro_batch_grads(state, state.batch_stats, batch, step_key, label_smoothing)
    # Micro-batch j takes examples j, j + A, j + 2A, ...: every device holds an equal part of
    # each (the batch is sharded in contiguous blocks), so all of them work on every one.
    micro = jax.tree.map(lambda a: a.reshape(-1, accum_steps, *a.shape[1:]).swapaxes(0, 1), batch)

    def accumulate(carry, xs):
        grads_sum, stats = carry
        j, micro_batch = xs
        key_j = jax.random.fold_in(step_key, j)  # a dropout mask of its own per micro-batch
        grads, (loss, logits, updates) = micro_batch_grads(
            state, stats, micro_batch, key_j, label_smoothing
        )
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        return (grads_sum, updates.get("batch_stats", stats)), (loss, logits)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    xs = (jnp.arange(accum_steps), micro)
    (grads_sum, stats), (loss, logits) = jax.lax.scan(accumulate, (zeros, state.batch_stats), xs)
    grads = jax.tree.map(lambda g: g / accum_steps, grads_sum)
    unmix = lambda a: a.swapaxes(0, 1).reshape(-1, *a.shape[2:])  # back to the batch's order
    updates = {"batch_stats": stats} if stats else {}
    return grads, (unmix(loss), unmix(logits), updates)


def micro_batch_grads(state, batch_stats, batch, key, label_smoothing: float):
    """``loss_and_grads`` of one (micro-)batch from BatchNorm statistics ``batch_stats``, with
    dropout drawn from ``key``."""
    rngs = {"dropout": key}

    def loss_fn(params):
        variables = {"params": params, "batch_stats": batch_stats}
        with frozen_batch_norm(state.frozen):
            logits, updates = state.apply_fn(
                variables, batch["image"], train=True, mutable=["batch_stats"], rngs=rngs
            )
        loss = cross_entropy(logits, batch["label"], label_smoothing)
        return jnp.mean(loss), (loss, logits, updates)

    return jax.grad(loss_fn, has_aux=True)(state.params)


def train_step(
    state,
    batch,
    key,
    *,
    label_smoothing: float = 0.0,
    skip_nonfinite: int = 0,
    accum_steps: int = 1,
):
    """One optimizer step on ``batch``; returns ``(new_state, metrics)``.

    ``metrics``: the step's metric sums (zero when its loss or gradients are not all finite, so
    an epoch's means stay those of its finite steps) and ``stop_step``: this step's number
    (``new_state.step``) if the run must stop at it, else ``NO_STEP``. It must stop at a step
    whose loss or gradients are not finite; with ``skip_nonfinite`` = N > 0 (the optimizer
    wrapped in ``optax.apply_if_finite`` with the same N, which drops such updates), at the N-th
    dropped update in a row instead. ``add_metrics`` accumulates steps, keeping the first stop.
    ``accum_steps`` > 1: the gradient is accumulated over that many micro-batches of ``batch``
    (``loss_and_grads``); it is still one step and one update.

    Randomness (dropout) comes from ``fold_in(key, state.step)``, so a resumed run replays the
    exact same keys.
    """
    grads, (loss, logits, updates) = loss_and_grads(state, batch, key, label_smoothing, accum_steps)
    finite = all_finite((loss, grads))
    new_state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
    if skip_nonfinite:
        stop = new_state.opt_state.notfinite_count >= skip_nonfinite
    else:
        stop = jnp.logical_not(finite)
    sums = metric_sums(logits, batch["label"], loss)
    sums = jax.tree.map(lambda x: jnp.where(finite, x, 0.0), sums)
    return new_state, {**sums, "stop_step": jnp.where(stop, new_state.step, NO_STEP)}


def add_metrics(acc: dict, metrics: dict) -> dict:
    """Train metrics of several steps as one: the sums add up, ``stop_step`` keeps the first."""
    return {
        k: jnp.minimum(a, metrics[k]) if k == "stop_step" else a + metrics[k]
        for k, a in acc.items()
    }


def predict_logits(state, images, *, flip_tta: bool = False):
    """Eval-mode logits (N, K): BatchNorm uses its running statistics, nothing is mutated, and
    the EMA weights are used when the state keeps them. ``flip_tta`` averages the logits of the
    images and their mirror images (test-time augmentation)."""
    variables = {"params": state.eval_params(), "batch_stats": state.batch_stats}
    logits = state.apply_fn(variables, images, train=False)
    if flip_tta:
        # jnp.flip lowers to one reverse; images[:, :, ::-1] also emits a gather, which becomes
        # a dynamic gather under an exported symbolic batch and which TFLite cannot convert.
        mirrored = jnp.flip(images, axis=2)
        logits = (logits + state.apply_fn(variables, mirrored, train=False)) / 2
    return logits


def eval_step(state, batch, *, flip_tta: bool = False):
    """Metric sums of the model on ``batch`` (eval mode), counting only ``mask``-ed examples,
    plus the ``confusion`` matrix (K, K): rows are true labels, columns predictions."""
    logits = predict_logits(state, batch["image"], flip_tta=flip_tta)
    loss = cross_entropy(logits, batch["label"])
    weights = batch["mask"].astype(jnp.float32)
    confusion = jnp.zeros((logits.shape[-1],) * 2, jnp.float32)
    confusion = confusion.at[batch["label"], jnp.argmax(logits, -1)].add(weights)
    return {**metric_sums(logits, batch["label"], loss, weights), "confusion": confusion}
