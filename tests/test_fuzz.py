"""A fuzz over bounded configurations: each trains a few steps or fails with a clean, one-line error."""

from __future__ import annotations

import random
import sys
import time

import pytest
from tiny import sampler, write_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")
DDPM = sampler("DDPMUniform")


# ===== 9. fuzz: random bounded configurations end in a short run or a clean error =====================================
FUZZ_CASES = 30
CLEAN_ERRORS = (ValueError, TypeError, FileNotFoundError, SystemExit)


def _fuzz_bands(rng, bad: float) -> list[list[float]]:
    bands = []
    for _ in range(rng.randint(1, 2)):
        low, high = sorted(10 ** rng.uniform(-3, 2.5) for _ in range(2))
        if rng.random() < bad:
            low, high = high, low  # inverted
        if rng.random() < bad:
            low = -low  # negative
        bands.append([round(low, 4), round(high, 4)])
    return bands


def _fuzz_sampler(rng, bad: float) -> dict:
    kind = rng.choice(["LogNormal", "DDPMUniform", "Gap", "Reweighted"])
    p_std = rng.uniform(0.3, 2.0) if rng.random() > bad else rng.uniform(-1.0, 0.0)
    lognormal = sampler("LogNormal", p_mean=round(rng.uniform(-3, 1), 3), p_std=round(p_std, 3))
    if kind == "LogNormal":
        return lognormal
    if kind == "DDPMUniform":
        T = rng.randint(10, 1200) if rng.random() > bad else rng.randint(-2, 1)
        return sampler("DDPMUniform", T=T, beta_start=round(10 ** rng.uniform(-5, -3), 6),
                       beta_end=round(10 ** rng.uniform(-2.5, -1), 5))
    base = lognormal if rng.random() < 0.7 else DDPM
    if kind == "Gap":
        return sampler("Gap", base=base, bands=_fuzz_bands(rng, bad))
    factor = rng.uniform(0, 1) if rng.random() > bad else rng.choice([-0.2, 1.3])
    return sampler("Reweighted", base=base, bands=_fuzz_bands(rng, bad), factors=round(factor, 3))


def fuzz_changes(case: int) -> dict:
    """A random configuration; each value is out of its range with probability ``bad`` (so about half the cases
    are valid as a whole)."""

    rng = random.Random(1000 + case)
    bad = 0.04

    def pick(good, wrong):
        return good() if rng.random() > bad else wrong()

    resolution = rng.choice([4, 8, 8])
    levels = rng.randint(1, 3 if resolution > 4 else 2)
    visited = [resolution >> level for level in range(levels)]
    num_train = pick(lambda: rng.randint(8, 120), lambda: 0)
    return {
        "trainer.max_steps": 2,
        "trainer.logger": False,
        "trainer.callbacks": [],
        "trainer.enable_checkpointing": False,
        "model.sigma_sampler": _fuzz_sampler(rng, bad),
        "model.backbone.init_args": {
            "img_resolution": pick(lambda: resolution, lambda: rng.choice([6, 12, 16])),
            "in_channels": 1,
            "model_channels": pick(lambda: 2 * rng.randint(1, 8), lambda: 2 * rng.randint(1, 8) - 1),
            "channel_mult": [pick(lambda: rng.randint(1, 3), lambda: 0) for _ in range(levels)],
            "num_blocks": pick(lambda: rng.randint(1, 2), lambda: 0),
            "attn_resolutions": pick(lambda: sorted(rng.sample(visited, rng.randint(0, 1))), lambda: [3]),
            "dropout": pick(lambda: round(rng.uniform(0, 0.5), 3), lambda: rng.choice([-0.1, 1.0])),
        },
        "model.lr": pick(lambda: round(10 ** rng.uniform(-5, -1), 8), lambda: rng.choice([0.0, -1e-3])),
        "model.lr_warmup_steps": pick(lambda: rng.randint(0, 10), lambda: -1),
        "data.init_args": {
            "num_train": num_train,
            "num_heldout": pick(lambda: rng.randint(1, 40), lambda: 0),
            "resolution": resolution,
            "batch_size": pick(lambda: rng.randint(1, max(1, min(num_train, 48))), lambda: rng.choice([0, 500])),
            "seed": rng.randint(0, 9),
        },
    }


def _last_frame(error: BaseException) -> str:
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno} ({frames[-1].name})" if frames else "?"


@pytest.mark.slow
def test_fuzzed_configurations_train_or_fail_cleanly(tmp_path):
    """30 seeded random configurations (sigma sampler and its parameters or bands, U-Net sizes, data sizes, batch size,
    learning rate and warm-up, some of them out of range): each either trains 2 steps or fails with a clean error,
    one of ValueError / TypeError / FileNotFoundError / SystemExit with a message, raised by calmwild's, jsonargparse's
    or Lightning's argument handling, never from inside torch."""
    import contextlib
    import io
    from unittest import mock

    from calmwild.cli import run

    outcomes, problems = [], []
    for case in range(FUZZ_CASES):
        changes = fuzz_changes(case)
        config = write_config(tmp_path / f"fuzz{case}.yaml", **changes)
        stderr = io.StringIO()
        start = time.perf_counter()
        try:
            with contextlib.redirect_stderr(stderr), mock.patch.object(sys, "argv", ["calmwild"]):
                cli = run(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / f"r{case}")])
        except BaseException as error:  # noqa: BLE001 - classified below
            said = f"{error}\n{stderr.getvalue()}".strip()
            where = _last_frame(error)
            lines = said.splitlines()
            if "Errors:" in lines:  # jsonargparse's union report: the first underlying error says what is wrong
                lines = lines[lines.index("Errors:") + 1:]
            outcome = f"{type(error).__name__} at {where}: {lines[0].strip()[:150] if lines else ''}"
            clean = (
                isinstance(error, CLEAN_ERRORS)
                and len(said) > 10
                and "/torch/" not in where
                and any(part in where for part in ("/calmwild/", "/jsonargparse/", "/lightning/", "argparse.py"))
            )
            if not clean:
                problems.append(f"case {case}: {outcome}\n  config: {changes}")
        else:
            outcome = f"trained {cli.trainer.global_step} steps"
            if cli.trainer.global_step != 2:
                problems.append(f"case {case}: {outcome}")
        outcomes.append(f"case {case:2d} ({time.perf_counter() - start:4.1f} s): {outcome}")
    print("\n".join(outcomes))
    trained = sum("trained" in o for o in outcomes)
    assert 3 <= trained <= FUZZ_CASES - 3, "the fuzz should exercise both outcomes"
    assert not problems, "\n".join(problems)
