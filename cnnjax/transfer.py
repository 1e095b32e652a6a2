"""Transfer learning: initialise a TrainState from another run's best checkpoint, by path."""

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import checkpoint
from cnnjax.errors import CheckpointError
from cnnjax.train_state import path_str

# Parameters under this prefix may change shape (a new classifier for another class count).
HEAD = "head/"


def read_pretrained(workdir) -> dict:
    """``{"params": ..., "batch_stats": ...}`` of another run's best checkpoint (its trained
    weights, not the EMA)."""
    try:
        run = checkpoint.load_run(workdir)
    except CheckpointError as e:
        raise CheckpointError(f"init_from: {e}") from None
    return {"params": run.state.params, "batch_stats": run.state.batch_stats}


def merge(fresh, pretrained, what: str):
    """``fresh`` with every leaf that ``pretrained`` has at the same path and shape.

    Leaves under ``head/`` whose shape differs keep their fresh values (a new head).

    Raises:
      CheckpointError: other paths are missing or differ in shape (listed in the message).
    """
    flat = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(pretrained)[0]}
    mismatched = []

    def pick(path, leaf):
        key = path_str(path)
        old = flat.get(key)
        if old is not None and np.shape(old) == leaf.shape:
            return np.asarray(old, leaf.dtype)
        if not key.startswith(HEAD):
            mismatched.append(f"{what}/{key}")
        return leaf

    merged = jax.tree_util.tree_map_with_path(pick, fresh)
    if mismatched:
        shown = ", ".join(mismatched[:8]) + (" ..." if len(mismatched) > 8 else "")
        raise CheckpointError(
            f"init_from: {len(mismatched)} parameter(s) do not match the pretrained run "
            f"(missing or other shape): {shown}; use a run of the same model"
        )
    return merged


def load_pretrained(state, workdir):
    """``state`` with params and batch_stats loaded from ``workdir``'s best checkpoint (the EMA
    too, when kept); optimizer state and step stay fresh."""
    pretrained = read_pretrained(workdir)
    params = merge(state.params, pretrained["params"], "params")
    stats = merge(state.batch_stats, pretrained["batch_stats"], "batch_stats")
    ema = None if state.ema_params is None else jax.tree.map(jnp.copy, params)  # not donated twice
    return state.replace(params=params, batch_stats=stats, ema_params=ema)
