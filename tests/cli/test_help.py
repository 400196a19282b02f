"""Every command's ``--help``: it exits 0 and documents every option the command has.

The one place that checks help text.  What to check is read from the Click command
objects (options, arguments, subcommands), so a new option is covered without editing
this file and no help prose is copied here.
"""
from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from data_prep.cli import cli as prep_cli
from dqrm_mpi.cli.evaluate import main as eval_main
from dqrm_mpi.cli.export import main as export_main
from dqrm_mpi.cli.predict import main as predict_main
from dqrm_mpi.cli.train import main as train_main

PROGRAMS = {"dqrm-prep": prep_cli, "dqrm-train": train_main, "dqrm-export": export_main, "dqrm-eval": eval_main,
            "dqrm-predict": predict_main}


def _commands() -> list[tuple[str, list[str], click.Command]]:
    """(program, subcommand path, command) for every program and every subcommand."""
    found = []

    def walk(prog: str, path: list[str], cmd: click.Command) -> None:
        found.append((prog, path, cmd))
        if isinstance(cmd, click.Group):
            for name, sub in sorted(cmd.commands.items()):
                walk(prog, path + [name], sub)

    for prog, cmd in PROGRAMS.items():
        walk(prog, [], cmd)
    return found


COMMANDS = _commands()


def _squash(text: str) -> str:
    """Text without whitespace: help is re-wrapped (also at hyphens) when printed."""
    return re.sub(r"\s+", "", text)


def _help(prog: str, path: list[str]) -> str:
    result = CliRunner().invoke(PROGRAMS[prog], [*path, "--help"], prog_name=prog)
    assert result.exit_code == 0, result.output
    return result.output


def test_every_program_and_subcommand_is_covered():
    names = {" ".join([prog, *path]) for prog, path, _ in COMMANDS}
    assert names == {"dqrm-prep", "dqrm-prep criteo", "dqrm-prep synth", "dqrm-prep verify", "dqrm-prep inspect",
                     "dqrm-train", "dqrm-export", "dqrm-eval", "dqrm-predict"}


@pytest.mark.parametrize("prog, path, command", COMMANDS, ids=[" ".join([p, *s]) for p, s, _ in COMMANDS])
def test_help_documents_every_option(prog, path, command):
    out = _help(prog, path)
    squashed = _squash(out)
    full_name = " ".join([prog, *path])
    usage = out.split("\n\n", 1)[0]
    assert usage.startswith(f"Usage: {full_name} ")
    assert command.help and _squash(command.help.split("\n\n", 1)[0]) in squashed
    # An example that runs this very command.
    assert "Example" in out and full_name in out.split("Example", 1)[1]
    ctx = command.make_context(prog, [], resilient_parsing=True)
    for param in command.params:
        if isinstance(param, click.Argument):
            assert param.human_readable_name in usage, (full_name, param.name)
            continue
        flags = param.opts + param.secondary_opts
        if param.hidden:
            assert not any(flag in out for flag in flags), (full_name, flags)
            continue
        for flag in flags:
            assert re.search(rf"(^|[\s,/]){re.escape(flag)}($|[\s,/=])", out, re.M), (full_name, flag)
        assert param.help, f"{full_name} {flags[0]}: no help text"
        # The help text with the default where the option shows one ("[default: ...]").
        assert _squash(param.get_help_record(ctx)[1]) in squashed, (full_name, flags[0])
    if isinstance(command, click.Group):
        listed = out.split("Commands:", 1)[1]
        for name in command.commands:
            assert re.search(rf"^\s+{name}\s", listed, re.M), (full_name, name)
