"""Downloads that fail fast: a socket timeout around the transfer and one clear error instead of a hang."""

from __future__ import annotations

import socket
from collections.abc import Callable
from contextlib import contextmanager


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


def download_or_explain(fetch: Callable[[], object], what: str, target: str, timeout: float, manual: str) -> None:
    """Runs ``fetch()`` under :func:`socket_timeout`; any network or archive failure becomes a ConnectionError
    saying what was being downloaded, where to, why it failed and how to provide the data by hand (``manual``)."""
    if timeout <= 0:
        raise ValueError(f"download_timeout must be positive seconds, got {timeout}")
    try:
        with socket_timeout(timeout):
            fetch()
    except (OSError, RuntimeError, ImportError) as err:  # URLError, timeouts, checksum mismatch, missing gdown
        raise ConnectionError(
            f"could not download {what} into {target}: {type(err).__name__}: {err} "
            f"(network timeout {timeout:g} s). {manual}"
        ) from err
