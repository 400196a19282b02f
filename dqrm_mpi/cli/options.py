"""Click parameter types shared by the commands."""
from __future__ import annotations

import click


class LayerWidths(click.ParamType):
    """MLP widths written as dash-separated integers, e.g. ``512-256-64-16``."""

    name = "WIDTHS"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            widths = tuple(int(x) for x in str(value).split("-"))
        except ValueError:
            self.fail(f"{value!r} is not a dash-separated list of integers such as 512-256-64-16", param, ctx)
        if not widths or min(widths) < 1:
            self.fail(f"{value!r}: every width must be a positive integer", param, ctx)
        return widths
