"""Platform logic of the harness and the test suite, checked on CPU for every platform: which
platform JAX will pick, which XLA flags each jaxlib accepts, deterministic mode, C++ log level,
the suite's device memory and precision settings, and the torchvision shim's two branches.

The logic is pure (backend name and jaxlib version in, flags and variables out); the few
subprocess tests prove what a pure function cannot: that this jaxlib accepts every flag the
table says it does (an unknown one aborts), and that ``--config.deterministic=True`` reaches
``XLA_FLAGS`` through the harness before JAX starts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAKE_CPU_DEVICES, suite_environment, suite_xla_flags

from cnnjax import cli

ROOT = Path(__file__).resolve().parents[1]
V0_10, V0_11, V0_12 = (0, 10, 2), (0, 11, 2), (0, 12, 0, 1)


def _child_env(**extra) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


# ------------------------------------------------------------------ versions and flag support


def test_parse_version():
    assert cli.parse_version("0.11.2") == (0, 11, 2)
    assert cli.parse_version("0.12.0.1") == (0, 12, 0, 1)
    assert cli.parse_version("0.10.2.dev20260101") == (0, 10, 2)
    assert cli.parse_version("0.11.0rc1") == (0, 11, 0)
    assert cli.jaxlib_version() >= (0, 10)


def test_fusion_emitter_flag_is_left_out_from_jaxlib_0_11():
    name = "xla_cpu_use_fusion_emitters"
    assert cli.flag_accepted(name, V0_10) and cli.flag_accepted(name, (0, 10, 0))
    assert not cli.flag_accepted(name, V0_11) and not cli.flag_accepted(name, V0_12)
    assert not cli.flag_accepted("xla_gpu_deterministic_ops", (0, 9, 0))  # before the range
    assert cli.flag_accepted("xla_force_host_platform_device_count", V0_12)
    chosen = {name: "false", "xla_llvm_disable_expensive_passes": "true", "own_flag": "1"}
    assert cli.supported_flags(chosen, V0_11) == {
        "xla_llvm_disable_expensive_passes": "true",
        "own_flag": "1",  # not in the table: the caller's own, kept
    }


def test_every_flag_cnnjax_sets_is_in_the_support_table():
    ours = {name for flags in cli.DEFAULT.values() for name in flags}
    ours |= {name for p in ("cpu", "cuda", "rocm", "tpu") for name in cli.deterministic_flags(p)}
    ours |= {name for p in ("cpu", "cuda") for name in suite_xla_flags(p, V0_10)}
    assert ours <= cli.FLAG_SUPPORT.keys(), ours - cli.FLAG_SUPPORT.keys()


# ------------------------------------------------------------------------ platform detection


@pytest.mark.parametrize(
    "name, platform",
    [
        ("xla_cuda12", "cuda"),
        ("xla_cuda13", "cuda"),
        ("cuda", "cuda"),
        ("gpu", "cuda"),
        ("xla_rocm7", "rocm"),
        ("rocm", "rocm"),
        ("libtpu", "tpu"),
        ("tpu", "tpu"),
        ("xla_metal", None),
    ],
)
def test_plugin_platform_by_name(name, platform):
    assert cli.plugin_platform(name) == platform


def test_target_platform_env_decides_then_plugins():
    cuda = ["xla_cuda13", "xla_cuda13"]  # entry point and namespace module: found twice
    assert cli.target_platform({}, []) == "cpu"
    assert cli.target_platform({}, cuda) == "cuda"
    assert cli.target_platform({}, ["libtpu"]) == "tpu"
    assert cli.target_platform({}, ["xla_rocm7"]) == "rocm"
    assert cli.target_platform({}, ["xla_metal"]) == "accelerator"  # unknown: no flags
    assert cli.target_platform({"JAX_PLATFORMS": "cpu"}, cuda) == "cpu"
    assert cli.target_platform({"JAX_PLATFORMS": " CUDA ,cpu"}, []) == "cuda"
    assert cli.target_platform({"JAX_PLATFORMS": "gpu"}, cuda) == "cuda"
    assert cli.target_platform({"JAX_PLATFORMS": "gpu"}, ["xla_rocm7"]) == "rocm"
    assert cli.target_platform({"JAX_PLATFORMS": ""}, ["libtpu"]) == "tpu"


def test_a_gpu_entry_of_the_table_applies_to_a_cuda_plugin():
    """The bug this replaces: any plugin was "accelerator", so a "cuda" entry never applied."""
    table = {"cpu": {}, "cuda": {"xla_gpu_enable_latency_hiding_scheduler": "true"}}
    platform = cli.target_platform({}, ["xla_cuda13"])
    assert cli.xla_flags_for(platform, V0_11, table=table) == table["cuda"]


# ------------------------------------------------------------------- flags per platform


def test_default_flags_per_platform_and_jaxlib():
    assert cli.xla_flags_for("cpu", V0_10) == cli.CPU_FLAGS
    assert cli.xla_flags_for("cpu", V0_12) == cli.CPU_FLAGS
    assert cli.xla_flags_for("cpu", (0, 9, 9)) == {}  # older than any verified jaxlib
    for platform in ("cuda", "rocm", "tpu", "accelerator"):
        assert cli.xla_flags_for(platform, V0_11) == {}  # nothing measured there yet


def test_deterministic_flags_per_platform():
    gpu = {"xla_gpu_deterministic_ops": "true"}
    assert cli.deterministic_flags("cuda") == cli.deterministic_flags("rocm") == gpu
    assert cli.deterministic_flags("cpu") == cli.deterministic_flags("tpu") == {}
    assert cli.xla_flags_for("cuda", V0_11, deterministic=True) == gpu
    assert cli.xla_flags_for("cpu", V0_11, deterministic=True) == cli.CPU_FLAGS
    assert cli.missing_deterministic_flags("cuda", "--xla_dump_to=/d") == gpu
    assert cli.missing_deterministic_flags("cuda", "--xla_gpu_deterministic_ops=false") == gpu
    assert cli.missing_deterministic_flags("cuda", "--xla_gpu_deterministic_ops=TRUE") == {}
    assert cli.missing_deterministic_flags("cpu", "") == {}


def test_configure_xla_deterministic_on_gpu_keeps_the_users_entry(monkeypatch):
    monkeypatch.setattr(cli, "backend_initialized", lambda: False)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/d")
    assert cli.configure_xla(deterministic=True) == (
        "--xla_dump_to=/tmp/d --xla_gpu_deterministic_ops=true"
    )
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=false")
    assert cli.configure_xla(deterministic=True) == "--xla_gpu_deterministic_ops=false"
    monkeypatch.setenv("XLA_FLAGS", "")
    assert cli.configure_xla(deterministic=False) is None and os.environ["XLA_FLAGS"] == ""


def test_native_log_level_quiet_unless_the_user_chose():
    assert cli.native_log_level({}, verbose=False) == "2"
    assert cli.native_log_level({"TF_CPP_MIN_LOG_LEVEL": "1"}, False) == "2"  # jax's default
    assert cli.native_log_level({"TF_CPP_MIN_LOG_LEVEL": "0"}, False) is None
    assert cli.native_log_level({"TF_CPP_MIN_LOG_LEVEL": "3"}, False) is None
    assert cli.native_log_level({}, verbose=True) is None


def test_requested_determinism_reads_the_tools_config():
    from ml_collections import ConfigDict

    class Flag:
        def __init__(self, value):
            self.value = value

    assert not cli.requested_determinism({})  # a tool without --config
    assert not cli.requested_determinism({"config": Flag(ConfigDict({"seed": 0}))})
    assert not cli.requested_determinism({"config": Flag(ConfigDict({"deterministic": False}))})
    assert cli.requested_determinism({"config": Flag(ConfigDict({"deterministic": True}))})


# ------------------------------------------------------------------------- the test suite


def test_suite_environment_on_cpu_per_jaxlib():
    env = suite_environment("cpu", V0_10, {"XLA_FLAGS": "--xla_dump_to=/d"})
    assert env == {
        "XLA_FLAGS": "--xla_dump_to=/d --xla_force_host_platform_device_count=4 "
        "--xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
    }
    env = suite_environment("cpu", V0_11, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert env["XLA_FLAGS"] == (  # ours replace the same name: the tests count on 4 devices
        "--xla_force_host_platform_device_count=4 --xla_llvm_disable_expensive_passes=true"
    )


def test_suite_environment_on_gpu():
    env = suite_environment("cuda", V0_11, {}, workers=2)
    assert env == {
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={FAKE_CPU_DEVICES} "
        "--xla_gpu_deterministic_ops=true",
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "XLA_CLIENT_MEM_FRACTION": "0.450",
    }
    assert "XLA_CLIENT_MEM_FRACTION" not in suite_environment("cuda", V0_11, {}, workers=1)
    user = {"XLA_PYTHON_CLIENT_MEM_FRACTION": ".3", "XLA_PYTHON_CLIENT_PREALLOCATE": "true"}
    env = suite_environment("cuda", V0_11, user, workers=2)  # the user's settings win
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true" and "XLA_CLIENT_MEM_FRACTION" not in env
    tpu = suite_environment("tpu", V0_11, {}, workers=2)
    assert tpu["JAX_DEFAULT_MATMUL_PRECISION"] == "highest" and "PREALLOCATE" not in str(tpu)


# ----------------------------------------------------------- this jaxlib, in fresh processes

_RUN_ONE_OP = "import jax.numpy as jnp; print(float(jnp.ones((2, 2)).sum()))"


def test_this_jaxlib_accepts_every_flag_the_table_says_it_does():
    """One process with every accepted flag of FLAG_SUPPORT (GPU ones included: XLA has one flag
    registry for all backends) runs an op; an unknown flag aborts, so the check is real."""
    values = {
        "xla_force_host_platform_device_count": "2",
        "xla_llvm_disable_expensive_passes": "true",
        "xla_cpu_use_fusion_emitters": "false",
        "xla_cpu_experimental_ynn_fusion_type": cli.CPU_FLAGS[
            "xla_cpu_experimental_ynn_fusion_type"
        ],
        "xla_disable_hlo_passes": cli.CPU_FLAGS["xla_disable_hlo_passes"],
        "xla_gpu_deterministic_ops": "true",
        "xla_gpu_enable_latency_hiding_scheduler": "true",
        "xla_gpu_enable_triton_gemm": "false",
        "xla_gpu_autotune_level": "0",
    }
    assert values.keys() == cli.FLAG_SUPPORT.keys()
    accepted = cli.supported_flags(values, cli.jaxlib_version())
    flags = " ".join(f"--{k}={v}" for k, v in accepted.items())
    runs = {
        "accepted": subprocess.Popen(
            [sys.executable, "-c", _RUN_ONE_OP],
            env=_child_env(JAX_PLATFORMS="cpu", XLA_FLAGS=flags),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ),
        "unknown": subprocess.Popen(
            [sys.executable, "-c", _RUN_ONE_OP],
            env=_child_env(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_no_such_flag_here=1"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ),
    }  # fmt: skip
    out = {k: (p.communicate(timeout=300), p.returncode) for k, p in runs.items()}
    (stdout, stderr), status = out["accepted"]
    assert status == 0 and stdout.split()[-1] == "4.0", stderr[-2000:]
    assert out["unknown"][1] != 0


_TOOL = """
import os
from ml_collections import config_flags
from cnnjax import cli, configs

