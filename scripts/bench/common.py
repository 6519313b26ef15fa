"""What every benchmark shares: synchronised timing, the environment record, precision switches, random image data,
a memory check for the dense naive references, and progress messages (on stderr, so stdout carries only the JSON)."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F


def say(message: str) -> None:
    """A progress line on stderr."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock time covers the work itself (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(seconds, result) of one call, synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def time_side_by_side(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 1
) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Times every function ``repeats`` times after ``warmup`` untimed calls each, interleaving the functions
    (a, b, a, b, ...) so slow drifts of the machine (other jobs, clocks) hit all of them alike.

    Returns per-name lists of seconds and the result of each function's last call."""
    results: dict[str, object] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            results[name] = fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds, results[name] = timed(fn, device)
            times[name].append(seconds)
    return times, results


def rate(times: list[float], work: float, unit: str) -> dict:
    """``work`` per median second under the key ``unit``, the median seconds of the repeats, all of them, and the
    fastest (on a shared machine, other jobs only ever add time, so the minimum is the cleaner figure)."""
    median = statistics.median(times)
    return {unit: work / median, "seconds": median, "seconds_min": min(times),
            "seconds_all": [round(t, 6) for t in times]}


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 and math.isfinite(numerator) else None


# ------------------------------------------------------------------------------------------------ precision
def precision_state() -> dict:
    """The global switches that decide float32 matmul/convolution precision."""
    return {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "default_dtype": str(torch.get_default_dtype()),
    }


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[dict]:
    """TF32 for float32 matmuls and cuDNN convolutions on (``enabled``) or off (true float32), restored afterwards.
    PyTorch's own default is TF32 convolutions with full-precision matmuls, which is neither, so every benchmark
    states which one it ran under. (Only the CUDA switches change; CPU kernels ignore them.)"""
    previous = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield precision_state()
    finally:
        torch.set_float32_matmul_precision(previous[0])
        torch.backends.cudnn.allow_tf32 = previous[1]


def matmul_rates(a: torch.Tensor, b: torch.Tensor, device: torch.device, repeats: int) -> dict:
    """TFLOP/s (2 M N K / s) of a @ b.T at full float32 precision, and with TF32 on CUDA: the attainable matmul
    rate of this device at the shape a benchmark works on, measured in the same run as its yardstick."""
    flops = 2.0 * a.shape[0] * b.shape[0] * a.shape[1]
    out = {}
    for name, enabled in (("fp32", False), ("tf32", True)) if device.type == "cuda" else (("fp32", False),):
        with tf32(enabled):
            times, _ = time_side_by_side({name: lambda: a @ b.T}, device, repeats)
        out[f"torch_mm_{name}"] = rate(times[name], flops / 1e12, "tflops")
    return out


# ------------------------------------------------------------------------------------------------ environment
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def environment(device: torch.device) -> dict:
    """Device, library versions and precision settings, for the JSON record."""
    import lightning

    env = {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "precision_at_start": precision_state(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["compute_capability"] = f"{props.major}.{props.minor}"
    return env


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device`` (CUDA: free device memory; CPU: MemAvailable of /proc/meminfo)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def dense_fits(num_bytes: int, device: torch.device, fraction: float = 0.5) -> tuple[bool, str]:
    """Whether a dense naive computation needing about ``num_bytes`` fits in ``fraction`` of the free memory, and a
    note saying so either way."""
    free = available_bytes(device)
    fits = num_bytes <= fraction * free
    note = f"needs ~{num_bytes / 2**30:.2f} GiB of {free / 2**30:.1f} GiB free on {device}"
    return fits, note if fits else f"naive skipped: {note} (limit {fraction:.0%} of free memory)"


# ------------------------------------------------------------------------------------------------ data
def random_images(
    num: int, shape: tuple[int, int, int], seed: int, device: torch.device, chunk: int = 8192
) -> torch.Tensor:
    """``num`` image-like tensors [num, C, H, W] in [-1, 1]: tanh of bilinearly upsampled 4x-coarser Gaussian noise
    plus a little pixel noise. Neighbouring pixels are correlated as in photographs, so nearest-neighbour gaps are
    image-like, not the near-ties of i.i.d. noise in high dimension. Drawn on ``device`` from a seeded generator."""
    channels, height, width = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    coarse = (max(2, height // 4), max(2, width // 4))
    parts = []
    for start in range(0, num, chunk):
        n = min(chunk, num - start)
        low = torch.randn(n, channels, *coarse, generator=gen, device=device)
        fine = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
        fine = fine + 0.1 * torch.randn(n, channels, height, width, generator=gen, device=device)
        parts.append(torch.tanh(fine))
    return torch.cat(parts)


def exact_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """float64 Euclidean distances [len(x), len(y)] from explicit differences (cdist without the matmul identity),
    the independent yardstick for the error columns."""
    return torch.cdist(
        x.reshape(len(x), -1).double(), y.reshape(len(y), -1).double(), compute_mode="donot_use_mm_for_euclid_dist"
    )
