"""Downloads that fail fast: a socket timeout around the transfer and one clear error instead of a hang."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def socket_timeout(seconds: float):
    """Sets the default socket timeout for the duration of the block (restored afterwards).

    The timeout bounds every single blocking socket operation (connect, each read), not the whole transfer: a slow
    download that keeps receiving bytes continues, a silent or unreachable server fails after ``seconds``."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet; None when ``path`` exists."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def download_or_explain(fetch: Callable[[], object], what: str, target: str, timeout: float, manual: str) -> None:
    """Runs ``fetch()`` under :func:`socket_timeout`; any network or archive failure becomes a ConnectionError
    saying what was being downloaded, where to, why it failed and how to provide the data by hand (``manual``).
    A failed download leaves nothing behind: the folders it created for ``target`` (none of which existed before,
    so nothing in them is the user's) are removed again."""
    if timeout <= 0:
        raise ValueError(f"download_timeout must be positive seconds, got {timeout}")
    created = _first_missing(Path(target))
    try:
        with socket_timeout(timeout):
            fetch()
    except (OSError, RuntimeError, ImportError) as err:  # URLError, timeouts, checksum mismatch, missing gdown
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise ConnectionError(
            f"could not download {what} into {target}: {type(err).__name__}: {err} "
            f"(network timeout {timeout:g} s). {manual}"
        ) from err
