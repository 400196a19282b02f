// One rank's FP32 step outside the matmuls: the pairwise interaction's pair gather and its
// backward, the sparse SGD and Adagrad row updates of the flat embedding table and the finite
// check.  Each op gives the numbers of the PyTorch path it replaces (dqrm_mpi/model/dlrm.py,
// dqrm_mpi/train/sgd.py, dqrm_mpi/train/optimizers.py, dqrm_mpi/train/agreement.py) bit for
// bit.  The interaction's ops (each sample on its own) and the finite check (an any) split over torch's intra-op threads; the
// sparse updates stay on one thread (a row's repeated updates in the gradient's order).
#include "common.h"

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

// random rows of a large table: ask for the row this many ahead while updating the current one
constexpr int64_t kAhead = 16;
// values per thread's share of a parallel_for: below this a second thread costs more than it saves
constexpr int64_t kGrain = 65536;

// samples of `values` floats each per thread's share of a parallel_for (at least one)
int64_t grain_samples(int64_t values) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(values, 1)); }

using dqrm::check_cpu_float;

// bottom float32 [B, d], dots float32 [B, V, V], pairs int64 [P] (positions in the flattened
// V * V) -> [B, d + P]: cat([bottom, dots.flatten(1).index_select(1, pairs)], 1).
at::Tensor emb_pairs_forward(const at::Tensor& bottom, const at::Tensor& dots, const at::Tensor& pairs) {
  check_cpu_float(bottom, "emb_pairs_forward bottom");
  check_cpu_float(dots, "emb_pairs_forward dots");
  TORCH_CHECK(bottom.dim() == 2 && dots.dim() == 3 && dots.size(0) == bottom.size(0) && dots.size(1) == dots.size(2),
              "emb_pairs_forward: bottom [B, d] and dots [B, V, V] expected, got ", bottom.sizes(), " and ",
              dots.sizes());
  TORCH_CHECK(pairs.scalar_type() == at::kLong && pairs.dim() == 1, "emb_pairs_forward: pairs must be int64 [P]");
  const auto bo = bottom.contiguous();
  const auto dd = dots.contiguous();
  const auto pp = pairs.contiguous();
  const int64_t batch = bo.size(0), dim = bo.size(1), square = dd.size(1) * dd.size(2), npairs = pp.size(0);
  const int64_t* p = pp.data_ptr<int64_t>();
  for (int64_t j = 0; j < npairs; ++j) {
    TORCH_CHECK_INDEX(p[j] >= 0 && p[j] < square, "emb_pairs_forward: pair position ", p[j], " out of range");
  }
  auto out = at::empty({batch, dim + npairs}, bo.options());
  const float* src_b = bo.data_ptr<float>();
  const float* src_d = dd.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, batch, grain_samples(dim + npairs), [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      float* row = o + b * (dim + npairs);
      std::memcpy(row, src_b + b * dim, dim * sizeof(float));
      const float* d = src_d + b * square;
      for (int64_t j = 0; j < npairs; ++j) {
        row[dim + j] = d[p[j]];
      }
    }
  });
  return out;
}

// grad float32 [B, d + P], pairs int64 [P] -> out float32 [B, V, V] (contiguous, overwritten):
// the dots' gradient as index_select's backward forms it (zeros, then 0 + g at each pair
// position: -0.0 becomes +0.0 as there).  One sample's [V, V] at a time, in cache.
void emb_pairs_backward(const at::Tensor& grad, const at::Tensor& pairs, at::Tensor& out) {
  check_cpu_float(grad, "emb_pairs_backward grad");
  check_cpu_float(out, "emb_pairs_backward out");
  const auto g = grad.contiguous();
  const auto pp = pairs.contiguous();
  const int64_t batch = g.size(0), npairs = pp.size(0), dim = g.size(1) - npairs;
  TORCH_CHECK(g.dim() == 2 && dim >= 0, "emb_pairs_backward: grad must be [B, d + ", npairs, "], got ", g.sizes());
  TORCH_CHECK(out.dim() == 3 && out.size(0) == batch && out.size(1) == out.size(2) && out.is_contiguous(),
              "emb_pairs_backward: out must be contiguous [", batch, ", V, V], got ", out.sizes());
  const int64_t square = out.size(1) * out.size(2);
  const int64_t* p = pp.data_ptr<int64_t>();
  for (int64_t j = 0; j < npairs; ++j) {
    TORCH_CHECK_INDEX(p[j] >= 0 && p[j] < square, "emb_pairs_backward: pair position ", p[j], " out of range");
  }
  const float* src = g.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, batch, grain_samples(square), [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const float* row = src + b * (dim + npairs) + dim;
      float* d = o + b * square;
      std::memset(d, 0, square * sizeof(float));
      for (int64_t j = 0; j < npairs; ++j) {
        d[p[j]] = 0.0f + row[j];
      }
    }
  });
}

