"""The process harness every ``python -m cnnjax.X`` entry point runs under: ``cli.run(main)``.

Before ``main`` runs, identically for every tool: ``--config=NAME`` resolved to a preset file,
the XLA flags measured fastest for the target platform added to ``XLA_FLAGS`` (the user's own
entries win), JAX's persistent compilation cache turned on, and library chatter (absl, Orbax,
TensorFlow) lowered to errors unless ``--verbosity`` is given. While it runs, a
``CnnjaxError`` (a mistake the user can fix) and any error while parsing the flags end the
process with one line ``error: ...`` on stderr and exit status 2; ``CNNJAX_TRACEBACK=1`` shows
the traceback too. Anything else is a bug and keeps its traceback. A run stopped by SIGTERM or
SIGINT (``preemption.Preempted``) ends with its one line on stderr and exit status 128 + signum;
so does a SIGINT (Ctrl-C) anywhere else under the harness, without a traceback.

Nothing happens on import. ``experiments/README.md`` ("Where the time goes (CPU)") has the
measurements behind every XLA flag here.
"""

import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

from absl import app, flags, logging

from cnnjax import configs, parallel, preemption
from cnnjax.errors import CnnjaxError, ConfigError

TRACEBACK_ENV = "CNNJAX_TRACEBACK"  # "1": print the traceback of a user error as well
# SIGINT outside training's step loop (which saves and says so: cnnjax.preemption).
INTERRUPTED = "interrupted (SIGINT)"

# Flags per platform, each measured to be faster there (experiments/profile_step.py) and checked
# to be accepted by jaxlib >= 0.10 (an unknown name in XLA_FLAGS aborts the process).
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
DEFAULT: dict[str, dict[str, str]] = {"cpu": CPU_FLAGS}
_MIN_JAXLIB = (0, 10)  # the oldest jaxlib these flags were verified on
DEFAULT_CACHE_DIR = "~/.cache/cnnjax/jax"


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


def target_platform(environ: Mapping[str, str] | None = None) -> str:
    """The platform JAX will pick, guessed without initialising a backend.

    ``JAX_PLATFORMS`` decides when set (its first entry); otherwise "cpu" unless an accelerator
    plugin (``jax_plugins`` entry point, e.g. the CUDA or TPU plugin) is installed.
    """
    environ = os.environ if environ is None else environ
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower()
    return "accelerator" if _accelerator_plugins() else "cpu"


def _accelerator_plugins() -> list[str]:
    """Installed PJRT plugins, found the two ways JAX finds them (entry points and the
    ``jax_plugins`` namespace package), without importing JAX."""
    import importlib.util
    import pkgutil
    from importlib.metadata import entry_points

    names = [ep.name for ep in entry_points(group="jax_plugins")]
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names += [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)]
    return names


def backend_initialized() -> bool:
    """Whether JAX already created its backends (after which XLA_FLAGS changes do nothing)."""
    try:
        from jax._src import xla_bridge
    except ImportError:  # not imported yet -> certainly not initialised
        return False
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(check()) if check else bool(getattr(xla_bridge, "_backends", {}))


def configure_xla(platform_flags: Mapping[str, Mapping[str, str]] = DEFAULT) -> str | None:
    """Adds the fast XLA flags for the target platform to ``os.environ["XLA_FLAGS"]``.

    Must run before JAX initialises its backend (the first array op, ``jax.devices()``, ...);
    after that it warns and changes nothing. Flags the user already set keep their value.

    Args:
      platform_flags: platform -> {flag name without dashes: value}.

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
    chosen = platform_flags.get(target_platform(), {})
    if not chosen or _jaxlib_version() < _MIN_JAXLIB:
        return None
    merged = merge_flags(os.environ.get("XLA_FLAGS", ""), chosen)
    os.environ["XLA_FLAGS"] = merged
    return merged


def _jaxlib_version() -> tuple[int, ...]:
    from importlib.metadata import version

    return tuple(int(p) for p in version("jaxlib").split(".")[:2] if p.isdigit())


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
    """XLA flags, CPU thread pools, the multi-process runtime (``cnnjax.distributed``, where the
    tool defines its flags), compilation cache and log levels."""
    if not flags.FLAGS["verbosity"].present:  # --verbosity=N (absl's own flag) still wins
        # Orbax's and absl's info and warnings (e.g. "read-only manager saves nothing") are
        # not for the terminal.
        logging.set_verbosity(logging.ERROR)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    configure_xla()
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
