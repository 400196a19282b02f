"""Typed errors of dqrm-prep.  The library raises these; the CLI turns them into ClickException."""
from __future__ import annotations

from .fields import field_position


class PrepError(Exception):
    """Base class: something prevents making the dataset."""


class InputError(PrepError):
    """The raw input is missing, empty, unreadable or not in the Criteo format."""


class BadLineError(InputError):
    """One line of the raw input is malformed.

    path: the file; line: 1-based line number in the (decompressed) file; field: the
    field's name (``label``, ``I1``..``I13``, ``C1``..``C26``) or None for the whole
    line; value: what was found; expected: what was expected.
    """

    def __init__(self, path: str, line: int, field: str | None, value: str, expected: str,
                 found: str | None = None, labeled: bool = True) -> None:
        self.path, self.line, self.field, self.value, self.expected = str(path), int(line), field, value, expected
        self.found, self.labeled = found, labeled
        where = f"{self.path}:{self.line}"
        what = f"field {field} ({field_position(field, labeled)}): " if field else ""
        got = f"{found}: {value!r}" if found else repr(value)
        super().__init__(f"{where}: {what}expected {expected}, got {got}")

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.path, self.line, self.field, self.value, self.expected, self.found, self.labeled))

    def to_dict(self) -> dict:
        return {"path": self.path, "line": self.line, "field": self.field, "value": self.value,
                "expected": self.expected}


class OutputError(PrepError):
    """The output directory cannot be created, written, or holds another dataset."""


class OptionsMismatchError(OutputError):
    """The output directory holds (part of) a dataset made with other options or inputs."""

