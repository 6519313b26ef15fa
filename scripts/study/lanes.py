"""Running the study's units of work: each unit is a list of ``calmwild`` commands run in one process, several units
side by side in worker processes, and each unit's result written to disk the moment it finishes.

On the CPU the study's networks are small: a second torch thread speeds a training step up by 10-30%, a second
process nearly doubles the throughput. :class:`Lanes` therefore runs ``jobs`` worker processes (spawned, each with
``threads`` torch threads, each dying with the study: a killed study leaves no orphan holding a run's lock); with
``jobs`` = 1 the commands run in the study's own process. Each unit's output goes to its log file under
``<out>/logs/``; the console gets one line per unit started and finished.

:class:`Ledger` makes the work resumable: a finished unit's result is kept in ``<out>/stages/<name>.json`` and read
back by a later invocation instead of being redone, unless a unit it depends on ran again in this invocation. A
unit interrupted half-way runs again; its ``calmwild fit`` resumes from the run's newest checkpoint (bitwise as an
uninterrupted run, :mod:`calmwild.runs`).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calmwild.io import to_jsonable, write_json


@dataclass
class Unit:
    """One unit of work: ``commands`` (each a ``calmwild`` argument list) run in order in one process; ``collect``
    turns their return values (a command's report, None for ``fit``) into the unit's JSON result, in the study's
    process; ``deps`` name the units whose results this one uses; ``label`` says what it is on the console."""

    name: str
    commands: list[list[str]]
    collect: Callable[[list[Any]], dict]
    deps: tuple[str, ...] = ()
    label: str = ""


@dataclass
class Ledger:
    """The results of finished units (see the module docstring), their wall-clock seconds and commands."""

    out: Path
    ran: set[str] = field(default_factory=set)
    status: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    commands: dict[str, list[str]] = field(default_factory=dict)

    def marker(self, name: str) -> Path:
        return self.out / "stages" / f"{name}.json"

    def cached(self, name: str, deps: Sequence[str] = ()) -> dict | None:
        """The result of ``name`` from an earlier invocation, or None when it must run (no marker, or a dependency ran
        again in this invocation)."""
        marker = self.marker(name)
        if not marker.is_file() or self.ran.intersection(deps):
            return None
        record = json.loads(marker.read_text())
        self.status[name], self.seconds[name] = "done earlier", record["seconds"]
        self.commands[name] = record.get("commands", [])
        return record["result"]

    def record(self, name: str, result: dict, seconds: float, commands: list[str]) -> dict:
        """Keeps a finished unit's result (as a later invocation reads it back: lists, inf and NaN as null)."""
        result = json.loads(json.dumps(to_jsonable(result)))
        write_json({"unit": name, "seconds": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "commands": commands, "result": result}, self.marker(name))
        self.ran.add(name)
        self.status[name], self.seconds[name], self.commands[name] = "ran", seconds, commands
        return result

    def step(self, name: str, deps: Sequence[str], work: Callable[[], dict]) -> dict:
        """A unit computed in the study's own process from results on disk (no calmwild command of its own)."""
        cached = self.cached(name, deps)
        if cached is not None:
            print(f"[study] {name}: done earlier, skipped", flush=True)
            return cached
        print(f"[study] {name}: running", flush=True)
        start = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - start
        print(f"[study] {name}: done in {seconds:.1f} s", flush=True)
        return self.record(name, result, seconds, [])


def command_line(argv: Sequence[str]) -> str:
    return "calmwild " + shlex.join(argv)


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the study's process dies (prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def _start_worker(threads: int) -> None:
    _die_with_parent()
    import torch

    torch.set_num_threads(threads)


@contextlib.contextmanager
def _output_to(log: Path):
    """Sends this process's stdout and stderr (file descriptors included: Lightning and tqdm write there) to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_commands(commands: list[list[str]], log: str) -> list[Any]:
    """Runs ``calmwild`` commands in this process, output to ``log``; returns each one's report (None for the
    Lightning commands, whose result is on disk). sys.argv is emptied meanwhile: LightningCLI warns when it sees
    command-line arguments beside the ones it is given."""
    from calmwild.cli import run

    results = []
    saved, sys.argv = sys.argv, sys.argv[:1]
    try:
        with _output_to(Path(log)):
            for argv in commands:
                print(f"$ {command_line(argv)}", flush=True)
                result = run(argv)
                results.append(json.loads(json.dumps(to_jsonable(result))) if isinstance(result, dict) else None)
    finally:
        sys.argv = saved
    return results


class Lanes:
    """Runs units, ``jobs`` at a time (see the module docstring)."""

    def __init__(self, jobs: int, threads: int, log_dir: Path):
        self.jobs, self.threads, self.log_dir = jobs, threads, log_dir
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Lanes:
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=exc[0] is None, cancel_futures=True)

    def _submit(self, unit: Unit) -> Future:
        log = str(self.log_dir / f"{unit.name}.log")
        if self.jobs == 1:
            future: Future = Future()
            try:
                future.set_result(run_commands(unit.commands, log))
            except BaseException as err:  # noqa: BLE001 - handed to the caller as the unit's failure
                future.set_exception(err)
            return future
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker, initargs=(self.threads,))
        return self._pool.submit(run_commands, unit.commands, log)

    def run(self, ledger: Ledger, units: Sequence[Unit]) -> dict[str, dict]:
        """Every unit's result: read back from the ledger, or computed here, ``jobs`` at a time; each result is
        recorded the moment its unit finishes. A failing unit ends the study with its log's path."""
        results: dict[str, dict] = {}
        todo = []
        for unit in units:
            cached = ledger.cached(unit.name, unit.deps)
            if cached is None:
                todo.append(unit)
            else:
                results[unit.name] = cached
        if len(results):
            print(f"[study] {len(results)} of {len(units)} units done earlier", flush=True)
        pending: dict[Future, tuple[Unit, float]] = {}
        queue, finished = list(todo), 0
        while queue or pending:
            while queue and len(pending) < self.jobs:
                unit = queue.pop(0)
                print(f"[study] {unit.label or unit.name}: started", flush=True)
                pending[self._submit(unit)] = (unit, time.perf_counter())
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                unit, start = pending.pop(future)
                try:
                    returned = future.result()
                except BaseException as err:
                    raise RuntimeError(f"{unit.label or unit.name} failed ({type(err).__name__}: {err}); its log: "
                                       f"{self.log_dir / (unit.name + '.log')}") from err
                seconds = time.perf_counter() - start
                results[unit.name] = ledger.record(unit.name, unit.collect(returned), seconds,
                                                   [command_line(argv) for argv in unit.commands])
                finished += 1
                print(f"[study] {unit.label or unit.name}: done in {seconds:.0f} s ({finished}/{len(todo)})",
                      flush=True)
        return results
