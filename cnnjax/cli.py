"""The process harness every ``python -m cnnjax.X`` entry point runs under: ``cli.run(main)``.

Before ``main`` runs, identically for every tool: ``--config=NAME`` resolved to a preset file,
the XLA flags measured fastest for the target platform added to ``XLA_FLAGS`` (the user's own
entries win; only flags the installed jaxlib knows), JAX's persistent compilation cache turned
on, and library chatter (absl, Orbax, TensorFlow, the C++ warnings of the GPU plugin) lowered to
errors unless ``--verbosity`` is given. While it runs, a ``CnnjaxError`` (a mistake the user can
fix) and any error while parsing the flags end the process with one line ``error: ...`` on
stderr and exit status 2; ``CNNJAX_TRACEBACK=1`` shows the traceback too. Anything else is a bug
and keeps its traceback. A run stopped by SIGTERM or SIGINT (``preemption.Preempted``) ends with
its one line on stderr and exit status 128 + signum; so does a SIGINT (Ctrl-C) anywhere else
under the harness, without a traceback.

Platforms (``target_platform``): "cpu", "cuda", "rocm" or "tpu", from ``JAX_PLATFORMS`` or the
installed PJRT plugin, decided before JAX starts. ``DEFAULT`` holds the flags per platform; the
GPU and TPU entries are empty until measured (docs/gpu.md). ``--config.deterministic=True`` adds
``deterministic_flags`` (GPU: ``--xla_gpu_deterministic_ops=true``).

Device memory: the harness leaves JAX's allocator settings alone. On a GPU JAX preallocates 75%
of the memory at start, right for one trainer per GPU; to share a GPU (two trainers, PyTorch
beside JAX) set ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (allocate as needed) or
``XLA_CLIENT_MEM_FRACTION=0.4`` (this share, preallocated; jaxlib 0.10-0.12 still read the
deprecated ``XLA_PYTHON_CLIENT_MEM_FRACTION`` and refuse both at once) before starting it.

Nothing happens on import. ``experiments/README.md`` ("Where the time goes (CPU)") has the
measurements behind every XLA flag here.
"""

import itertools
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from absl import app, flags, logging

from cnnjax import configs, parallel, preemption
from cnnjax.errors import CnnjaxError, ConfigError

TRACEBACK_ENV = "CNNJAX_TRACEBACK"  # "1": print the traceback of a user error as well
# SIGINT outside training's step loop (which saves and says so: cnnjax.preemption).
INTERRUPTED = "interrupted (SIGINT)"

Version = tuple[int, ...]

# Every XLA flag cnnjax sets, with the jaxlib versions that accept it: [first, end), end None
# while the newest jaxlib checked still does. jaxlib and the GPU plugin parse XLA_FLAGS when a
# backend starts and abort the process on an unknown name, so a flag is set only where it is
# known. Checked in the flag registries compiled into jaxlib 0.10.2, 0.11.2 and 0.12.0.1 and
# into jax-cuda13-pjrt 0.11.2 (the flag names next to their help texts in the shared libraries):
# XLA has one registry (DebugOptions) for every backend, so the GPU plugin knows the CPU flags
# and jaxlib the GPU ones; a flag only does something on the backend it names.
FLAG_SUPPORT: dict[str, tuple[Version, Version | None]] = {
    # A host-platform flag (fake CPU devices); known to GPU builds too, where jax.devices("cpu")
    # gets the fake devices beside the GPU.
    "xla_force_host_platform_device_count": ((0, 10), None),
    "xla_llvm_disable_expensive_passes": ((0, 10), None),
    # Gone from jaxlib 0.11 (a reserved DebugOptions field there): set by the tests' conftest, it
    # aborted every test process on jaxlib 0.11.2.
    "xla_cpu_use_fusion_emitters": ((0, 10), (0, 11)),
    # Its values (LibraryFusionType DOT, ELTWISE, REDUCE) are in all three jaxlibs.
    "xla_cpu_experimental_ynn_fusion_type": ((0, 10), None),
    # A DebugOptions field since long before jaxlib 0.10 (a list of HLO pass names to skip).
    "xla_disable_hlo_passes": ((0, 10), None),
    "xla_gpu_deterministic_ops": ((0, 10), None),
    # Candidates measured by experiments/gpu_check.sh, not set by default.
    "xla_gpu_enable_latency_hiding_scheduler": ((0, 10), None),
    "xla_gpu_enable_triton_gemm": ((0, 10), None),
    "xla_gpu_autotune_level": ((0, 10), None),
}

