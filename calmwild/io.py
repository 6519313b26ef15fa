"""Result files: output directories that never clobber earlier results, atomic writes (JSON, checkpoints, any
file), figures, and image grids of samples and [sample | nearest training image] pairs.

Every file calmwild writes goes through :func:`atomic_write`: a temporary file beside the target, fsync, rename; so a
file is either complete or untouched, and it gets the user's usual permissions.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # matplotlib and torchvision load in seconds: only the functions that draw import them
    from matplotlib.figure import Figure


# ------------------------------------------------------------------------------------------------ directories and files
def check_output_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Refuses an output path that exists and is not a directory, or a directory that already holds files (unless
    ``overwrite``), so a command never silently replaces results a user saved. Creates nothing: commands call it
    before any work, and :func:`prepare_output_dir` once their inputs are known to be good."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output directory {out} already holds files; choose a new directory or pass --overwrite true"
        )
    return out


def prepare_output_dir(out: str | Path, overwrite: bool = False) -> Path:
    """:func:`check_output_dir`, then creates ``out`` (and parents)."""
    out = check_output_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    return out


def to_jsonable(value: Any) -> Any:
    """Tensors, tuples, paths and non-finite floats made JSON-safe (NaN/inf become null)."""
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return to_jsonable(value.item())
    return value


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_HOST = socket.gethostname().replace(".", "_")
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]+\.tmp$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Removes the temporary files :func:`atomic_write` left in ``directory`` when its process was killed mid-write:
    only those made on this host by a process that no longer exists. Returns the removed paths."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        match = _TEMPORARY.match(path.name)
        if match and match["host"] == _HOST and not _alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Writes ``path`` so that it is either complete or untouched, whatever happens meanwhile (a kill, a full disk).

    ``write(handle)`` fills a temporary file ``.<name>.<host>-<pid>.<random>.tmp`` in the target's own directory (so
    the final rename never crosses a filesystem, unlike a temporary file under ``$TMPDIR``); the file is flushed to
    disk, given the usual permissions (0666 minus the umask, as ``open`` would: temporary files start at 0600) and
    renamed over ``path`` with ``os.replace``, which is atomic on POSIX. On any failure the temporary file is removed
    and the previous ``path``, if any, stays as it was; a kill leaves the temporary file, which
    :func:`remove_stale_temporaries` recognises by its dead writer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(obj: Any, path: str | Path) -> Path:
    """Writes ``obj`` as indented JSON (NaN/inf as null), atomically (:func:`atomic_write`)."""
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda handle: handle.write(text.encode()))


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """The content of a JSON file, or one line naming the file when it is missing or is not JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err})") from None


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Writes a matplotlib Figure (no pyplot state involved) atomically and returns the path."""
    path = Path(path)
    suffix = path.suffix.lstrip(".") or "png"
    return atomic_write(path, lambda handle: fig.savefig(handle, dpi=dpi, format=suffix))


# ------------------------------------------------------------------------------------------------ images
def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped, as 3-channel float (grayscale repeated)."""
    images = ((images.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images


def save_png(grid: torch.Tensor, path: str | Path) -> Path:
    """Writes a [3, H, W] grid in [0, 1] as PNG, atomically."""
    from torchvision.utils import save_image

    return atomic_write(path, lambda handle: save_image(grid, handle, format="png"))
