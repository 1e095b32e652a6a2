"""One device mesh for every platform: the batch is sharded over a ``data`` axis, parameters and
optimizer state are replicated. One device is a mesh of one, so the same code runs everywhere."""

import os
from collections.abc import MutableMapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnnjax.errors import ConfigError

DATA_AXIS = "data"
# XLA:CPU launches every device's program on one thread pool and runs it on another, both
# ``max(cores, devices)`` threads. With fake devices (--xla_force_host_platform_device_count=N)
# on few cores, all launch threads can end up blocked (waiting for the inputs of a later step,
# or for a device's in-flight slot) while one device's launch of the step that holds the
# gradient all-reduce still waits for a thread: the other devices wait in the all-reduce
# until XLA aborts the process (experiments/README.md, "Fake CPU devices"). XLA sizes both pools
# from ``NPROC`` when set; this many threads per device leaves launch threads free.
CPU_THREADS_PER_FAKE_DEVICE = 4


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


def fake_cpu_devices(xla_flags: str) -> int:
    """The ``--xla_force_host_platform_device_count`` of an ``XLA_FLAGS`` value (1 if absent)."""
    count = 1
    for token in xla_flags.split():
        name, _, value = token.lstrip("-").partition("=")
        if name == "xla_force_host_platform_device_count" and value.isdigit():
            count = int(value)
    return count


def size_cpu_thread_pools(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Sets ``NPROC`` (XLA:CPU's thread-pool size) to ``CPU_THREADS_PER_FAKE_DEVICE`` threads per
    fake CPU device, at least the core count, so that fake devices cannot starve each other's
    launches into an all-reduce timeout. Must run before JAX creates its backends; a ``NPROC``
    already set is left alone.

    Returns:
      The ``NPROC`` value set, or None when nothing was changed (one device, or NPROC given).
    """
    environ = os.environ if environ is None else environ
    devices = fake_cpu_devices(environ.get("XLA_FLAGS", ""))
    if devices <= 1 or "NPROC" in environ:
        return None
    environ["NPROC"] = str(max(os.cpu_count() or 1, CPU_THREADS_PER_FAKE_DEVICE * devices))
    return environ["NPROC"]
