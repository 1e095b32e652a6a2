"""One device mesh for every platform: the batch is sharded over a ``data`` axis, parameters and
optimizer state are replicated. One device is a mesh of one, so the same code runs everywhere."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnnjax.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the ``data`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    """Raises a ConfigError unless ``batch_size`` splits evenly over the mesh and the processes."""
    n = mesh.devices.size
    if batch_size <= 0 or batch_size % n or batch_size % jax.process_count():
        raise ConfigError(
            f"{what}={batch_size} must be a positive multiple of the {n} device(s); "
            f"try --config.{what}={max(n, batch_size // n * n)}"
        )


def host_to_global(batch, mesh: Mesh):
    """This process's slice of a batch (a pytree of numpy arrays) -> global sharded arrays."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
