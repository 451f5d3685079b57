"""Every flag of every ``dynenc`` command says what it is: help text, and choices where a flag
takes one of a few names."""
import argparse
import importlib

import pytest

from dynenc.cli import COMMANDS


def _parser(command):
    parser = argparse.ArgumentParser(prog=f"dynenc {command}")
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    return parser


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_flag_has_help_text(command):
    missing = [action.dest for action in _parser(command)._actions
               if not isinstance(action, argparse._HelpAction) and not action.help]
    assert not missing


@pytest.mark.parametrize("flag, choices", [("--gating", ("per_sample", "per_batch")), ("--strategy", ("ddp", "fsdp2")),
                                           ("--spec-augment", None)])
def test_train_flags_with_few_values_offer_them(flag, choices):
    action = next(a for a in _parser("train")._actions if flag in a.option_strings)
    if choices is None:  # a bool field: true / false
        assert action.metavar == "{true,false}"
    else:
        assert tuple(action.choices) == choices
