"""cnnjax.cli, the process harness, and the command-line tools as a user runs them: XLA_FLAGS
merging (the user's entries win), the compilation cache, one-line errors, and a SIGKILLed run
that resumes to exactly the parameters of an uninterrupted one.

The harness tests are pure string/env logic and never start a JAX backend here, except one that
starts a fresh python to prove this jaxlib accepts the flags (an unknown flag aborts)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import assert_one_line_error

from cnnjax import cli
from cnnjax.run import checkpoint


def run_cli(module, *args, cwd, timeout=600):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--config.model=resnet9000"], ["unknown model 'resnet9000'", "simple_cnn"]),
        (
            ["--config=nonexistent"],
            ["unknown config preset 'nonexistent'", "default, fashion_mnist_best"],
        ),
        (["--config.optimizer=adamax"], ["unknown optimizer 'adamax'", "adamw"]),
        (
            ["--config.dataset=kmnist", "--config.data.download=False"],
            ["dataset 'kmnist' is not prepared", "local_dir"],
        ),
    ],
)
def test_train_errors_are_one_line(tmp_path, args, fragments):
    data_dir = f"--config.data.data_dir={tmp_path / 'tfds'}"
    result = run_cli("cnnjax.train", "--config=tiny", f"--workdir={tmp_path / 'w'}", data_dir,
                     *args, cwd=tmp_path)  # fmt: skip
    assert_one_line_error(result, *fragments)


_INTERRUPTED_CHILD = """
from cnnjax import cli
def main(argv):
    raise KeyboardInterrupt  # what Ctrl-C raises outside training's step loop
