"""Reading pickled files without running any code from them.

A pickle can name any importable callable and have the loader call it ("GLOBAL posix.system"): unpickling a file
from someone else runs their program. calmwild therefore reads pickled files only through allow-lists:

- torch files (checkpoints, cached statistics) with ``torch.load(weights_only=True)``, which rebuilds tensors and
  plain containers and refuses every other global (:func:`load_torch_file`);
- other pickle formats (NVlabs/edm network pickles, CIFAR-10 batch files) with :class:`RestrictedUnpickler`, whose
  caller lists every global the format may name together with the data-only stand-in or torch rebuild function
  that replaces it.

A refused file raises :class:`UnsafeFileError` naming the file and the offending global; nothing in it is called.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+)")


class UnsafeFileError(ValueError):
    """A file that needs more than tensors and plain types to load; it was refused, never executed."""


def _refusal(path: Path | str, names: list[str]) -> UnsafeFileError:
    listed = f"{', '.join(names)}, which is not" if names else "Python objects that are not"
    return UnsafeFileError(
        f"refusing to load {path}: it needs {listed} a tensor or a plain type; loading it could run code, so calmwild "
        "does not (re-save it from a trusted environment with plain tensors and types)"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def unsafe_globals(path: str | Path) -> list[str]:
    """The globals a torch file names beyond torch's weights-only allow-list (torch's own scan; [] when the file
    cannot be scanned, e.g. a legacy non-zip file)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - a file torch cannot scan is judged by the load itself
        return []


def first_global(path: str | Path) -> str | None:
    """The first global a plain pickle file names (``module.name``), found without resolving or calling it; None
    when the file names none or is not a pickle."""
    with open(path, "rb") as handle:
        try:
            RestrictedUnpickler(handle, {}, path).load()
        except UnsafeFileError as err:
            found = re.search(r"needs ([\w.]+), which", str(err))
            return found.group(1) if found else None
        except Exception:  # noqa: BLE001 - not a pickle, or one that fails before naming a global
            return None
    return None


def load_torch_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors, containers and plain types only.

    Raises FileNotFoundError for a missing file, :class:`UnsafeFileError` for a file that needs other globals (named
    in the message) and ValueError for a file torch cannot read (truncated, not a torch file), naming the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol of a file it then refuses anyway
            warnings.filterwarnings("ignore", message=r"Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if zipfile.is_zipfile(path):
            names = unsafe_globals(path) or _GLOBAL_IN_MESSAGE.findall(str(err))
        else:  # a plain pickle rather than torch's zip format: name what it would call first
            names = [name for name in (first_global(path),) if name]
        if names:
            raise _refusal(path, names) from None
        raise ValueError(f"{path} is not a readable torch file (UnpicklingError: {_first_line(err)})") from None
    except Exception as err:  # torch raises many types for a damaged or foreign file
        raise ValueError(f"{path} is not a readable torch file ({type(err).__name__}: {_first_line(err)})") from None


def torch_storage_from_bytes(data: bytes) -> Any:
    """The weights-only replacement of ``torch.storage._load_from_bytes``: plain ``pickle`` stores each tensor's
    storage as a small torch file inside the pickle; it is read with ``weights_only=True``."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafeFileError(f"a tensor storage record holds {type(data).__name__}, expected bytes")
    return torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle reader that resolves only the globals in ``allowed`` ((module, name) -> object to use instead).

    Every other global raises :class:`UnsafeFileError` naming ``source`` and ``module.name``; persistent ids are
    refused too. The objects in ``allowed`` are what the loader calls, so they must be data-only stand-ins or
    functions that build plain data (e.g. :func:`torch_storage_from_bytes`)."""

    def __init__(self, file: BinaryIO, allowed: Mapping[tuple[str, str], Callable | type], source: str | Path,
                 **kwargs: Any):
        super().__init__(file, **kwargs)
        self.allowed = dict(allowed)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise _refusal(self.source, [f"{module}.{name}"]) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeFileError(f"refusing to load {self.source}: it holds a persistent reference ({pid!r:.60}), "
                              "which this format does not use")


def restricted_load(path: str | Path, allowed: Mapping[tuple[str, str], Callable | type], **kwargs: Any) -> Any:
    """Unpickles ``path`` with :class:`RestrictedUnpickler`; a stream that is not a valid pickle is a ValueError
    naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as handle:
        try:
            return RestrictedUnpickler(handle, allowed, path, **kwargs).load()
        except UnsafeFileError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
            raise ValueError(f"{path} is not a readable pickle ({type(err).__name__}: {_first_line(err)})") from None


def _numpy_globals() -> dict[tuple[str, str], Callable | type]:
    """numpy's array and scalar rebuild functions under both of numpy's module names (``numpy.core`` before 2.0,
    ``numpy._core`` since): they rebuild plain arrays from bytes; an object-dtype array's items are themselves
    unpickled through the same allow-list."""
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    table: dict[tuple[str, str], Callable | type] = {("numpy", "dtype"): np.dtype, ("numpy", "ndarray"): np.ndarray}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(module, "_reconstruct")] = multiarray._reconstruct
        table[(module, "scalar")] = multiarray.scalar
    return table


NUMPY_GLOBALS = _numpy_globals()


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Stands in for ``_codecs.encode``, through which pickle protocol 2 stores ``bytes`` (as latin-1 text)."""
    if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() != "latin1":
        raise UnsafeFileError(
            f"_codecs.encode is allowed for latin-1 text only, got {type(text).__name__}, {encoding!r}")
    return text.encode("latin1")


PROTOCOL2_GLOBALS = {("_codecs", "encode"): _latin1_bytes}
