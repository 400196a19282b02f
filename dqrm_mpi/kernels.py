"""dqrm_mpi's fused CPU kernels (``dqrm_mpi/csrc``, built by ``setup.py`` into ``dqrm_mpi._kernels``):
the one place that loads them.

Every caller keeps a PyTorch path with the same numbers and asks ``enabled()`` first: the
kernels run on CPU tensors only, ``DQRM_KERNELS=0`` turns them off (to compare speed), and a
source checkout that was not built (no ``_kernels`` library) runs the PyTorch path after one
warning.  ``disabled()`` switches them off for a block (tests comparing the two paths).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator

import torch

try:
    from . import _kernels  # noqa: F401  (importing it registers torch.ops.dqrm.*)
except ImportError as error:
    BUILT, WHY_NOT = False, str(error)
else:
    BUILT, WHY_NOT = True, ""

_enabled = BUILT and os.environ.get("DQRM_KERNELS", "1") != "0"
if not BUILT and os.environ.get("DQRM_KERNELS", "1") != "0":
    warnings.warn(f"dqrm_mpi's CPU kernels are not built ({WHY_NOT}); running the slower PyTorch path. "
                  "Build them with `make install` (or `pip install --no-build-isolation -e .`).", stacklevel=2)

ops = torch.ops.dqrm


def enabled() -> bool:
    """Whether callers should use ``ops`` (for CPU tensors)."""
    return _enabled


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """The PyTorch paths inside the block (the kernels' reference in tests)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before