cli.run(main)
"""


def test_ctrl_c_outside_training_is_one_line_and_status_130(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-c", _INTERRUPTED_CHILD]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 128 + signal.SIGINT
    assert out.stderr.strip().splitlines() == [cli.INTERRUPTED]


def test_evaluate_on_a_non_run_directory(tmp_path):
    result = run_cli("cnnjax.evaluate", f"--workdir={tmp_path}", cwd=tmp_path)
    assert_one_line_error(result, "not a cnnjax run directory")


def test_killed_run_resumes_to_identical_parameters(tiny_config, fmnist_data_dir, tmp_path):
    from cnnjax.train import resume
    from cnnjax.train import setup as setup_lib

    args = ["--config=tiny", f"--config.data.data_dir={fmnist_data_dir}", "--config.num_epochs=3"]
    killed = tmp_path / "killed"
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "cnnjax.train", *args, f"--workdir={killed}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
    first_checkpoint = killed / "checkpoints" / "16"
    deadline = time.time() + 300
    while not first_checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first_checkpoint.exists()
    assert run_cli("cnnjax.train", *args, f"--workdir={killed}", cwd=tmp_path).returncode == 0

    # The reference runs in a subprocess too: the same XLA flags compile the same programs.
    straight = tmp_path / "straight"
    assert run_cli("cnnjax.train", *args, f"--workdir={straight}", cwd=tmp_path).returncode == 0
    config = tiny_config.copy_and_resolve_references()
    config.num_epochs = 3
    restored = []
    for workdir in (killed, straight):
        run = setup_lib.setup(config, workdir)
        state, meta = resume.restore(run, checkpoint.manager(workdir, read_only=True))
        assert meta["epoch"] == 3
        restored.append(jax.device_get(state.params))
    jax.tree.map(np.testing.assert_array_equal, *restored)


# ------------------------------------------------------------------ harness: XLA flags, cache


def test_parse_flags():
    parsed = cli.parse_xla_flags(" --a=1  --b --c=x,y=z -d=2 ")
    assert parsed == {"a": "1", "b": None, "c": "x,y=z", "d": "2"}
    assert cli.parse_xla_flags("") == {}


def test_merge_appends_missing_flags():
    merged = cli.merge_flags("--xla_dump_to=/tmp/d", {"x": "1", "y": "a,b"})
    assert merged == "--xla_dump_to=/tmp/d --x=1 --y=a,b"
    assert cli.merge_flags("", {"x": "1"}) == "--x=1"


def test_merge_keeps_the_users_entry():
    user = "--xla_cpu_experimental_ynn_fusion_type=dot --other"
    merged = cli.merge_flags(user, cli.CPU_FLAGS)
    assert merged == f"{user} --xla_disable_hlo_passes=cse_barrier_expander"
    assert cli.parse_xla_flags(merged)["xla_cpu_experimental_ynn_fusion_type"] == "dot"


def test_target_platform_from_env():
    assert cli.target_platform({"JAX_PLATFORMS": "cpu"}) == "cpu"
    assert cli.target_platform({"JAX_PLATFORMS": "cuda,cpu"}) == "cuda"


def test_configure_xla_sets_env_only_for_the_platform(monkeypatch):
    monkeypatch.setattr(cli, "backend_initialized", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    extra = {"cpu": {**cli.CPU_FLAGS, "xla_cpu_enable_fast_math": "false"}}
    merged = cli.configure_xla(extra)
    assert os.environ["XLA_FLAGS"] == merged
    assert merged == (
        "--xla_cpu_experimental_ynn_fusion_type=dot "
        "--xla_disable_hlo_passes=cse_barrier_expander --xla_cpu_enable_fast_math=false"
    )
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    monkeypatch.setenv("XLA_FLAGS", "")
    assert cli.configure_xla() is None
    assert os.environ["XLA_FLAGS"] == ""


def test_configure_xla_warns_after_backend_init(monkeypatch):
    monkeypatch.setattr(cli, "backend_initialized", lambda: True)
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.warns(UserWarning, match="after JAX initialised"):
        assert cli.configure_xla() is None
    assert os.environ["XLA_FLAGS"] == ""


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("CNNJAX_CACHE_DIR", raising=False)
    assert cli.cache_dir() == cli.Path("~/.cache/cnnjax/jax").expanduser()
    monkeypatch.setenv("CNNJAX_CACHE_DIR", str(tmp_path / "env"))
    assert cli.cache_dir() == tmp_path / "env"
    assert cli.cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_enable_compilation_cache_updates_config(tmp_path):
    import jax

    keys = [
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    ]
    before = {k: getattr(jax.config, k) for k in keys}
    try:
        path = cli.enable_compilation_cache(tmp_path / "cache", min_compile_time_secs=0.25)
        assert path.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.25
    finally:
        for k, v in before.items():
            jax.config.update(k, v)


_CHILD = """
import os, warnings
from cnnjax import cli
assert cli.configure_xla() is not None
import jax, jax.numpy as jnp
assert cli.backend_initialized() is False
x = jax.lax.conv_general_dilated(jnp.ones((1, 8, 8, 1)), jnp.ones((3, 3, 1, 2)), (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
assert cli.backend_initialized()
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    assert cli.configure_xla() is None
assert w, "no warning after backend init"
print(os.environ["XLA_FLAGS"], float(x.sum()))
"""


_ROOT = str(Path(__file__).resolve().parents[1])


def _child_env(**extra) -> dict[str, str]:
    """A fresh interpreter's environment that can import cnnjax from this checkout."""
    path = os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def test_flags_accepted_by_this_jaxlib():
    env = _child_env(JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    name = next(iter(cli.CPU_FLAGS))
    assert f"--{name}=" in out.stdout
    assert out.stdout.split()[-1] == "968.0"  # 2 channels x 484 (SAME 3x3 ones over 8x8 ones)


def test_import_has_no_side_effects():
    # cnnjax/__init__ imports jax; importing jax is fine, starting a backend is not.
    code = "import os; f = os.environ.get('XLA_FLAGS'); from cnnjax import cli; "
    code += "assert os.environ.get('XLA_FLAGS') == f and not cli.backend_initialized()"
    env = {k: v for k, v in _child_env().items() if k != "XLA_FLAGS"}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
