"""cnnjax.runtime: XLA_FLAGS merging (the user's entries win) and the compilation cache settings.

Everything but the last test is pure string/env logic and never starts a JAX backend here; the
last one starts a fresh python to prove this jaxlib accepts the flags (an unknown flag aborts).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnnjax import runtime


def test_parse_flags():
    parsed = runtime.parse_flags(" --a=1  --b --c=x,y=z -d=2 ")
    assert parsed == {"a": "1", "b": None, "c": "x,y=z", "d": "2"}
    assert runtime.parse_flags("") == {}


def test_merge_appends_missing_flags():
    merged = runtime.merge_flags("--xla_dump_to=/tmp/d", {"x": "1", "y": "a,b"})
    assert merged == "--xla_dump_to=/tmp/d --x=1 --y=a,b"
    assert runtime.merge_flags("", {"x": "1"}) == "--x=1"


def test_merge_keeps_the_users_entry():
    user = "--xla_cpu_experimental_ynn_fusion_type=dot --other"
    merged = runtime.merge_flags(user, runtime.CPU_FLAGS)
    assert merged == user
    assert runtime.parse_flags(merged)["xla_cpu_experimental_ynn_fusion_type"] == "dot"


def test_target_platform_from_env():
    assert runtime.target_platform({"JAX_PLATFORMS": "cpu"}) == "cpu"
    assert runtime.target_platform({"JAX_PLATFORMS": "cuda,cpu"}) == "cuda"


def test_configure_xla_sets_env_only_for_the_platform(monkeypatch):
    monkeypatch.setattr(runtime, "backend_initialized", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    extra = {"cpu": {**runtime.CPU_FLAGS, "xla_cpu_enable_fast_math": "false"}}
    merged = runtime.configure_xla(extra)
    assert os.environ["XLA_FLAGS"] == merged
    assert merged == "--xla_cpu_experimental_ynn_fusion_type=dot --xla_cpu_enable_fast_math=false"
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    monkeypatch.setenv("XLA_FLAGS", "")
    assert runtime.configure_xla() is None
    assert os.environ["XLA_FLAGS"] == ""


def test_configure_xla_warns_after_backend_init(monkeypatch):
    monkeypatch.setattr(runtime, "backend_initialized", lambda: True)
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.warns(UserWarning, match="after JAX initialised"):
        assert runtime.configure_xla() is None
    assert os.environ["XLA_FLAGS"] == ""


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("CNNJAX_CACHE_DIR", raising=False)
    assert runtime.cache_dir() == runtime.Path("~/.cache/cnnjax/jax").expanduser()
    monkeypatch.setenv("CNNJAX_CACHE_DIR", str(tmp_path / "env"))
    assert runtime.cache_dir() == tmp_path / "env"
    assert runtime.cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_enable_compilation_cache_updates_config(tmp_path):
    import jax

    keys = [
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    ]
    before = {k: getattr(jax.config, k) for k in keys}
    try:
        path = runtime.enable_compilation_cache(tmp_path / "cache", min_compile_time_secs=0.25)
        assert path.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.25
    finally:
        for k, v in before.items():
            jax.config.update(k, v)


_CHILD = """
import os, warnings
from cnnjax import runtime
assert runtime.configure_xla() is not None
import jax, jax.numpy as jnp
assert runtime.backend_initialized() is False
x = jax.lax.conv_general_dilated(jnp.ones((1, 8, 8, 1)), jnp.ones((3, 3, 1, 2)), (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
assert runtime.backend_initialized()
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    assert runtime.configure_xla() is None
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
    name = next(iter(runtime.CPU_FLAGS))
    assert f"--{name}=" in out.stdout
    assert out.stdout.split()[-1] == "968.0"  # 2 channels x 484 (SAME 3x3 ones over 8x8 ones)


def test_import_has_no_side_effects():
    # cnnjax/__init__ imports jax; importing jax is fine, starting a backend is not.
    code = "import os; f = os.environ.get('XLA_FLAGS'); from cnnjax import runtime; "
    code += "assert os.environ.get('XLA_FLAGS') == f and not runtime.backend_initialized()"
    env = {k: v for k, v in _child_env().items() if k != "XLA_FLAGS"}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