# Flags per platform, each measured to be faster there (experiments/profile_step.py).
CPU_FLAGS: dict[str, str] = {
    # jaxlib 0.10 sends each convolution to YNNPACK ("individual_convolution" in the default list),
    # whose backward convolutions are ~3x slower than XLA's Eigen path at CNN-on-CPU sizes. This
    # list keeps YNNPACK for dots, elementwise and reductions and leaves standalone convolutions
    # (every backward one) to Eigen; a forward convolution fused with its bias add stays in a YNN
    # fusion, and taking "eltwise" out as well to avoid that was no faster.
    "xla_cpu_experimental_ynn_fusion_type": "dot,eltwise,reduce",
    # XLA:CPU drops optimization barriers before its last CSE, which then merges the backward
    # pass's recomputation into the forward pass: jax.checkpoint (config.remat) would save no
    # memory. Keeping them changes nothing in a program without any (a step without remat
    # compiles to the same HLO); see experiments/README.md, "Rematerialisation".
    "xla_disable_hlo_passes": "cse_barrier_expander",
}
# GPU and TPU entries stay empty until a measurement on that platform shows a flag to be faster:
# no flag is chosen blindly. experiments/gpu_check.sh times the candidates against none
# (docs/gpu.md) so that a run on a GPU can fill the "cuda" entry.
DEFAULT: dict[str, dict[str, str]] = {"cpu": CPU_FLAGS, "cuda": {}, "rocm": {}, "tpu": {}}
# Accelerator platforms, in the order JAX prefers them when several plugins are installed.
ACCELERATORS = ("cuda", "rocm", "tpu")
# TF_CPP_MIN_LOG_LEVEL: what ``import jax`` puts there when it is unset, and the harness's own
# level (C++ errors only), which keeps XLA:GPU's "cuda_timer.cc:88] Delay kernel timed out"
# warnings (the autotuner's timer, up to 5 per process) off the terminal.
JAX_CPP_LOG_LEVEL = "1"
QUIET_CPP_LOG_LEVEL = "2"
DEFAULT_CACHE_DIR = "~/.cache/cnnjax/jax"


def parse_version(text: str) -> Version:
    """``"0.11.2"`` -> (0, 11, 2); ``"0.12.0.1"`` -> (0, 12, 0, 1); a ``.dev``/``rc`` tail is
    dropped."""
    parts = []
    for part in text.split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        parts.append(int(digits))
        if digits != part:
            break
    return tuple(parts)


def jaxlib_version() -> Version:
    """The installed jaxlib's version, read without importing it."""
    from importlib.metadata import version

    return parse_version(version("jaxlib"))


def flag_accepted(name: str, jaxlib: Version) -> bool:
    """Whether ``jaxlib`` knows the XLA flag ``name`` (FLAG_SUPPORT). A name missing from the
    table is the caller's own and is trusted."""
    if name not in FLAG_SUPPORT:
        return True
    first, end = FLAG_SUPPORT[name]
    return jaxlib >= first and (end is None or jaxlib < end)


def supported_flags(chosen: Mapping[str, str], jaxlib: Version) -> dict[str, str]:
    """The entries of ``chosen`` that ``jaxlib`` accepts."""
    return {name: value for name, value in chosen.items() if flag_accepted(name, jaxlib)}