DQRM_CLONES void add_transposed(const float* g1, const float* g2t, int64_t vectors, int64_t dim, float* out) {
  // out[v, k] = g1[v, k] + g2t[k, v] for one sample
  for (int64_t v = 0; v < vectors; ++v) {
    for (int64_t k = 0; k < dim; ++k) {
      out[v * dim + k] = g1[v * dim + k] + g2t[k * vectors + v];
    }
  }
}

// The interaction's input gradients from its two bmm gradients: grad float32 [B, d + P] (the
// output's), g1 = bmm(dD, vectors) float32 [B, V, d], g2 = bmm(vectors^T, dD) float32 [B, d, V]
// -> (bottom's gradient [B, d] = grad[:, :d] + (g1 + g2^T)[:, 0], the embeddings' [B, V - 1, d]
// = (g1 + g2^T)[:, 1:]), the sums autograd forms (float addition commutes: same bits).
std::tuple<at::Tensor, at::Tensor> emb_interaction_grads(const at::Tensor& grad, const at::Tensor& g1,
                                                         const at::Tensor& g2) {
  check_cpu_float(grad, "emb_interaction_grads grad");
  check_cpu_float(g1, "emb_interaction_grads g1");
  check_cpu_float(g2, "emb_interaction_grads g2");
  const int64_t batch = g1.size(0), vectors = g1.size(1), dim = g1.size(2);
  TORCH_CHECK(g2.sizes() == at::IntArrayRef({batch, dim, vectors}) && grad.dim() == 2 && grad.size(0) == batch &&
                  grad.size(1) >= dim,
              "emb_interaction_grads: shapes ", grad.sizes(), ", ", g1.sizes(), ", ", g2.sizes(), " do not fit");
  const auto gr = grad.contiguous();
  const auto a = g1.contiguous();
  const auto c = g2.contiguous();
  auto bottom = at::empty({batch, dim}, a.options());
  auto emb = at::empty({batch, vectors - 1, dim}, a.options());
  const int64_t width = gr.size(1);
  at::parallel_for(0, batch, grain_samples(3 * vectors * dim), [&](int64_t lo, int64_t hi) {
    std::vector<float> sum(vectors * dim);
    for (int64_t b = lo; b < hi; ++b) {
      add_transposed(a.data_ptr<float>() + b * vectors * dim, c.data_ptr<float>() + b * vectors * dim, vectors, dim,
                     sum.data());
      const float* g = gr.data_ptr<float>() + b * width;
      float* bo = bottom.data_ptr<float>() + b * dim;
      for (int64_t k = 0; k < dim; ++k) {
        bo[k] = g[k] + sum[k];
      }
      std::memcpy(emb.data_ptr<float>() + b * (vectors - 1) * dim, sum.data() + dim,
                  (vectors - 1) * dim * sizeof(float));
    }
  });
  return {bottom, emb};
}

DQRM_CLONES void axpy_rows(float* weight, int64_t dim, const int64_t* ids, const float* values, int64_t nnz,
                           float alpha) {
  // one row after another, as torch's CPU add_(sparse) does (fused multiply-add, MKL's saxpy)
  for (int64_t k = 0; k < nnz; ++k) {
    if (k + kAhead < nnz) {
      __builtin_prefetch(weight + ids[k + kAhead] * dim, 1);
    }
    float* row = weight + ids[k] * dim;
    const float* v = values + k * dim;
    for (int64_t j = 0; j < dim; ++j) {
      row[j] = std::fmaf(v[j], alpha, row[j]);
    }
  }
}

