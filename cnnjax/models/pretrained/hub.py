"""Weights sources -> ``{torch key: numpy array}``: torchvision tags, URLs and local files.

Downloads land where torch hub puts them (``$TORCH_HOME/hub/checkpoints/<file name>``, with
``TORCH_HOME`` defaulting to ``$XDG_CACHE_HOME/torch`` or ``~/.cache/torch``), so a file torch
already downloaded is reused and torch reuses ours. A download is written to a temporary file,
checked against the sha256 prefix torchvision file names carry (``resnet50-11ad3fa6.pth``) and
renamed into place, so the cache never holds a partial or corrupt file.
"""

import hashlib
import os
import pickle
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cnnjax.errors import CnnjaxError, unknown_name
from cnnjax.models.pretrained import weights as weights_table

# torchvision's rule: the hex between the last "-" and the first "." of the file name.
HASH_PREFIX = re.compile(r"-([a-f0-9]+)\.")
LOCAL_SUFFIXES = (".pth", ".pt", ".safetensors")
INSTALL_HINT = "pip install 'cnnjax[pretrained]'"
CHUNK = 1 << 20


class WeightsUnavailableError(CnnjaxError):
    """Weights cannot be downloaded (offline, unreachable, not found)."""


class WeightsFileError(CnnjaxError, ValueError):
    """A weights file is corrupt (bad hash, truncated, empty) or not a state_dict."""


def cache_dir() -> Path:
    """torch hub's checkpoint directory: ``$TORCH_HOME/hub/checkpoints``."""
    default_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch"
    return Path(os.environ.get("TORCH_HOME", default_home)).expanduser() / "hub" / "checkpoints"


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https", "file")


def locate(name: str, source: str | os.PathLike) -> tuple[str, weights_table.Weights | None]:
    """``(url or local path, the table's entry or None)`` for zoo model ``name``.

    Args:
      source: a torchvision tag (``"IMAGENET1K_V1"``, ``"DEFAULT"``...), an http(s)/file URL or
        a local ``.pth``/``.pt``/``.safetensors`` path.

    Raises:
      UnknownNameError: a tag torchvision does not publish for ``name``.
      WeightsFileError: a local path that does not exist or has another suffix.
    """
    source = os.fspath(source)
    if is_url(source):
        return source, None
    if source == "DEFAULT" or re.fullmatch(r"[A-Z0-9_]+", source):
        _, entry = weights_table.resolve(name, source)
        return entry.url, entry
    path = Path(source).expanduser()
    if path.suffix not in LOCAL_SUFFIXES:
        raise unknown_name("weights source", source, [*LOCAL_SUFFIXES, "https://...", "DEFAULT"])
    if not path.is_file():
        raise WeightsFileError(f"weights file {source} does not exist")
    return str(path), None


def download(url: str) -> Path:
    """The cached copy of ``url`` (downloaded first when the cache lacks it).

    Raises:
      WeightsUnavailableError: the download failed (the message says where to put the file by
        hand and how to pass a local file instead).
      WeightsFileError: the download's sha256 does not start with the file name's hash prefix.
    """
    file_name = Path(urllib.parse.urlparse(url).path).name
    target = cache_dir() / file_name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{file_name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _copy_url(url, out, target)
        expected = HASH_PREFIX.search(file_name)
        if expected and not digest.startswith(expected.group(1)):
            raise WeightsFileError(
                f"{url}: the download's sha256 {digest[:12]}... does not start with "
                f"{expected.group(1)} as its name says (corrupt download; not kept, try again)"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _copy_url(url: str, out, target: Path) -> str:
    """Streams ``url`` into ``out``; returns the sha256 hex digest."""
    sha = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(CHUNK):
                sha.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise WeightsUnavailableError(
            f"cannot download {url} ({reason}); put the file at {target} or pass its local "
            "path (a .pth/.pt/.safetensors file) as the source"
        ) from e
    return sha.hexdigest()


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A torchvision ``state_dict`` file as ``{key: array}`` (torch layouts, unchanged).

    ``.safetensors`` files are read with ``safetensors.numpy``; anything else with
    ``torch.load(weights_only=True)``, which unpickles tensors and containers only.

    Raises:
      WeightsFileError: empty, truncated or unreadable, or not a mapping of names to tensors.
      CnnjaxError: torch (or safetensors) is not installed.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise WeightsFileError(f"{path} is empty (delete it and download again)")
    tensors = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    if not isinstance(tensors, Mapping) or not tensors:
        raise WeightsFileError(f"{path} holds no state_dict (a dict of parameter tensors)")
    return {str(k): _to_numpy(v, f"{path}: {k!r}") for k, v in tensors.items()}


def _read_safetensors(path: Path):
    try:
        import safetensors
        import safetensors.numpy
    except ImportError as e:
        raise CnnjaxError(f"reading {path} needs safetensors: {INSTALL_HINT}") from e
    try:
        return safetensors.numpy.load_file(path)
    except (safetensors.SafetensorError, OSError) as e:
        raise WeightsFileError(f"{path} is not a readable safetensors file ({e})") from e


def _read_torch(path: Path):
    try:
        import torch
    except ImportError as e:
        raise CnnjaxError(f"reading {path} needs torch: {INSTALL_HINT}") from e
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        # weights_only refuses to unpickle anything but tensors and plain containers.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise WeightsFileError(
                f"{path} holds a pickled {found.group(1)}, not only tensors; save "
                "model.state_dict() instead"
            ) from e
        raise WeightsFileError(f"{path} is not a torch file (unreadable pickle)") from e
    except (EOFError, RuntimeError, OSError, ValueError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsFileError(f"{path} is truncated or not a torch file ({first_line})") from e


def _to_numpy(value, what: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if not hasattr(value, "detach"):
        raise WeightsFileError(
            f"{what} is a {type(value).__name__}, not a tensor: the file is no state_dict (a "
            "training checkpoint? save model.state_dict())"
        )
    t = value.detach().cpu()
    return (t.float() if t.is_floating_point() else t).numpy()
