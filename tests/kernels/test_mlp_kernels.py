"""The fused MLP (dqrm_mpi/csrc/mlp.cpp, one autograd node per MLP) gives the PyTorch path's bits
(nn.Linear + nn.ReLU(inplace=True) under autograd): outputs and the gradients of weights, biases
and input compared bit for bit with ``kernels.disabled()``, at 1 and 2 threads, on awkward batch
sizes and values (exact zeros and -0.0 at the ReLU, NaN and inf), non-contiguous inputs and
weights, and the parameters after FP32 and INT4 QAT training steps."""
import contextlib

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dqrm_mpi import kernels
from dqrm_mpi.model import DLRM, ModelConfig
from dqrm_mpi.model.dlrm import BottomMLP, TopMLP
from dqrm_mpi.quant import QuantConfig, prepare_qat
from dqrm_mpi.quant.qat import QuantLinear

from .bits import same_bits
from .paths import PATHS, assert_same_states, states_after_training

pytestmark = pytest.mark.skipif(not kernels.enabled(), reason="the kernels are not built, or DQRM_KERNELS=0")
NAN, INF = float("nan"), float("inf")
KAGGLE_BOTTOM, KAGGLE_TOP = (13, (512, 256, 64, 16)), (367, (512, 256, 1))


def fused_node(y: torch.Tensor) -> bool:
    """Whether y came out of the fused MLP's autograd node (TopMLP's through its squeeze)."""
    node = y.grad_fn
    if node is not None and node.name() == "SqueezeBackward1":
        node = node.next_functions[0][0]
    return node is not None and "Mlp" in node.name()


def awkward_mlp(cls, in_features: int, widths: tuple[int, ...], seed: int) -> nn.Module:
    """The MLP with some weight rows zeroed and their biases 0.0 or -0.0 (outputs exactly 0 at the
    ReLU: MKL's sums give +0.0 there) and another bias large negative (ReLU outputs 0 for most samples)."""
    torch.manual_seed(seed)
    mlp = cls(in_features, widths)
    with torch.no_grad():
        for layer in mlp.layers:
            if isinstance(layer, nn.Linear) and layer.out_features > 4:
                layer.weight[1:3] = 0.0
                layer.bias[1], layer.bias[2] = 0.0, -0.0
                layer.bias[3] = -50.0
    return mlp


def awkward_values(shape, gen: torch.Generator) -> torch.Tensor:
    """Normal values with about a tenth of them 0.0 or -0.0."""
    x = torch.randn(shape, generator=gen)
    u = torch.rand(shape, generator=gen)
    return torch.where(u < 0.05, 0.0, torch.where(u < 0.1, -0.0, x))


def gradient_strides(tensors: list[torch.Tensor]) -> tuple[list, list]:
    """(strides, hook handles): the strides of every gradient reaching each of ``tensors``, as
    backward forms it (a leaf's .grad takes the leaf's layout whatever the form)."""
    strides: list = []
    handles = [t.register_hook(lambda g, i=i: strides.append((i, g.stride()))) for i, t in enumerate(tensors)]
    return strides, handles


def run_both_ways(mlp: nn.Module, x: torch.Tensor, grad: torch.Tensor, x_grad: bool, backwards: int = 1):
    """(output, every parameter's gradient, x's gradient, the gradients' strides as formed) on each
    path, ``backwards`` passes accumulating into the same gradients."""
    results = []
    for context in PATHS:
        mlp.zero_grad(set_to_none=True)
        xx = x.detach().requires_grad_(x_grad)  # a leaf with x's layout
        params = list(mlp.parameters())
        strides, handles = gradient_strides(params + ([xx] if x_grad else []))
        with context():
            for _ in range(backwards):
                y = mlp(xx)
                assert fused_node(y) == (context is contextlib.nullcontext)
                y.backward(grad)
        for handle in handles:
            handle.remove()
        results.append(([y.detach()] + [p.grad for p in params] + ([xx.grad] if x_grad else []), sorted(strides)))
    return results


def assert_same(results) -> None:
    (slow, slow_strides), (fast, fast_strides) = results
    assert len(slow) == len(fast) and fast_strides == slow_strides
    for i, (a, b) in enumerate(zip(slow, fast)):
        assert same_bits(b, a), f"result {i} (0: output, then the parameters' gradients, then x's)"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 3, 37, 128, 513])
