"""``dynenc`` command line: bench, profile, data, train, eval, export, deploy.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

COMMANDS = {
    "bench": ("dynenc.bench.cli", "benchmark dynenc against its peers (the README's main job)"),
    "profile": ("dynenc.profiling", "run a forward/backward under torch.profiler and write a Chrome trace"),
    "data": ("dynenc.recipe.data", "synthesise the multi-engine speech corpus"),
    "train": ("dynenc.recipe.train", "train a CTC model with one of the dynamic-depth methods"),
    "eval": ("dynenc.recipe.evaluate", "sweep budgets: WER vs executed compute for every method"),
    "recipe": ("dynenc.recipe.reproduce", "reproduce the seed papers' claims: every protocol x seed, resumable"),
    "export": ("dynenc.export", "export a checkpoint at a fixed budget or with runtime early exit (ONNX, .pt2, .pte)"),
    "deploy": ("dynenc.recipe.deploy", "WER and batch-1 latency per budget on the CPU: eager vs ORT fp32/int8"),
}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dynenc", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, add_help=False)
        sub.set_defaults(_module=module_name)
    # Parse the command first, then let its module add its own arguments.
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(args._module)
    sub = argparse.ArgumentParser(prog=f"dynenc {args.command}", description=COMMANDS[args.command][1])
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


#: Exceptions that mean bad input (flags, files, configs, data), not a bug: printed as one line.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in message:
        message = f"{message}: {error.filename}"
    return message


if __name__ == "__main__":
    sys.exit(main())
