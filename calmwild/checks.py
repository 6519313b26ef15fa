"""The argument checks of calmwild, one function per rule and one signature each: ``check_x(value, name, ...)``.

Every check returns the value in its canonical type (an ``int``, a ``float``, a float64 tensor of noise levels)
and raises ValueError (wrong value) or :class:`WrongType` (wrong type; a TypeError that is also a ValueError, so a
caller catching either sees it) with one line naming the argument, the rule and the value given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


class WrongType(TypeError, ValueError):
    """An argument of the wrong type."""


def check_count(value: object, name: str, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (a count, a size, a seed with ``minimum=0``); bools are not integers here."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise WrongType(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_optional_count(value: object, name: str, minimum: int = 1) -> int | None:
    """:func:`check_count`, or None."""
    return None if value is None else check_count(value, name, minimum)


def check_subset(requested: int, name: str, available: int, where: str) -> int:
    """A subset of ``requested`` items must fit in the ``available`` items of ``where``."""
    if requested > available:
        raise ValueError(f"{name} = {requested} exceeds the {available} images available in {where}")
    return requested


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices`` (ValueError listing them otherwise)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_positive(value: object, name: str) -> float:
    """A finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise WrongType(f"{name} must be a finite positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def check_open_unit(value: object, name: str) -> float:
    """A number strictly between 0 and 1 (a probability level, a ratio-test threshold)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie in (0, 1), got {value!r}")
    return float(value)


def check_threshold(threshold: object) -> float:
    """The ratio-test threshold d1/d2 < threshold (Yoon et al.'s 1/3 by default) as a float in (0, 1)."""
    return check_open_unit(threshold, "ratio-test threshold")


def sigma_key(sigma: float) -> str:
    """The name of one noise level in logged keys: ``sigma_`` + 3 significant digits (``sigma_0.594``, ``sigma_80``)."""
    return f"sigma_{float(sigma):.3g}"


def check_sigmas(sigmas: object, name: str = "sigmas", min_count: int = 1, ascending: bool = False,
                 distinct_names: bool = False) -> torch.Tensor:
    """Noise levels as a 1-D float64 CPU tensor of finite positive values: in the given order, or sorted ascending
    (``ascending``); at least ``min_count`` of them, distinct when ``min_count`` > 1 and ascending; with
    ``distinct_names`` distinct at 3 significant digits, the precision of their logged names (:func:`sigma_key`)."""
    if isinstance(sigmas, (str, bytes)) or not isinstance(sigmas, (Sequence, torch.Tensor, np.ndarray)):
        raise WrongType(f"{name} must be a list of noise levels, got {sigmas!r}")
    sig = torch.as_tensor(sigmas if isinstance(sigmas, torch.Tensor) else np.asarray(sigmas, dtype=np.float64))
    sig = sig.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if sig.numel() < min_count or not torch.all(torch.isfinite(sig) & (sig > 0)):
        need = "non-empty" if min_count <= 1 else f"at least {min_count}"
        raise ValueError(f"{name} must be a {need} list of finite positive noise levels, got {sig.tolist()}")
    if ascending:
        sig = sig.sort().values
        if min_count > 1 and torch.any(sig.diff() == 0):
            raise ValueError(f"{name} must hold at least {min_count} distinct levels, got {sig.tolist()}")
    if distinct_names:
        keys = [sigma_key(s) for s in sig.tolist()]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{name} {sig.tolist()} are not distinct at 3 significant digits (names {keys})")
    return sig


def check_images(x: object, name: str, min_count: int = 1, finite: bool = False) -> torch.Tensor:
    """A floating-point tensor [N, ...] with N >= ``min_count`` (and no NaN/inf with ``finite``)."""
    if not isinstance(x, torch.Tensor):
        raise WrongType(f"{name} must be a torch.Tensor [N, C, H, W], got {type(x).__name__}")
    if x.ndim < 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor [N, ...], got {x.dtype} of shape {tuple(x.shape)}")
    if x.shape[0] < min_count:
        raise ValueError(f"{name} needs at least {min_count} images, got {x.shape[0]}")
    if finite and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return x
