"""Builds the oneDNN convolution extension (``onednn_conv.cc``) into a shared library.

    python -m cnnjax.nn.kernels.build          # prints the library's path; rebuilds only if stale

Needs a C++17 compiler and oneDNN's headers and library (Debian: ``apt-get install
libdnnl-dev``; ``bash setup.sh`` does both). The library goes to ``$CNNJAX_KERNELS_DIR``, else
``~/.cache/cnnjax/nn/kernels``, under a name that hashes the source, the compiler command and the
jaxlib version, so an edit or a jaxlib upgrade builds a fresh one.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("onednn_conv.cc")
DEFAULT_DIR = "~/.cache/cnnjax/nn/kernels"
FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w")
LIBS = ("-ldnnl",)


class BuildError(RuntimeError):
    """The extension could not be built here (no compiler, no oneDNN, a compile error)."""


def compiler() -> str | None:
    """The C++ compiler: ``$CXX``, else ``g++`` or ``c++`` on the PATH."""
    chosen = os.environ.get("CXX")
    return chosen or shutil.which("g++") or shutil.which("c++")


def command(output: Path, cxx: str) -> list[str]:
    import jax

    includes = ["-isystem", jax.ffi.include_dir()]
    return [cxx, *FLAGS, *includes, str(SOURCE), "-o", str(output), *LIBS]


def library_path() -> Path:
    """Where the library for this source, compiler and jaxlib lives (built or not)."""
    import jaxlib

    cxx = compiler() or "none"
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join([cxx, *FLAGS, *LIBS, jaxlib.__version__]).encode())
    directory = Path(os.environ.get("CNNJAX_KERNELS_DIR") or DEFAULT_DIR).expanduser()
    return directory / f"onednn_conv-{digest.hexdigest()[:16]}.so"


def build(force: bool = False) -> Path:
    """Compiles the library unless it exists; returns its path.

    Raises:
      BuildError: no compiler, or the compile failed (e.g. oneDNN's headers are missing).
    """
    path = library_path()
    if path.exists() and not force:
        return path
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler (g++ or $CXX) found")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name, then rename: a concurrent loader never sees half a file.
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        proc = subprocess.run(command(partial, cxx), capture_output=True, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-3:]
            raise BuildError(f"{cxx} failed (is libdnnl-dev installed?): " + " | ".join(tail))
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def main(argv=None) -> int:
    force = "--force" in (argv if argv is not None else sys.argv[1:])
    try:
        print(build(force=force))
    except BuildError as e:
        print(f"cnnjax.nn.kernels.build: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
