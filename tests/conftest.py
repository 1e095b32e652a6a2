"""Test-wide setup, made before JAX starts, for whatever device the machine has; shared fixtures.

- Every platform: 4 fake CPU devices (``--xla_force_host_platform_device_count``, a host-platform
  flag that XLA's GPU and TPU builds accept as well). Tests that need several devices take them
  as ``jax.devices("cpu")``; on a CPU machine those are the default devices, as before.
- CPU: compile options that cut XLA:CPU compile time for test-sized graphs, where this jaxlib
  knows them.
- GPU (and TPU): the device-independent tests run on the accelerator with float32 at full
  precision and, on GPU, deterministic ops and no memory preallocation (``suite_environment``).

The platform comes from ``cli.target_platform`` (``JAX_PLATFORMS`` or the installed plugin), the
flags from ``cli.FLAG_SUPPORT``: a flag this jaxlib does not know would abort every test process.
"""

import os

# Before anything imports jax, whose import puts "1" there: C++ errors only.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from cnnjax import cli  # noqa: E402  (imports jax; starts no backend)

FAKE_CPU_DEVICES = 4
# Compile-time savers for XLA:CPU. (Adding --xla_backend_optimization_level=0 to these two made
# the 4-device train step disagree with the 1-device one on jaxlib 0.10.2: left out.)
CPU_TEST_FLAGS = {
    "xla_llvm_disable_expensive_passes": "true",
    "xla_cpu_use_fusion_emitters": "false",  # jaxlib < 0.11 only (cli.FLAG_SUPPORT)
}
# What the GPU leaves to each of N xdist workers when they share it: 90% of its memory, split.
GPU_SHARE = 0.9
_MEMORY_FRACTION_VARS = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")


def suite_xla_flags(platform: str, jaxlib: cli.Version) -> dict[str, str]:
    """The XLA flags of the test suite on ``platform`` under ``jaxlib``.

    On GPU the deterministic flags as well: the tests that check bit-identical results (resume,
    a step traced once, evaluate agreeing exactly with the trainer) run in this process, on the
    default device, and XLA:GPU's autotuned algorithms are not identical run to run otherwise.
    """
    chosen = {"xla_force_host_platform_device_count": str(FAKE_CPU_DEVICES)}
    chosen.update(CPU_TEST_FLAGS if platform == "cpu" else cli.deterministic_flags(platform))
    return cli.supported_flags(chosen, jaxlib)


def suite_environment(
    platform: str, jaxlib: cli.Version, environ: dict, workers: int = 1
) -> dict[str, str]:
    """The environment variables the test suite sets (a pure function of its inputs).

    - ``XLA_FLAGS``: ``suite_xla_flags`` after the user's own entries, replacing any entry of
      the same name (the tests count on 4 fake devices).
    - GPU memory: ``XLA_PYTHON_CLIENT_PREALLOCATE=false``, so that several xdist workers (each
      a process with its own JAX) do not each try to take 75% of the GPU at start, and with N > 1
      workers ``XLA_CLIENT_MEM_FRACTION`` = 0.9 / N, each worker's ceiling. A variable the user
      set is left as it is (and neither fraction is set when the user set one: jaxlib refuses
      both names at once).
    - Float32 precision off CPU: ``JAX_DEFAULT_MATMUL_PRECISION=highest``. The tests hold float32
      results to float32 rounding (from-scratch convolutions against lax, torchvision's logits
      within 1e-4, sharded against single-device steps). XLA's default precision runs float32
      dots and convolutions as TF32 on NVIDIA GPUs (a 10-bit mantissa, ~1e-3 relative) and as
      bf16 passes on TPUs; "highest" gives float32 back, so the same derived tolerances hold on
      every device. The tests check semantics; GPU speed at default precision is measured by
      experiments/gpu_check.sh.

    Args:
      platform: ``cli.target_platform()``.
      jaxlib: the jaxlib version.
      environ: the current environment (read only).
      workers: the number of xdist workers sharing the machine (1 without xdist).
    """
    ours = suite_xla_flags(platform, jaxlib)
    user = environ.get("XLA_FLAGS", "").split()
    kept = [t for t in user if t.lstrip("-").partition("=")[0] not in ours]
    env = {"XLA_FLAGS": " ".join([*kept, *(f"--{k}={v}" for k, v in ours.items())])}
    if platform != "cpu":
        env["JAX_DEFAULT_MATMUL_PRECISION"] = environ.get("JAX_DEFAULT_MATMUL_PRECISION", "highest")
    if platform in ("cuda", "rocm"):
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        if workers > 1 and not any(k in environ for k in _MEMORY_FRACTION_VARS):
            env["XLA_CLIENT_MEM_FRACTION"] = f"{GPU_SHARE / workers:.3f}"
    return env


PLATFORM = cli.target_platform()
os.environ.update(
    suite_environment(
        PLATFORM,
        cli.jaxlib_version(),
        dict(os.environ),
        int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")),
    )
)
if PLATFORM != "cpu":
    import jax  # noqa: E402

    # The environment variable is read when jax is imported, which cnnjax.cli already did.
    jax.config.update("jax_default_matmul_precision", os.environ["JAX_DEFAULT_MATMUL_PRECISION"])

import pytest  # noqa: E402

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="session")
def fmnist_data_dir(tmp_path_factory):
    """A TFDS data_dir with the real Fashion-MNIST prepared offline from the Debian files."""
    if not os.path.isdir(DEBIAN_FASHION_MNIST):
        pytest.fail(
            f"{DEBIAN_FASHION_MNIST} is missing: apt-get install dataset-fashion-mnist "
            "(.ci/run installs it)"
        )
    from cnnjax.data import tfds as tfds_lib

    data_dir = tmp_path_factory.mktemp("tfds")
    tfds_lib.builder("fashion_mnist", str(data_dir))
    return str(data_dir)


@pytest.fixture
def tiny_config(fmnist_data_dir):
    """The ``tiny`` preset reading the offline Fashion-MNIST."""
    from cnnjax import configs

    config = configs.get("tiny")
    config.data.data_dir = fmnist_data_dir
    return config


def variant(config, **overrides):
    """A copy of ``config`` with ``overrides`` (dotted keys reach into groups: "model.name")."""
    c = config.copy_and_resolve_references()
    c.update_from_flattened_dict(overrides)
    return c


def assert_one_line_error(result, *fragments):
    """A finished subprocess that failed with exit status 2 and one ``error:`` line holding
    every fragment, and no traceback."""
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
