// A DLRM MLP (dqrm_mpi/model/dlrm.py: nn.Linear layers, in-place ReLU after each, or after each
// but the last) as one autograd node instead of about five per layer (AddmmBackward0, TBackward0,
// ReluBackward0 and the Python module calls): the same ATen ops on the same tensors, so the same
// bits, forward and backward.
//
//   mlp(x [B, in], weights [L] of [out_l, in_l], biases [L] of [out_l], relu_last) -> y [B, out_L]
//       per layer: h = addmm(b, h, W.t()) (what F.linear runs for a 2-D input with a bias), then
//       relu_(h) (nn.ReLU(inplace=True)) after every layer, or every layer but the last
//
// Backward, per layer from the last, what autograd runs for those modules: threshold_backward(g, h, 0)
// for the ReLU (h its output), the bias gradient as the engine reduces addmm's broadcast `self`
// gradient (at::sum_to), the weight's and the input's in the forms mm_mat2_backward and
// mm_mat1_backward pick (torch/csrc/autograd/FunctionsManual.cpp) for mat2 = W.t(), the weight's
// transposed back as TBackward0 does; each only where needed.  The weights may be any tensors (e.g.
// QAT's fake-quantized weights, whose own node passes the gradient on).  Float32, strided, CPU.
#include "common.h"

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void check_mlp_args(const at::Tensor& x, at::TensorList weights, at::TensorList biases) {
  dqrm::check_cpu_float(x, "mlp x");
  TORCH_CHECK(x.layout() == at::kStrided && x.dim() == 2, "mlp: x must be a strided 2-D [B, in] tensor, got ",
              x.layout(), " of shape ", x.sizes());
  TORCH_CHECK(!weights.empty() && weights.size() == biases.size(),
              "mlp: expected as many biases as weights (at least one), got ", weights.size(), " weights and ",
              biases.size(), " biases");
  int64_t width = x.size(1);
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor& w = weights[l];
    const at::Tensor& b = biases[l];
    dqrm::check_cpu_float(w, "mlp weight");
    dqrm::check_cpu_float(b, "mlp bias");
    TORCH_CHECK(w.layout() == at::kStrided && b.layout() == at::kStrided && w.dim() == 2 && w.size(1) == width &&
                    b.dim() == 1 && b.size(0) == w.size(0),
                "mlp: layer ", l, " needs a weight [out, ", width, "] and a bias [out], got ", w.sizes(), " and ",
                b.sizes());
    width = w.size(0);
  }
}

// Whether layer l of L is followed by a ReLU.
bool relu_after(size_t l, size_t layers, bool relu_last) { return relu_last || l + 1 < layers; }

// The forward pass; `inputs` (when given) receives each layer's input (x, then the ReLU outputs).
at::Tensor mlp_layers(const at::Tensor& x, at::TensorList weights, at::TensorList biases, bool relu_last,
                      std::vector<at::Tensor>* inputs) {
  check_mlp_args(x, weights, biases);
  at::Tensor h = x;
  for (size_t l = 0; l < weights.size(); ++l) {
    if (inputs != nullptr) inputs->push_back(h);
    h = at::addmm(biases[l], h, weights[l].t());
    if (relu_after(l, weights.size(), relu_last)) at::relu_(h);
  }
  return h;
}

at::Tensor mlp(const at::Tensor& x, at::TensorList weights, at::TensorList biases, bool relu_last) {
  return mlp_layers(x, weights, biases, relu_last, nullptr);
}

// Whether a 2-D tensor of these sizes and strides is column-major (FunctionsManual.cpp's test).
bool column_major(at::IntArrayRef sizes, at::IntArrayRef strides) {
  return strides[0] == 1 && strides[1] == sizes[0];
}

// addmm's gradient for mat2 = w.t() (mm_mat2_backward), transposed back to w's shape (TBackward0):
// g.t().mm(input).t().t() is g.t().mm(input) (the usual case: w row-major, so w.t() column-major).
at::Tensor weight_grad(const at::Tensor& g, const at::Tensor& input, const at::Tensor& w) {
  const at::Tensor mat2 = w.t();
  if (column_major(mat2.sizes(), mat2.strides())) return g.t().mm(input);
  return input.t().mm(g).t();
}

// addmm's gradient for mat1 = input, with mat2 = w.t() (mm_mat1_backward).
at::Tensor input_grad(const at::Tensor& g, const at::Tensor& input, const at::Tensor& w) {
  const at::Tensor mat2 = w.t();
  if (column_major(input.sizes(), input.strides())) return mat2.mm(g.t()).t();
  return g.mm(mat2.t());
}

// Saved: the L layer inputs, the L weights, and with relu_last the output (the last ReLU's output).
struct Mlp : public torch::autograd::Function<Mlp> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights,
                            at::TensorList biases, bool relu_last) {
    at::AutoDispatchBelowADInplaceOrView guard;
    variable_list saved;
    saved.reserve(2 * weights.size() + 1);
    at::Tensor y = mlp_layers(x, weights, biases, relu_last, &saved);
    saved.insert(saved.end(), weights.begin(), weights.end());
    if (relu_last) saved.push_back(y);
    ctx->save_for_backward(saved);
    ctx->saved_data["relu_last"] = relu_last;
    return y;
  }

  // Gradients in the forward's argument order: x, weights[0..L), biases[0..L), (none for relu_last).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const variable_list saved = ctx->get_saved_variables();
    const bool relu_last = ctx->saved_data["relu_last"].toBool();
    const size_t layers = (saved.size() - (relu_last ? 1 : 0)) / 2;
    variable_list out(2 + 2 * layers);  // the last: relu_last, no gradient
    // whether anything at or before layer l needs a gradient (else backward stops there)
    std::vector<bool> needed(layers);
    bool any = ctx->needs_input_grad(0);
    for (size_t l = 0; l < layers; ++l) {
      any = any || ctx->needs_input_grad(1 + l) || ctx->needs_input_grad(1 + layers + l);
      needed[l] = any;
    }
    at::Tensor g = grads[0];
    for (size_t l = layers; l-- > 0;) {
      if (!needed[l]) break;
      const at::Tensor& input = saved[l];
      const at::Tensor& w = saved[layers + l];
      if (relu_after(l, layers, relu_last)) {
        const at::Tensor& relu_out = l + 1 < layers ? saved[l + 1] : saved[2 * layers];
        g = at::threshold_backward(g, relu_out, 0);
      }
      if (ctx->needs_input_grad(1 + layers + l)) {
        const int64_t width = w.size(0);
        out[1 + layers + l] = at::sum_to(g, at::IntArrayRef(width));
      }
      if (ctx->needs_input_grad(1 + l)) out[1 + l] = weight_grad(g, input, w);
      if (l > 0 ? needed[l - 1] : ctx->needs_input_grad(0)) g = input_grad(g, input, w);
    }
    if (ctx->needs_input_grad(0)) out[0] = g;
    return out;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(dqrm, m) {
  m.def("mlp(Tensor x, Tensor[] weights, Tensor[] biases, bool relu_last) -> Tensor");
}

TORCH_LIBRARY_IMPL(dqrm, CPU, m) { m.impl("mlp", mlp); }

TORCH_LIBRARY_IMPL(dqrm, Autograd, m) {
  m.impl("mlp", [](const at::Tensor& x, at::TensorList weights, at::TensorList biases, bool relu_last) {
    return Mlp::apply(x, weights, biases, relu_last);
  });
}