// weight float32 [rows, d] (contiguous, updated in place), indices int64 [1, nnz], values
// float32 [nnz, d]: weight.add_(sparse_coo(indices, values), alpha), row after row in the
// order of the sparse gradient (duplicates not merged), as torch does on the CPU.
void emb_sgd_sparse_(at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values, double alpha) {
  check_cpu_float(weight, "emb_sgd_sparse_ weight");
  check_cpu_float(values, "emb_sgd_sparse_ values");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "emb_sgd_sparse_: weight must be contiguous [rows, d]");
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 2 && indices.size(0) == 1,
              "emb_sgd_sparse_: indices must be int64 [1, nnz], got ", indices.sizes());
  const int64_t nnz = indices.size(1), rows = weight.size(0), dim = weight.size(1);
  TORCH_CHECK(values.dim() == 2 && values.size(0) == nnz && values.size(1) == dim,
              "emb_sgd_sparse_: values must be [", nnz, ", ", dim, "], got ", values.sizes());
  const auto ids = indices.contiguous();
  const auto v = values.contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t k = 0; k < nnz; ++k) {
    TORCH_CHECK_INDEX(id[k] >= 0 && id[k] < rows, "emb_sgd_sparse_: row ", id[k], " out of range for ", rows, " rows");
  }
  axpy_rows(weight.data_ptr<float>(), dim, id, v.data_ptr<float>(), nnz, static_cast<float>(alpha));
}

DQRM_CLONES void adagrad_rows(float* weight, float* state, bool rowwise, int64_t dim, const int64_t* ids,
                              const float* values, int64_t n, float lr, float eps) {
  // the arithmetic of adagrad_rows_ (dqrm_mpi/train/optimizers.py) row after row, in float
  for (int64_t k = 0; k < n; ++k) {
    if (k + kAhead < n) {
      __builtin_prefetch(weight + ids[k + kAhead] * dim, 1);
      __builtin_prefetch(state + ids[k + kAhead] * (rowwise ? 1 : dim), 1);
    }
    float* row = weight + ids[k] * dim;
    const float* v = values + k * dim;
    if (rowwise) {
      float squares = v[0] * v[0];
      for (int64_t j = 1; j < dim; ++j) {
        squares = squares + v[j] * v[j];
      }
      float& acc = state[ids[k]];
      acc = acc + squares / static_cast<float>(dim);
      const float mult = lr / (std::sqrt(acc) + eps);
      for (int64_t j = 0; j < dim; ++j) {
        row[j] = row[j] - mult * v[j];
      }
    } else {
      float* acc = state + ids[k] * dim;
      for (int64_t j = 0; j < dim; ++j) {
        acc[j] = acc[j] + v[j] * v[j];
        row[j] = row[j] - (v[j] / (std::sqrt(acc[j]) + eps)) * lr;
      }
    }
  }
}