config_flags.DEFINE_config_file("config", configs.resolve("default"), "", lock_config=False)

def main(argv):
    print("XLA_FLAGS=" + os.environ.get("XLA_FLAGS", ""))
    print("TF_CPP_MIN_LOG_LEVEL=" + os.environ["TF_CPP_MIN_LOG_LEVEL"])
    from cnnjax import cli
    assert not cli.backend_initialized()

cli.run(main)
"""


@pytest.mark.slow
def test_config_deterministic_reaches_xla_flags_before_jax_starts():
    """``--config.deterministic=True`` on a CUDA target adds the GPU flag in prepare_process
    (JAX_PLATFORMS=cuda: nothing starts a backend here); without it, or on CPU, it does not."""
    cases = {
        ("cuda", True): "--xla_gpu_deterministic_ops=true",
        ("cuda", False): "",
        ("cpu", True): cli.merge_flags("", cli.CPU_FLAGS),
    }
    procs = {
        case: subprocess.Popen(
            [sys.executable, "-c", _TOOL, f"--config.deterministic={case[1]}"],
            env=_child_env(JAX_PLATFORMS=case[0], XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="1"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        for case in cases
    }  # fmt: skip
    for case, expected in cases.items():
        stdout, stderr = procs[case].communicate(timeout=300)
        assert procs[case].returncode == 0, stderr[-2000:]
        lines = dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)
        assert lines["XLA_FLAGS"] == expected, (case, stdout)
        assert lines["TF_CPP_MIN_LOG_LEVEL"] == cli.QUIET_CPP_LOG_LEVEL


# --------------------------------------------------------------------- the torchvision shim

_SHIM = """
import glob, importlib.util, os, sys, torch
sys.path.insert(0, {tests!r})
package = importlib.util.find_spec("torchvision").submodule_search_locations[0]
try:  # torchvision's compiled operators: they load against a CUDA torch, not against this one
    torch.ops.load_library(glob.glob(os.path.join(package, "_C*.so"))[0])
    real = True
except (OSError, IndexError):
    real = False
if {simulate} and not real:  # what the compiled library does where it loads: define the schemas
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
import torchvision_models
tv = torchvision_models.import_torchvision()
print(torchvision_models._LIBRARY is not None, real, tv.models.resnet18().fc.out_features)
"""


@pytest.mark.slow
def test_torchvision_shim_imports_plainly_where_the_operators_load():
    """Where torchvision's operators are registered (on a CUDA torch; simulated here by defining
    their schemas first, as its compiled library does), the shim defines nothing: defining them
    before the import is what aborted on the GPU machine. Where they are not (this CPU torch),
    it falls back to the schema trick and torchvision still imports."""
    tests = str(ROOT / "tests")
    procs = {
        simulate: subprocess.Popen(
            [sys.executable, "-c", _SHIM.format(tests=tests, simulate=simulate)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for simulate in (True, False)
    }  # fmt: skip
    for simulate, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
        defined, real, classes = stdout.split()
        assert defined == str(not (simulate or real == "True")) and classes == "1000", stdout
