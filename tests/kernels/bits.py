"""The kernels' tests' one notion of "the same numbers"."""
import torch


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and dtype; float32: NaN at the same places and the same bits elsewhere (so -0.0
    differs from +0.0); other dtypes: equal.  Which NaN an operation on two NaNs gives depends on
    the operand order the compiler picks (and the PyTorch path's own forms differ there), and a
    NaN anywhere stops the step: only where the NaNs are matters."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach(), b.detach()
    if a.dtype != torch.float32:
        return torch.equal(a, b)
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))
