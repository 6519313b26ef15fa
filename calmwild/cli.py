"""The ``calmwild`` command: one entry point over Lightning's subcommands and calmwild's analysis commands.

``fit``, ``validate``, ``test`` and ``predict`` go to LightningCLI (:mod:`calmwild.lightning_cli`; model:
DiffusionModule, data: any calmwild datamodule by class path). The other commands (:data:`calmwild.commands.COMMANDS`)
are typed functions turned into sub-commands by jsonargparse (``--config`` and ``--print_config`` included).

A user error (a bad value, file, checkpoint or data) ends in one line on stderr and exit status 2;
``CALMWILD_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from typing import Any

LIGHTNING_COMMANDS = {
    "fit": "Train a DiffusionModule from a config (LightningCLI; resumable with --ckpt_path last).",
    "validate": "Run a config's evaluation callbacks once on a checkpoint (--ckpt_path) and print their results.",
    "test": "As validate, scored against the held-out set where that differs (FID's reference).",
    "predict": "Write a checkpoint's samples: samples.pt, a PNG grid and samples.json.",
}
VARIADIC_COMMANDS = ("compare",)  # commands whose one positional argument is a list: `compare RUN RUN ... --out DIR`
DEBUG_ENV = "CALMWILD_DEBUG"


def is_user_error(err: BaseException) -> bool:
    """What a user can cause with a bad value, file or environment: reported in one line."""
    if isinstance(err, (ValueError, TypeError, OSError, FloatingPointError)):
        return True
    return type(err).__name__ == "MisconfigurationException"  # Lightning's, without importing Lightning here


def one_line(err: BaseException) -> str:
    """An exception's message on one line (continuation lines joined)."""
    text = " ".join(part.strip() for part in str(err).strip().splitlines() if part.strip())
    return text or type(err).__name__


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``calmwild`` console script; ``args`` replaces ``sys.argv[1:]`` (for tests).

    A DDP run's process group is destroyed before the interpreter exits: left to interpreter shutdown, gloo's
    worker threads can abort the process ("terminate called without an active exception") after a good run."""
    try:
        run(args)
    except Exception as err:  # noqa: BLE001 - sorted into user errors (one line) and the rest (traceback)
        if not is_user_error(err) or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"calmwild: error: {one_line(err)} ({DEBUG_ENV}=1 shows the traceback)", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        torch = sys.modules.get("torch")
        if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def command_summaries() -> dict[str, str]:
    """Every command with one line: the Lightning subcommands' and the first line of each analysis command's docstring
    (a sentence), read from :mod:`calmwild.commands`' source (not imported: ``calmwild --help`` stays instant)."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).with_name("commands.py")).read_text())
    docs = {node.name: ast.get_docstring(node) or "" for node in tree.body if isinstance(node, ast.FunctionDef)}
    table = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                 and any(getattr(target, "id", None) == "COMMANDS" for target in node.targets))
    summaries = dict(LIGHTNING_COMMANDS)
    for key, value in zip(table.keys, table.values):
        summaries[key.value] = docs[value.id].splitlines()[0].replace("``", "")
    return summaries


def print_help() -> None:
    names = command_summaries()
    width = max(map(len, names))
    lines = ["usage: calmwild <command> [options]   (calmwild <command> --help lists a command's options)", "",
             "calmwild: study and prevent memorization in diffusion models.", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {summary}" for name, summary in names.items()]
    print("\n".join(lines))


def run(args: list[str] | None = None) -> Any:
    """Runs one ``calmwild`` command and returns its result (the LightningCLI object, or the command's report)."""
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print_help()
        return None
    if argv and argv[0] not in LIGHTNING_COMMANDS and not argv[0].startswith("-"):
        from jsonargparse import auto_cli

        from calmwild.commands import COMMANDS

        if argv[0] not in COMMANDS:
            known = ", ".join(list(LIGHTNING_COMMANDS) + list(COMMANDS))
            raise SystemExit(f"calmwild: unknown command {argv[0]!r}; expected one of {known}")
        return auto_cli(COMMANDS, args=_join_positional_list(argv))
    from calmwild.lightning_cli import lightning_main

    return lightning_main(None if args is None else argv)  # None: LightningCLI reads sys.argv itself


def _join_positional_list(argv: list[str]) -> list[str]:
    """``compare a b c --out X`` as jsonargparse expects a list positional: ``compare '["a", "b", "c"]' --out X``."""
    if argv[0] not in VARIADIC_COMMANDS:
        return argv
    values = []
    for arg in argv[1:]:
        if arg.startswith("-"):
            break
        values.append(arg)
    if len(values) == 1 and values[0].lstrip().startswith("["):
        return argv
    import json

    return [argv[0], json.dumps(values), *argv[1 + len(values):]]


def __getattr__(name: str) -> Any:
    """``calmwild.cli.ResumableCSVLogger``: the class path that config files saved by earlier runs name (the class
    lives in :mod:`calmwild.lightning_cli` now)."""
    if name == "ResumableCSVLogger":
        from calmwild.lightning_cli import ResumableCSVLogger

        return ResumableCSVLogger
    raise AttributeError(f"module 'calmwild.cli' has no attribute {name!r}")


if __name__ == "__main__":
    main()
