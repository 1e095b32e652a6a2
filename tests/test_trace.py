"""cnnjax.tools.trace: one record per module call, own variables, kept outputs equal to Flax's
capture_intermediates."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cnnjax.nn.layers import BatchNorm
from cnnjax.tools.trace import recording, trace


class _Toy(nn.Module):
    """A conv, cnnjax's BatchNorm (its __call__ calls nn.BatchNorm's) and a Dense used twice."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), name="conv")(x)
        x = BatchNorm(train=train, name="bn")(x)
        dense = nn.Dense(4, name="shared")
        return dense(dense(x))


X = jax.ShapeDtypeStruct((2, 5, 5, 3), jnp.float32)


def test_calls_paths_shapes_and_own_variables():
    model = _Toy()
    variables, calls = trace(lambda x: model.init(jax.random.key(0), x), X)
    assert [c.path for c in calls] == ["conv", "bn", "shared", "shared", ""]  # root last
    conv, bn, shared, again, root = calls
    assert type(bn.module) is BatchNorm and type(root.module) is _Toy
    assert conv.inputs[0].shape == (2, 5, 5, 3) and conv.outputs.shape == (2, 5, 5, 4)
    assert conv.variables == {"params": 3 * 3 * 3 * 4 + 4}
    assert bn.variables == {"params": 8, "batch_stats": 8}  # scale, bias | mean, var
    assert shared.variables == again.variables == {"params": 4 * 4 + 4}
    assert root.variables == {"params": 0, "batch_stats": 0}  # all in submodules
    assert variables["params"]["conv"]["kernel"].shape == (3, 3, 3, 4)


def test_kept_outputs_equal_flax_capture_intermediates():
    """The first call's output of each kept layer is what Flax's own capture records."""
    model = _Toy()
    rng = np.random.default_rng(0)
    images = rng.normal(size=X.shape).astype(np.float32)
    # Values from numpy, positive (BatchNorm variances): compiling the initialisers costs seconds.
    abstract = jax.eval_shape(model.init, jax.random.key(0), images)
    variables = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), abstract)
    paths = []

    def both(variables, images):  # one compilation: op by op, this toy takes seconds
        with recording(keep={"bn", "shared"}) as calls:
            model.apply(variables, images)
        kept = [c for c in calls if c.value is not None]
        paths.extend(c.path for c in kept)
        _, state = model.apply(variables, images, capture_intermediates=True, mutable=True)
        return [c.value for c in kept], state["intermediates"]

    values, intermediates = jax.jit(both)(variables, images)
    captured = traverse_util.flatten_dict(intermediates, sep="/")
    assert paths == ["bn", "shared", "shared"]
    np.testing.assert_array_equal(values[0], captured["bn/__call__"][0])
    for value, flax_value in zip(values[1:], captured["shared/__call__"], strict=True):
        np.testing.assert_array_equal(value, flax_value)