def deterministic_flags(platform: str) -> dict[str, str]:
    """XLA flags that make ``platform``'s results identical run to run (``config.deterministic``).

    - GPU ("cuda", "rocm"): ``--xla_gpu_deterministic_ops=true`` ("Guarantees run-to-run
      determinism on GPU", its help text in jaxlib 0.10-0.12): no autotuning (convolution and
      matmul algorithms picked without timing them) and deterministic implementations of the
      ops that have others (scatter). XLA's docs (docs/determinism.md) say select-and-scatter,
      the gradient of an overlapping max pool (ResNet stems; cnnjax's 2x2/2 pools avoid it),
      has none and fails to compile in this mode; the plugin of jaxlib 0.11.2 carries a
      SelectAndScatterExpander. Not run on a GPU yet: gpu_check.sh's device tests run under it.
    - CPU: nothing is needed. XLA:CPU's programs are bit-identical run to run (the kill-and-resume
      tests compare whole train states bit for bit).
    - TPU: nothing known to be needed.
    """
    return {"xla_gpu_deterministic_ops": "true"} if platform in ("cuda", "rocm", "gpu") else {}


def missing_deterministic_flags(platform: str, xla_flags: str) -> dict[str, str]:
    """The deterministic flags of ``platform`` that ``xla_flags`` lacks or sets otherwise (a
    user's own ``--xla_gpu_deterministic_ops=false`` wins over the config; the trainer can say
    so)."""
    present = parse_xla_flags(xla_flags)
    wanted = deterministic_flags(platform)
    return {k: v for k, v in wanted.items() if (present.get(k) or "").lower() != v}


def xla_flags_for(
    platform: str,
    jaxlib: Version,
    deterministic: bool = False,
    table: Mapping[str, Mapping[str, str]] = DEFAULT,
) -> dict[str, str]:
    """The XLA flags the harness adds for ``platform`` under ``jaxlib``: the platform's entry of
    ``table`` (and its deterministic flags when asked), less what this jaxlib does not know."""
    chosen = {**table.get(platform, {}), **(deterministic_flags(platform) if deterministic else {})}
    return supported_flags(chosen, jaxlib)


def parse_xla_flags(xla_flags: str) -> dict[str, str | None]:
    """``"--a=1 --b"`` -> ``{"a": "1", "b": None}`` (the last entry of a repeated name wins)."""
    parsed = {}
    for token in xla_flags.split():
        name, sep, value = token.lstrip("-").partition("=")
        parsed[name] = value if sep else None
    return parsed


def merge_flags(xla_flags: str, flags: Mapping[str, str]) -> str:
    """Appends ``--name=value`` for every ``flags`` entry whose name ``xla_flags`` lacks.

    The user's own entries always win: a name already present is left exactly as it is.
    """
    present = parse_xla_flags(xla_flags)
    extra = [f"--{name}={value}" for name, value in flags.items() if name not in present]
    return " ".join([xla_flags.strip(), *extra]).strip()


def plugin_platform(name: str) -> str | None:
    """The platform a PJRT plugin serves, from its entry-point or module name: "xla_cuda12",
    "xla_cuda13", "cuda", "gpu" -> "cuda"; "xla_rocm7", "rocm" -> "rocm"; "libtpu", "tpu" ->
    "tpu"; any other name -> None."""
    lowered = name.lower()
    for key, platform in (("rocm", "rocm"), ("cuda", "cuda"), ("gpu", "cuda"), ("tpu", "tpu")):
        if key in lowered:
            return platform
    return None


def target_platform(
    environ: Mapping[str, str] | None = None, plugins: Iterable[str] | None = None
) -> str:
    """The platform JAX will pick, guessed without initialising a backend: "cpu", "cuda",
    "rocm", "tpu", or "accelerator" for a plugin of another name.

    ``JAX_PLATFORMS`` decides when set (its first entry; JAX's alias "gpu" is the installed GPU
    platform); otherwise the installed accelerator plugins (``plugins``, default: found the ways
    JAX finds them), else "cpu".
    """
    environ = os.environ if environ is None else environ
    plugins = _accelerator_plugins() if plugins is None else list(plugins)
    found = {plugin_platform(name) for name in plugins}
    first = environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if first == "gpu":
        return "rocm" if "rocm" in found and "cuda" not in found else "cuda"
    if first:
        return first
    for platform in ACCELERATORS:
        if platform in found:
            return platform
    return "accelerator" if plugins else "cpu"


