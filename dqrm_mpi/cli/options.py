"""Click parameter types and helpers shared by the commands."""
from __future__ import annotations

import re

import click


def apply_options(fn, options: list) -> object:
    """Decorate ``fn`` with Click ``options`` so that ``--help`` lists them in the given order."""
    for option in reversed(options):
        fn = option(fn)
    return fn


def version_option(fn):
    """``--version``: the installed dqrm_mpi package's version."""
    return click.version_option(package_name="dqrm_mpi")(fn)


def warn(message: str) -> None:
    click.echo(f"{click.get_current_context().info_name}: {message}", err=True)


class LayerWidths(click.ParamType):
    """MLP widths written as dash-separated integers, e.g. ``512-256-64-16``.

    inputs: the width of the MLP's input.  Widths that start with it (the reference DLRM's
    ``--arch-mlp-bot 13-512-256-64-16``) are read without it, with a note on stderr.
    """

    name = "WIDTHS"

    def __init__(self, inputs: int | None = None) -> None:
        self.inputs = inputs

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            widths = tuple(int(x) for x in str(value).split("-"))
        except ValueError:
            self.fail(f"{value!r} is not a dash-separated list of integers such as 512-256-64-16", param, ctx)
        if not widths or min(widths) < 1:
            self.fail(f"{value!r}: every width must be a positive integer", param, ctx)
        if self.inputs is not None and len(widths) > 1 and widths[0] == self.inputs:
            widths = widths[1:]
            warn(f"{param.opts[0]} {value}: read as the reference DLRM's form, which starts with the "
                 f"{self.inputs} inputs: layers {'-'.join(map(str, widths))}")
        return widths


class Words(click.Choice):
    """A choice of words plus older spellings (``aliases``: old -> word), accepted with a warning."""

    def __init__(self, words: list[str], aliases: dict[str, str | None]) -> None:
        super().__init__(words)
        self.aliases = aliases

    def convert(self, value, param, ctx):
        if value in self.aliases:
            word = self.aliases[value]
            warn(f"{param.opts[0]} {value} is deprecated: "
                 + (f"use {param.opts[0]} {word}" if word else "leave the option out"))
            return word
        return super().convert(value, param, ctx)


def in_flags(message: str) -> str:
    """A library error in the words of the command line: each parameter name of the current
    command (``pretrain_epochs``) becomes its option (``--pretrain-epochs``)."""
    params = click.get_current_context().command.params
    flags = {p.name: next((o for o in p.opts if o.startswith("--")), max(p.opts, key=len))
             for p in params if isinstance(p, click.Option) and p.expose_value}
    if not flags:
        return message
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, sorted(flags, key=len, reverse=True))) + r")(?![\w-])")
    return pattern.sub(lambda m: flags[m.group(1)], message)
