"""train.parallel on the 4 fake CPU devices of conftest: the batch split over the ``data`` axis,
parameters replicated, batch sizes that do not split refused with a suggestion."""

import jax
import numpy as np
import pytest

from cnnjax import parallel
from cnnjax.errors import ConfigError


def test_mesh_spans_every_device_on_the_data_axis():
    mesh = parallel.make_mesh(jax.devices("cpu"))
    assert mesh.axis_names == (parallel.DATA_AXIS,) and mesh.devices.size == 4


def test_batch_is_split_and_params_are_replicated():
    mesh = parallel.make_mesh(jax.devices("cpu"))
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    split = jax.device_put(x, parallel.batch_sharding(mesh))
    copies = jax.device_put(x, parallel.replicated(mesh))
    assert [s.data.shape for s in split.addressable_shards] == [(2, 3)] * 4
    assert sorted(int(s.data[0, 0]) for s in split.addressable_shards) == [0, 6, 12, 18]
    assert all(np.array_equal(s.data, x) for s in copies.addressable_shards)


def test_host_batch_becomes_one_global_sharded_array():
    mesh = parallel.make_mesh(jax.devices("cpu"))
    batch = {"image": np.ones((8, 2, 2, 1), np.uint8), "label": np.arange(8, dtype=np.int32)}
    out = parallel.host_to_global(batch, mesh)
    assert out["label"].sharding == parallel.batch_sharding(mesh)
    np.testing.assert_array_equal(out["label"], batch["label"])
    assert out["image"].shape == (8, 2, 2, 1)


def test_batch_size_must_split_over_the_devices():
    mesh = parallel.make_mesh(jax.devices("cpu"))
    parallel.check_batch_size(8, mesh)
    with pytest.raises(ConfigError, match=r"batch_size=6 must be a positive multiple of the 4 .*"
                       r"--config.batch_size=4"):  # fmt: skip
        parallel.check_batch_size(6, mesh)
    with pytest.raises(ConfigError, match="data.eval_batch_size=0 must be a positive multiple"):
        parallel.check_batch_size(0, mesh, "data.eval_batch_size")