def _accelerator_plugins() -> list[str]:
    """Installed PJRT plugins, found the ways JAX finds them (``jax_plugins`` entry points and
    namespace package, and the ``libtpu`` package), without importing JAX."""
    import importlib.util
    import pkgutil
    from importlib.metadata import entry_points

    names = [ep.name for ep in entry_points(group="jax_plugins")]
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names += [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)]
    if importlib.util.find_spec("libtpu") is not None:
        names.append("libtpu")
    return names


def backend_initialized() -> bool:
    """Whether JAX already created its backends (after which XLA_FLAGS changes do nothing)."""
    try:
        from jax._src import xla_bridge
    except ImportError:  # not imported yet -> certainly not initialised
        return False
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(check()) if check else bool(getattr(xla_bridge, "_backends", {}))


def configure_xla(
    platform_flags: Mapping[str, Mapping[str, str]] = DEFAULT, deterministic: bool = False
) -> str | None:
    """Adds the XLA flags for the target platform to ``os.environ["XLA_FLAGS"]``.

    Must run before JAX initialises its backend (the first array op, ``jax.devices()``, ...);
    after that it warns and changes nothing. Flags the user already set keep their value; flags
    this jaxlib does not know are left out (``xla_flags_for``).

    Args:
      platform_flags: platform -> {flag name without dashes: value}.
      deterministic: add ``deterministic_flags`` of the platform too (``config.deterministic``;
        nothing on CPU, where runs are already bit-identical).

    Returns:
      The new ``XLA_FLAGS`` value, or None when nothing was changed.
    """
    if backend_initialized():
        warnings.warn(
            "configure_xla() called after JAX initialised its backend: XLA_FLAGS is read only "
            "once, so the flags were not applied. Call it at the top of main().",
            stacklevel=2,
        )
        return None
    chosen = xla_flags_for(target_platform(), jaxlib_version(), deterministic, platform_flags)
    if not chosen:
        return None
    merged = merge_flags(os.environ.get("XLA_FLAGS", ""), chosen)
    os.environ["XLA_FLAGS"] = merged
    return merged


def native_log_level(environ: Mapping[str, str], verbose: bool) -> str | None:
    """The ``TF_CPP_MIN_LOG_LEVEL`` the harness sets, or None to leave it as it is.

    XLA's C++ libraries read it once, when loaded: the GPU or TPU plugin at backend start,
    TensorFlow when a dataset is prepared (jaxlib itself is loaded by ``import jax``, before the
    harness runs). ``import jax`` puts "1" there when it is unset, so "1" counts as unset; any
    other value is the user's and wins, and so does ``--verbosity``.
    """
    if verbose or environ.get("TF_CPP_MIN_LOG_LEVEL", "") not in ("", JAX_CPP_LOG_LEVEL):
        return None
    return QUIET_CPP_LOG_LEVEL