// weight float32 [rows, d] and state float32 [rows] (row-wise: one accumulator per row) or
// [rows, d] (element-wise), both contiguous and updated in place; ids int64 [n], strictly
// increasing (a coalesced gradient's rows); values float32 [n, d], the summed gradient of each.
// Adagrad on those rows only: see adagrad_rows_ in dqrm_mpi/train/optimizers.py (same bits).
void emb_adagrad_sparse_(at::Tensor& weight, at::Tensor& state, const at::Tensor& ids, const at::Tensor& values,
                         double lr, double eps) {
  check_cpu_float(weight, "emb_adagrad_sparse_ weight");
  check_cpu_float(state, "emb_adagrad_sparse_ state");
  check_cpu_float(values, "emb_adagrad_sparse_ values");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "emb_adagrad_sparse_: weight must be contiguous [rows, d]");
  const int64_t rows = weight.size(0), dim = weight.size(1);
  const bool rowwise = state.dim() == 1;
  TORCH_CHECK(state.is_contiguous() && state.size(0) == rows && (rowwise || (state.dim() == 2 && state.size(1) == dim)),
              "emb_adagrad_sparse_: state must be contiguous [", rows, "] or [", rows, ", ", dim, "], got ",
              state.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1, "emb_adagrad_sparse_: ids must be int64 [n], got ",
              ids.sizes());
  const int64_t n = ids.size(0);
  TORCH_CHECK(values.dim() == 2 && values.size(0) == n && values.size(1) == dim,
              "emb_adagrad_sparse_: values must be [", n, ", ", dim, "], got ", values.sizes());
  const auto id_c = ids.contiguous();
  const auto v = values.contiguous();
  const int64_t* id = id_c.data_ptr<int64_t>();
  for (int64_t k = 0; k < n; ++k) {
    TORCH_CHECK_INDEX(id[k] >= 0 && id[k] < rows, "emb_adagrad_sparse_: row ", id[k], " out of range for ", rows,
                      " rows");
    TORCH_CHECK(k == 0 || id[k] > id[k - 1], "emb_adagrad_sparse_: ids must be strictly increasing (a coalesced "
                "gradient), got ", id[k - 1], " then ", id[k]);
  }
  if (dim == 0) {
    return;
  }
  adagrad_rows(weight.data_ptr<float>(), state.data_ptr<float>(), rowwise, dim, id, v.data_ptr<float>(), n,
               static_cast<float>(lr), static_cast<float>(eps));
}

DQRM_CLONES bool any_nonfinite(const float* x, int64_t n) {
  // a float is NaN/inf exactly when its exponent bits are all ones: an integer max, no overflow
  uint32_t top = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof bits);
    const uint32_t e = bits & 0x7f800000u;
    top = e > top ? e : top;
  }
  return top == 0x7f800000u;
}

// dense tensors -> bool [n]: whether each holds a NaN/inf (not torch.isfinite(t).all()).
at::Tensor emb_nonfinite(at::TensorList tensors) {
  auto out = at::empty({static_cast<int64_t>(tensors.size())}, at::TensorOptions().dtype(at::kBool));
  bool* o = out.data_ptr<bool>();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.scalar_type() == at::kFloat) {
      const auto c = t.contiguous();
      const float* x = c.data_ptr<float>();
      // an order-free reduction: split over torch's intra-op threads (one where ranks share a node)
      std::atomic<bool> bad{false};
      at::parallel_for(0, c.numel(), kGrain, [&](int64_t lo, int64_t hi) {
        if (any_nonfinite(x + lo, hi - lo)) bad = true;
      });
      o[i] = bad;
    } else {
      o[i] = !at::isfinite(t).all().item<bool>();
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dqrm, m) {
  m.def("emb_pairs_forward(Tensor bottom, Tensor dots, Tensor pairs) -> Tensor");
  m.def("emb_pairs_backward(Tensor grad, Tensor pairs, Tensor(a!) out) -> ()");
  m.def("emb_interaction_grads(Tensor grad, Tensor g1, Tensor g2) -> (Tensor, Tensor)");
  m.def("emb_sgd_sparse_(Tensor(a!) weight, Tensor indices, Tensor values, float alpha) -> ()");
  m.def("emb_adagrad_sparse_(Tensor(a!) weight, Tensor(b!) state, Tensor ids, Tensor values, float lr, float eps) -> ()");
  m.def("emb_nonfinite(Tensor[] tensors) -> Tensor");
}

TORCH_LIBRARY_IMPL(dqrm, CPU, m) {
  m.impl("emb_pairs_forward", emb_pairs_forward);
  m.impl("emb_pairs_backward", emb_pairs_backward);
  m.impl("emb_interaction_grads", emb_interaction_grads);
  m.impl("emb_sgd_sparse_", emb_sgd_sparse_);
  m.impl("emb_adagrad_sparse_", emb_adagrad_sparse_);
  m.impl("emb_nonfinite", emb_nonfinite);
}