@pytest.mark.parametrize("part", ["bottom", "top"])
def test_kaggle_mlps_forward_and_backward_bits(part, batch, threads, set_threads):
    set_threads(threads)
    cls, (width, widths) = (BottomMLP, KAGGLE_BOTTOM) if part == "bottom" else (TopMLP, KAGGLE_TOP)
    mlp = awkward_mlp(cls, width, widths, seed=batch)
    gen = torch.Generator().manual_seed(batch)
    x = awkward_values((batch, width), gen)
    grad = awkward_values((batch, widths[-1]), gen)
    if part == "top":
        grad = grad.squeeze(-1)
    assert_same(run_both_ways(mlp, x, grad, x_grad=part == "top"))


@pytest.mark.parametrize("widths", [(7, 1), (1, 5), (3,), (1,)], ids=str)
@pytest.mark.parametrize("cls", [BottomMLP, TopMLP])
def test_small_and_out_one_layers_both_relu_placements(cls, widths):
    """ReLU after the last layer (BottomMLP) or not (TopMLP; its last width must be 1), out=1
    layers, a single layer; the input's gradient too; gradients accumulated over two passes."""
    if cls is TopMLP and widths[-1] != 1:
        widths = (*widths, 1)
    mlp = awkward_mlp(cls, 6, widths, seed=len(widths))
    gen = torch.Generator().manual_seed(3)
    x = awkward_values((9, 6), gen)
    grad = awkward_values((9, widths[-1]), gen)
    if cls is TopMLP:
        grad = grad.squeeze(-1)
    assert_same(run_both_ways(mlp, x, grad, x_grad=True, backwards=2))


def test_nan_and_inf_propagate_alike():
    mlp = awkward_mlp(TopMLP, 20, (30, 10, 1), seed=1)
    with torch.no_grad():
        mlp.layers[2].weight[4, 7] = INF
        mlp.layers[0].bias[5] = -INF
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(17, 20, generator=gen)
    x[3, 2], x[5, 9], x[8] = NAN, INF, -INF
    grad = torch.randn(17, generator=gen)
    grad[11] = NAN
    results = run_both_ways(mlp, x, grad, x_grad=True)
    assert results[0][0][0].isnan().any() and results[0][0][1].isnan().any()  # the values did reach the results
    assert_same(results)


@pytest.mark.parametrize("layout", ["every_other_column", "column_major"])
def test_non_contiguous_input(layout):
    """A strided input, and a column-major one (autograd then forms the input's gradient as
    (W.t() @ g.t()).t(), mm_mat1_backward's column-major branch)."""
    mlp = awkward_mlp(TopMLP, 24, (40, 1), seed=2)
    gen = torch.Generator().manual_seed(5)
    if layout == "every_other_column":
        x = torch.randn(33, 48, generator=gen)[:, ::2]
    else:
        x = torch.randn(24, 33, generator=gen).t()
    assert not x.is_contiguous()
    grad = torch.randn(33, generator=gen)
    results = run_both_ways(mlp, x, grad, x_grad=True)
    x_strides = [s for i, s in results[1][1] if i == 4]
    assert x_strides == [(1, 33) if layout == "column_major" else (24, 1)]  # as autograd forms them
    assert_same(results)


def reference_mlp(x, weights, biases, relu_last):
    """What nn.Linear and nn.ReLU(inplace=True) run."""
    for i, (w, b) in enumerate(zip(weights, biases)):
        x = F.linear(x, w, b)
        if relu_last or i < len(weights) - 1:
            x = F.relu(x, inplace=True)
    return x


@pytest.mark.parametrize("relu_last", [False, True])
def test_op_with_weights_from_other_nodes_transposed_and_frozen(relu_last):
    """kernels.ops.mlp directly: a weight that is another node's output (as QAT's fake-quantized
    weights are), one stored transposed (mm_mat2_backward's other branch), a frozen weight and a
    frozen bias (their gradients not formed), an input without gradient."""
    gen = torch.Generator().manual_seed(6)
    shapes = [(16, 10), (12, 16), (5, 12)]
    leaves = [torch.randn(*s, generator=gen) for s in shapes] + [torch.randn(s[0], generator=gen) for s in shapes]
    x = torch.randn(21, 10, generator=gen)
    grad = torch.randn(21, 5, generator=gen)
    results = []
    for use_op in (False, True):
        params = [t.clone().requires_grad_(i not in (1, 4)) for i, t in enumerate(leaves)]  # W1 and b1 frozen
        weights = [params[0] * 2.0, params[1], params[2].t().contiguous().t()]  # a product; a transposed copy
        biases = params[3:]
        y = (kernels.ops.mlp(x, weights, biases, relu_last) if use_op else
             reference_mlp(x, weights, biases, relu_last))
        y.backward(grad)
        results.append([y] + [p.grad for p in params if p.requires_grad])
    assert all(same_bits(b, a) for a, b in zip(*results))
    assert len(results[0]) == 1 + 4