def requested_determinism(flag_values) -> bool:
    """Whether the tool's ``--config`` (where it has one) sets ``deterministic=True``."""
    if "config" not in flag_values:
        return False
    config = flag_values["config"].value
    get = getattr(config, "get", None)
    return bool(get and get("deterministic", False) is True)


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$CNNJAX_CACHE_DIR``, else ``~/.cache/cnnjax/jax`` (expanded)."""
    chosen = path or os.environ.get("CNNJAX_CACHE_DIR") or DEFAULT_CACHE_DIR
    return Path(chosen).expanduser()


def enable_compilation_cache(
    path: str | os.PathLike | None = None,
    min_compile_time_secs: float = 0.0,
    min_entry_size_bytes: int = 0,
) -> Path:
    """Turns on JAX's persistent compilation cache so reruns skip XLA compiles.

    Args:
      path: cache directory (see ``cache_dir`` for the default); created if missing.
      min_compile_time_secs: cache only programs that took at least this long to compile
        (0: every program. JAX's default, 1 s, misses the ~0.5 s eval steps of the small models,
        and a start-up runs ~90 small eager programs, 35 ms each to compile: caching them all
        took a short default-preset run from 13.1 to 10.8 s).
      min_entry_size_bytes: cache only executables at least this large (0: all).

    Returns:
      The cache directory.
    """
    import jax

    directory = cache_dir(path)
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_secs)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", min_entry_size_bytes)
    return directory


def expand_shorthands(argv: list[str]) -> list[str]:
    """``--config.model=NAME`` -> ``--config.model.name=NAME`` (the model is a config group).

    Pure string work, safe at flag-definition time (``config_flags`` checks the order of the
    overrides in ``sys.argv`` when the flag is defined).
    """
    prefix = "--config.model="
    return [f"--config.model.name={a[len(prefix) :]}" if a.startswith(prefix) else a for a in argv]


def resolve_config_arg(argv: list[str]) -> list[str]:
    """Rewrites ``--config=NAME`` (a preset name) to the preset's file path for config_flags,
    and expands the shorthands."""
    out = []
    for arg in expand_shorthands(argv):
        if arg.startswith("--config="):
            arg = "--config=" + configs.resolve(arg.split("=", 1)[1])
        out.append(arg)
    return out


def fail(message: str, error: BaseException | None = None) -> None:
    """Exits with status 2 after one line ``error: message`` on stderr (and the traceback of
    ``error`` when ``CNNJAX_TRACEBACK=1``)."""
    if error is not None and os.environ.get(TRACEBACK_ENV) == "1":
        traceback.print_exception(error)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, where any failure (an unknown flag, a value of the wrong type, a
    config file that cannot be loaded) is one line instead of absl's usage text or a
    traceback."""
    try:
        return flags.FLAGS(argv)
    except CnnjaxError as e:
        fail(str(e), e)
    except flags.Error as e:
        fail(f"{e}; see --helpfull", e)
    except Exception as e:  # a config file's own error (or a bad value in it) is the user's
        text = str(e).strip().splitlines()
        fail(f"cannot parse the flags: {type(e).__name__}: {text[0] if text else ''}", e)


def prepare_process() -> None:
    """Log levels, XLA flags (``config.deterministic`` included, where the tool has a
    ``--config``), CPU thread pools, the multi-process runtime (``cnnjax.distributed``, where the
    tool defines its flags) and the compilation cache: everything that must precede JAX's
    backend start."""
    verbose = flags.FLAGS["verbosity"].present  # --verbosity=N (absl's own flag) still wins
    if not verbose:
        # Orbax's and absl's info and warnings (e.g. "read-only manager saves nothing") are
        # not for the terminal.
        logging.set_verbosity(logging.ERROR)
    level = native_log_level(os.environ, verbose)
    if level is not None:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = level
    configure_xla(deterministic=requested_determinism(flags.FLAGS))
    parallel.size_cpu_thread_pools()
    if "coordinator_address" in flags.FLAGS:  # the tools that define cnnjax.distributed's flags
        from cnnjax import distributed

        distributed.initialize_from_flags()  # before anything creates JAX's backends
    enable_compilation_cache()


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Runs ``main(argv)`` under the harness (see the module docstring); its return value is
    the exit status."""

    def guarded(args):
        prepare_process()
        try:
            return main(args)
        except CnnjaxError as e:
            fail(str(e), e)
        except preemption.Preempted as e:  # stopped by SIGTERM / SIGINT, after saving
            print(e, file=sys.stderr)
            sys.exit(e.exit_status)
        except KeyboardInterrupt:  # Ctrl-C where no step is running (start-up, evaluation)
            print(INTERRUPTED, file=sys.stderr)
            sys.exit(128 + signal.SIGINT)

    try:
        argv = resolve_config_arg(sys.argv if argv is None else argv)
    except CnnjaxError as e:
        fail(str(e), e)
    app.run(guarded, argv=argv, flags_parser=parse_flags)


def no_extra_args(argv: list[str]) -> None:
    """Refuses positional arguments where a tool takes none.

    Raises:
      ConfigError: (from inside ``main``, where only a ``CnnjaxError`` is one line) any.
    """
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])}; see --helpfull")


def parse_shape(text: str) -> tuple[int, int, int]:
    """A flag's ``"H,W,C"`` -> (H, W, C).

    Raises:
      ConfigError: not three positive integers.
    """
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--input-shape must be H,W,C positive integers, got {text!r}")
    return shape
