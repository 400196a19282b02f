"""How many values share one scale: the one vocabulary of QAT, PTQ, export and the gradient codecs.

Plain strings (they go into config.json, checkpoints and packed-file headers as they are):

    TENSOR   one scale for a whole tensor (an MLP weight matrix; a gradient message)
    CHANNEL  one scale per output channel, i.e. per row of a weight (a 1-D bias: one per tensor)
    ROW      one scale per embedding row
    TABLE    one scale per embedding table (DQRM)
"""
from __future__ import annotations

TENSOR = "tensor"
CHANNEL = "channel"
ROW = "row"
TABLE = "table"


def check_granularity(name: str, value: str, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``; ValueError naming ``name`` otherwise."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value
