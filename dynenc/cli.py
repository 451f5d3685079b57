"""``dynenc`` command line: bench, profile, prepare, train, eval, export.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``;
:func:`main` also serves other command tables (a recipe's) with the same error policy.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict, List, Optional, Tuple

from .errors import NonFiniteTraining, RunDirectoryLocked

#: name -> (module with ``add_arguments`` and ``run``, one-line help)
Commands = Dict[str, Tuple[str, str]]

COMMANDS: Commands = {
    "bench": ("dynenc.bench.cli", "benchmark dynenc against its peers (the README's main job)"),
    "profile": ("dynenc.profiling", "run a forward/backward under torch.profiler and write a Chrome trace"),
    "prepare": ("dynenc.asr.prepare", "check a data directory's manifests, choose its CTC units, cache its fbank"),
    "train": ("dynenc.asr.train", "train a CTC model with one of the dynamic-depth methods"),
    "eval": ("dynenc.asr.evaluate", "sweep budgets: WER vs executed compute for every method"),
    "export": (
        "dynenc.export.cli",
        "export a checkpoint at a fixed budget or with runtime early exit (ONNX, .pt2, .pte)",
    ),
}


def main(
    argv: Optional[List[str]] = None,
    commands: Commands = COMMANDS,
    prog: str = "dynenc",
    description: Optional[str] = None,
) -> int:
    """Run the command named by ``argv[0]`` from ``commands``; a user error (:data:`USER_ERRORS`)
    is printed as one line ``<prog> <command>: error: ...`` and exits 2 (``--debug``: traceback)."""
    parser = argparse.ArgumentParser(prog=prog, description=description or __doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in commands.items():
        sub = subparsers.add_parser(name, help=help_text, add_help=False)
        sub.set_defaults(_module=module_name)
    # Parse the command first, then let its module add its own arguments.
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(args._module)
    sub = argparse.ArgumentParser(prog=f"{prog} {args.command}", description=commands[args.command][1])
    sub.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    module.add_arguments(sub)
    command_args = sub.parse_args(rest)
    try:
        return int(module.run(command_args) or 0)
    except USER_ERRORS as error:
        if command_args.debug:
            raise
        # A user error is one line, like argparse's own: what went wrong and how to fix it.
        sub.exit(2, f"{sub.prog}: error: {_one_line(error)}\n")


#: Exceptions that mean bad input (flags, files, configs, data) or a run fault the user must act on
#: (a locked run directory, a diverged training), not a bug: printed as one line.
USER_ERRORS = (
    ValueError,
    TypeError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    RunDirectoryLocked,
    NonFiniteTraining,
)


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in message:
        message = f"{message}: {error.filename}"
    return message


if __name__ == "__main__":
    sys.exit(main())