def test_eval_and_no_grad_forward():
    mlp = awkward_mlp(BottomMLP, 13, (64, 16), seed=3).eval()
    x = torch.randn(50, 13, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        fast = mlp(x)
        with kernels.disabled():
            slow = mlp(x)
    assert fast.grad_fn is None and same_bits(fast, slow)
    with torch.inference_mode():
        assert same_bits(mlp(x), slow)


def test_the_fused_path_only_where_it_gives_the_same_numbers():
    """QuantLinear layers with weight quantization take the fused path; activation quantization,
    another layer type, or a layer without bias keep the modules (and their numbers)."""
    torch.manual_seed(0)
    x = torch.randn(8, 13)
    model = DLRM(ModelConfig(embedding_dim=8, bottom_mlp=(16, 8), top_mlp=(8, 1), cardinalities=(3,) * 26))
    assert fused_node(model.bottom(x))
    prepare_qat(model, QuantConfig(mlp_bits=4))
    assert fused_node(model.bottom(x))
    act = DLRM(ModelConfig(embedding_dim=8, bottom_mlp=(16, 8), top_mlp=(8, 1), cardinalities=(3,) * 26))
    prepare_qat(act, QuantConfig(mlp_bits=4, act_bits=8))
    assert isinstance(act.bottom.layers[0], QuantLinear) and not fused_node(act.bottom(x))
    for layer in act.bottom.layers[0::2]:  # quantization switched off: F.linear(x, weight, bias)
        layer.set_enabled(False)
    assert fused_node(act.bottom(x))
    plain = BottomMLP(13, (16, 8))
    plain.layers[1] = nn.Identity()
    assert not fused_node(plain(x))
    plain.layers[1] = nn.ReLU()  # not in place: the module path too
    assert not fused_node(plain(x))
    plain.layers[1] = nn.ReLU(inplace=True)
    assert fused_node(plain(x))
    plain.layers[0] = nn.Linear(13, 16, bias=False)
    assert not fused_node(plain(x))


def test_op_rejects_bad_arguments_with_clear_errors():
    x, w, b = torch.randn(4, 5), torch.randn(3, 5), torch.randn(3)
    with pytest.raises(RuntimeError, match="as many biases as weights"):
        kernels.ops.mlp(x, [w], [], True)
    with pytest.raises(RuntimeError, match=r"layer 1 needs a weight \[out, 3\]"):
        kernels.ops.mlp(x, [w, w], [b, b], True)
    with pytest.raises(RuntimeError, match="float32 CPU"):
        kernels.ops.mlp(x.double(), [w], [b], True)
    with pytest.raises(RuntimeError, match="2-D"):
        kernels.ops.mlp(x[0], [w], [b], True)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("quant", [None, QuantConfig(emb_bits=4, mlp_bits=4, scale_period=3)], ids=["fp32", "int4"])
def test_training_steps_give_the_same_parameters(quant, threads, set_threads):
    """Kaggle's MLP widths (tiny tables), batch 64, 5 SGD steps, FP32 and INT4 QAT (MLP per
    channel): every parameter and buffer equal on both paths."""
    set_threads(threads)
    cards = (6, 4, 9) + (5,) * 23
    config = ModelConfig(embedding_dim=16, bottom_mlp=KAGGLE_BOTTOM[1], top_mlp=KAGGLE_TOP[1], cardinalities=cards)
    gen = torch.Generator().manual_seed(8)
    batches = [(torch.rand(64, 13, generator=gen), torch.stack([torch.randint(0, c, (64,), generator=gen)
                                                                   for c in cards], dim=1),
                (torch.rand(64, generator=gen) < 0.3).float()) for _ in range(5)]
    assert_same_states(states_after_training(config, quant, batches, steps=len(batches)))
