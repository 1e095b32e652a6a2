"""Multi-process runs: ``jax.distributed.initialize`` from flags or from the cluster.

Every process runs the same ``python -m cnnjax.train``; together they see one global device
mesh (``parallel.make_mesh``). JAX must learn about the other processes before it creates its
backends, so the process harness (``cli.prepare_process``) calls ``initialize_from_flags`` right
after setting the XLA flags, in the tools that define these flags (``cnnjax.train``).

When it initialises (``decide``):

* ``--coordinator_address``, ``--num_processes`` and ``--process_id`` given (what
  ``python -m cnnjax.launch`` passes): with those values;
* a SLURM step of several tasks (``srun``), an Open MPI job of several ranks (``mpirun``) or a
  Cloud TPU VM (``libtpu`` installed): ``jax.distributed.initialize()`` without arguments, and
  JAX reads the cluster's own variables (or the TPU metadata server);
* otherwise (a plain single process): not at all.

If a process dies, the coordination service notices after ``--heartbeat_timeout_s`` without a
heartbeat and ends every other process with a message naming the dead task (checked on CPU:
``tests/test_multiprocess.py``); a process that cannot reach the others gives up after
``--initialization_timeout_s``.
"""

import importlib.util
import os
from collections.abc import Mapping

from absl import flags

from cnnjax.errors import ConfigError

COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0, for a multi-process run (with --num_processes and --process_id).",
)
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
HEARTBEAT_TIMEOUT_S = flags.DEFINE_integer(
    "heartbeat_timeout_s",
    30,
    "Multi-process runs: a process silent this long is declared dead and the others exit.",
)
INITIALIZATION_TIMEOUT_S = flags.DEFINE_integer(
    "initialization_timeout_s", 300, "Multi-process runs: how long to wait for every process."
)
SHUTDOWN_TIMEOUT_S = 30  # how long a finishing process waits for the others at exit


def cluster_detected(environ: Mapping[str, str] | None = None) -> str | None:
    """The multi-process environment this process runs in, as JAX would detect it: "slurm",
    "ompi", "tpu", or None (a plain process, or a cluster job of one task).

    Only environment variables and installed packages are looked at (no network).
    """
    env = os.environ if environ is None else environ
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and _int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and _int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "ompi"
    if importlib.util.find_spec("libtpu") is not None and "TPU_SKIP_MDS_QUERY" not in env:
        return "tpu"
    return None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def decide(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    environ: Mapping[str, str] | None = None,
) -> dict | None:
    """The keyword arguments for ``jax.distributed.initialize`` (``{}``: let JAX detect the
    cluster), or None for a single process.

    Raises:
      ConfigError: the flags are given in part, or ``process_id`` is out of range.
    """
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    if all(v is None for v in given.values()):
        return {} if cluster_detected(environ) else None
    missing = [f"--{k}" for k, v in given.items() if v is None]
    if missing:
        raise ConfigError(
            "a multi-process run needs --coordinator_address, --num_processes and --process_id; "
            f"missing {', '.join(missing)} (or use python -m cnnjax.launch)"
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(
            f"--process_id={process_id} must be in 0..{num_processes - 1} "
            f"(--num_processes={num_processes})"
        )
    if ":" not in coordinator_address:
        raise ConfigError(f"--coordinator_address={coordinator_address!r} must be host:port")
    return given


def initialize(kwargs: dict, heartbeat_timeout_s: int = 30, initialization_timeout_s: int = 300):
    """``jax.distributed.initialize(**kwargs)`` with bounded timeouts; CPU collectives between
    processes go through gloo (``jax_cpu_collectives_implementation``)."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        **kwargs,
        initialization_timeout=initialization_timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
        shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
    )


def initialize_from_flags() -> bool:
    """Initialises JAX's distributed runtime when the flags or the cluster ask for it (see the
    module docstring). Returns whether it did."""
    kwargs = decide(COORDINATOR_ADDRESS.value, NUM_PROCESSES.value, PROCESS_ID.value)
    if kwargs is None:
        return False
    if HEARTBEAT_TIMEOUT_S.value < 1 or INITIALIZATION_TIMEOUT_S.value < 1:
        raise ConfigError("--heartbeat_timeout_s and --initialization_timeout_s must be >= 1")
    initialize(kwargs, HEARTBEAT_TIMEOUT_S.value, INITIALIZATION_TIMEOUT_S.value)
    return True
