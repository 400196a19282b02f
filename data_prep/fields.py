"""The 40 tab-separated fields of a Criteo raw line: their names and positions."""
from __future__ import annotations

from dqrm_mpi.data.schema import NUM_DENSE, NUM_SPARSE

DENSE_NAMES = [f"I{i}" for i in range(1, NUM_DENSE + 1)]
SPARSE_NAMES = [f"C{i}" for i in range(1, NUM_SPARSE + 1)]
FIELD_NAMES = ["label"] + DENSE_NAMES + SPARSE_NAMES
NUM_FIELDS = len(FIELD_NAMES)  # 40
MAX_HEX_DIGITS = 8  # a categorical is a 32-bit hash written as up to 8 hexadecimal digits


def field_position(field: str | None, labeled: bool = True) -> str:
    """'I1' -> 'column 2 of 40' (1-based position among the tab-separated fields); of a line
    without the label column (``labeled`` False, rows to score): 'column 1 of 39'."""
    if field in FIELD_NAMES and (labeled or field != "label"):
        skip = 0 if labeled else 1
        return f"column {FIELD_NAMES.index(field) + 1 - skip} of {NUM_FIELDS - skip}"
    return "column ?"
