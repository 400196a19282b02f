// Fused fake quantization (QAT's per-step work): the float operations of dqrm_mpi/qcore/uniform.py
// and quant/qat.py in one or two passes over memory instead of five or six.
//
//   fq_own_scale_rows(x [n, k], bits, scale [n], workspace=None) -> y [n, k]
//       per row: absmax = max(amax, -amin) (NaN propagates), scale = max(absmax / qmax, FLT_MIN)
//       (written to ``scale``), y = nearbyint(x * (1 / scale)) * scale
//   fq_own_scale_tensor(x [...], bits, scale [1], workspace=None) -> y [...]   one scale for all of x
//       y is written into workspace's memory (and shares it) when nothing else holds that memory
//   fq_table_rows(rows [B, T, d], scales [T], bits) -> y [B, T, d]
//       q = clamp(nearbyint(rows * (1 / scales[t])), qmin, qmax) * scales[t]; y = rows + (q - rows)
//   fq_table_scales(tables [T] of [n_t, d], bits, scales [T])
//       scales[t] = max(max|tables[t]| / qmax, FLT_MIN) (NaN propagates), one pass over each table
//
// Float32, CPU; fq_own_scale_rows and fq_table_rows split their rows over torch's intra-op threads;
// inputs are made contiguous.  Each op is differentiable in x (rows) with
// the identity straight-through estimator, d y / d x = 1 (an Autograd kernel, no Python node).
#include "common.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr float kTiny = std::numeric_limits<float>::min();  // qcore.uniform.EPS
// 16 float32 lanes (GCC vector extensions: one AVX-512 register, two AVX2 or four SSE ones)
typedef float Lanes __attribute__((vector_size(64)));
typedef int32_t LaneMask __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;
// values per thread's share of a parallel_for: below this a second thread costs more than it saves
constexpr int64_t kGrain = 32768;

struct MinMax {
  float hi, lo;
  bool nan;
};

#define DQRM_INLINE inline __attribute__((always_inline))

// Lane-wise max, min and NaN flag of x[0, 16) folded into (hi, lo, nan).
struct LaneFold {
  Lanes hi, lo;
  LaneMask nan;

  static DQRM_INLINE LaneFold first(const float* x) {
    LaneFold f;
    std::memcpy(&f.hi, x, sizeof f.hi);
    f.lo = f.hi;
    f.nan = f.hi != f.hi;
    return f;
  }
  DQRM_INLINE void add(const float* x) {
    Lanes v;
    std::memcpy(&v, x, sizeof v);
    hi = v > hi ? v : hi;
    lo = v < lo ? v : lo;
    nan |= v != v;
  }
  DQRM_INLINE void merge(const LaneFold& o) {
    hi = o.hi > hi ? o.hi : hi;
    lo = o.lo < lo ? o.lo : lo;
    nan |= o.nan;
  }
};

// max and min of x[0, n) and whether any element is NaN (NaN never wins a comparison, so it is
// tracked on its own).  Rows of 16 or more: blocks of 16 lanes, four independent folds at a time
// (their compare chains overlap), the last block overlapping the one before (a value seen twice
// changes no max or min), then across lanes; shorter rows one by one.
DQRM_INLINE MinMax min_max(const float* x, int64_t n) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  MinMax out{-inf, inf, false};
  if (n >= kLanes) {
    LaneFold a = LaneFold::first(x);
    int64_t j = kLanes;
    if (n >= 4 * kLanes) {
      LaneFold b = LaneFold::first(x + kLanes), c = LaneFold::first(x + 2 * kLanes),
               d = LaneFold::first(x + 3 * kLanes);
      for (j = 4 * kLanes; j + 4 * kLanes <= n; j += 4 * kLanes) {
        a.add(x + j);
        b.add(x + j + kLanes);
        c.add(x + j + 2 * kLanes);
        d.add(x + j + 3 * kLanes);
      }
      b.merge(d);
      a.merge(c);
      a.merge(b);
    }
    for (; j < n; j += kLanes) a.add(x + (j + kLanes <= n ? j : n - kLanes));
    for (int64_t l = 0; l < kLanes; ++l) {
      out.hi = a.hi[l] > out.hi ? a.hi[l] : out.hi;
      out.lo = a.lo[l] < out.lo ? a.lo[l] : out.lo;
      out.nan = out.nan || a.nan[l] != 0;
    }
    return out;
  }
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j];
    out.hi = v > out.hi ? v : out.hi;
    out.lo = v < out.lo ? v : out.lo;
    out.nan = out.nan || v != v;
  }
  return out;
}

// torch.maximum(amax, -amin) / qmax, clamp_min(FLT_MIN): NaN stays NaN.  (The sign of a zero max
// or min does not matter: a zero absmax becomes FLT_MIN.)
DQRM_INLINE float scale_of(const MinMax& m, float qmax) {
  if (m.nan) return std::numeric_limits<float>::quiet_NaN();
  const float neg_lo = -m.lo;
  const float absmax = m.hi > neg_lo ? m.hi : neg_lo;
  const float scale = absmax / qmax;
  return scale < kTiny ? kTiny : scale;
}

// Rows x [n, k] -> y [n, k] = nearbyint(x * (1 / scale)) * scale with the row's own scale (-> scale [n]).
DQRM_CLONES
void own_scale_rows(const float* __restrict x, float* __restrict y, float* __restrict scale, int64_t n,
                    int64_t k, float qmax) {
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * k;
    float* yi = y + i * k;
    const float s = scale_of(min_max(xi, k), qmax), inv = 1.0f / s;
    scale[i] = s;
    for (int64_t j = 0; j < k; ++j) yi[j] = std::nearbyint(xi[j] * inv) * s;
  }
}

// y = x + (clamp(nearbyint(x * inv[t]), qmin, qmax) * scale[t] - x) over rows [b, t, d]; NaN stays NaN
DQRM_CLONES
void table_rows(const float* __restrict x, float* __restrict y, int64_t b, int64_t t, int64_t d,
                const float* inv, const float* scale, float qmin, float qmax) {
  for (int64_t i = 0; i < b * t; ++i) {
    const float r = inv[i % t], s = scale[i % t];
    const float* xi = x + i * d;
    float* yi = y + i * d;
    for (int64_t j = 0; j < d; ++j) {
      const float v = xi[j];
      float q = std::nearbyint(v * r);
      q = q < qmin ? qmin : q;  // a NaN compares false
      q = q > qmax ? qmax : q;
      yi[j] = v + (q * s - v);
    }
  }
}

float qmax_of(int64_t bits) {
  TORCH_CHECK(bits >= 2 && bits <= 16, "dqrm fake quant: bits must be in [2, 16], got ", bits);
  return static_cast<float>((int64_t{1} << (bits - 1)) - 1);
}

// x checked (a float32 CPU tensor), contiguous
at::Tensor float_cpu(const at::Tensor& x, const char* what) {
  dqrm::check_cpu_float(x, what);
  return x.contiguous();
}

void check_scale_out(const at::Tensor& scale, int64_t n) {
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == at::kFloat && scale.dim() == 1 &&
                  scale.size(0) == n && scale.is_contiguous(),
              "dqrm fake quant: scale must be a contiguous float32 CPU tensor of shape [", n, "], got ",
              scale.scalar_type(), " ", scale.sizes());
}

// The memory of y: workspace's when it is a contiguous float32 CPU tensor of x's shape whose memory
// nothing else holds (the tensors made from it at the last call are gone: their step's autograd graph
// was freed), so that the weights' per-step copy reuses warm memory; else new memory.
at::Tensor output_like(const at::Tensor& x, const c10::optional<at::Tensor>& workspace) {
  if (workspace.has_value() && workspace->defined()) {
    const at::Tensor& w = *workspace;
    if (w.device().is_cpu() && w.scalar_type() == at::kFloat && w.sizes() == x.sizes() && w.is_contiguous() &&
        w.storage_offset() == 0 && w.storage().use_count() == 1) {
      return w.alias();
    }
  }
  return at::empty_like(x);
}

at::Tensor fq_own_scale_rows(const at::Tensor& x_in, int64_t bits, at::Tensor& scale,
                             const c10::optional<at::Tensor>& workspace) {
  const float qmax = qmax_of(bits);
  TORCH_CHECK(x_in.dim() == 2, "fq_own_scale_rows: x must be 2-D [n, k], got shape ", x_in.sizes());
  const at::Tensor x = float_cpu(x_in, "fq_own_scale_rows x");
  const int64_t n = x.size(0), k = x.size(1);
  TORCH_CHECK(n == 0 || k > 0, "fq_own_scale_rows: rows of x are empty (shape ", x.sizes(), ")");
  check_scale_out(scale, n);
  at::Tensor y = output_like(x, workspace);
  const float* px = x.data_ptr<float>();
  float* py = y.data_ptr<float>();
  float* ps = scale.data_ptr<float>();
  // rows are independent: split them over torch's intra-op threads (one where ranks share a node)
  at::parallel_for(0, n, std::max<int64_t>(1, kGrain / std::max<int64_t>(k, 1)), [&](int64_t lo, int64_t hi) {
    own_scale_rows(px + lo * k, py + lo * k, ps + lo, hi - lo, k, qmax);
  });
  return y;
}

at::Tensor fq_own_scale_tensor(const at::Tensor& x_in, int64_t bits, at::Tensor& scale,
                               const c10::optional<at::Tensor>& workspace) {
  const float qmax = qmax_of(bits);
  const at::Tensor x = float_cpu(x_in, "fq_own_scale_tensor x");
  TORCH_CHECK(x.numel() > 0, "fq_own_scale_tensor: x is empty (shape ", x.sizes(), ")");
  check_scale_out(scale, 1);
  at::Tensor y = output_like(x, workspace);
  own_scale_rows(x.data_ptr<float>(), y.data_ptr<float>(), scale.data_ptr<float>(), 1, x.numel(), qmax);
  return y;
}

at::Tensor fq_table_rows(const at::Tensor& rows_in, const at::Tensor& scales_in, int64_t bits) {
  const float qmax = qmax_of(bits), qmin = -qmax - 1.0f;
  TORCH_CHECK(rows_in.dim() == 3, "fq_table_rows: rows must be 3-D [B, T, d], got shape ", rows_in.sizes());
  const at::Tensor rows = float_cpu(rows_in, "fq_table_rows rows");
  const at::Tensor scales = float_cpu(scales_in, "fq_table_rows scales");
  const int64_t b = rows.size(0), t = rows.size(1), d = rows.size(2);
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == t, "fq_table_rows: scales must have shape [", t,
              "], got ", scales.sizes());
  std::vector<float> inv(t);
  const float* ps = scales.data_ptr<float>();
  for (int64_t j = 0; j < t; ++j) inv[j] = 1.0f / ps[j];
  at::Tensor y = at::empty_like(rows);
  const float* px = rows.data_ptr<float>();
  float* py = y.data_ptr<float>();
  // samples are independent: split them over torch's intra-op threads
  at::parallel_for(0, b, std::max<int64_t>(1, kGrain / std::max<int64_t>(t * d, 1)), [&](int64_t lo, int64_t hi) {
    table_rows(px + lo * t * d, py + lo * t * d, hi - lo, t, d, inv.data(), ps, qmin, qmax);
  });
  return y;
}

// scales[t] = the per-tensor scale of tables[t] (the full-table pass of per-table embedding scales).
DQRM_CLONES
float tensor_scale_of(const float* x, int64_t n, float qmax) {
  return scale_of(min_max(x, n), qmax);
}

void fq_table_scales(at::TensorList tables, int64_t bits, at::Tensor& scales) {
  const float qmax = qmax_of(bits);
  const int64_t t = static_cast<int64_t>(tables.size());
  check_scale_out(scales, t);
  float* ps = scales.data_ptr<float>();
  for (int64_t i = 0; i < t; ++i) {
    const at::Tensor table = float_cpu(tables[i], "fq_table_scales table");
    TORCH_CHECK(table.numel() > 0, "fq_table_scales: table ", i, " is empty (shape ", table.sizes(), ")");
    ps[i] = tensor_scale_of(table.data_ptr<float>(), table.numel(), qmax);
  }
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// y = own-scale fake quant of x (per row or per tensor); gradient passed unchanged to x.
struct OwnScaleSte : public torch::autograd::Function<OwnScaleSte> {
  static at::Tensor forward(AutogradContext*, const at::Tensor& x, int64_t bits, at::Tensor scale,
                            const c10::optional<at::Tensor>& workspace, bool per_row) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return per_row ? fq_own_scale_rows(x, bits, scale, workspace) : fq_own_scale_tensor(x, bits, scale, workspace);
  }
  static variable_list backward(AutogradContext*, variable_list grad) {
    return {grad[0], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// y = per-table fake quant of the rows; gradient passed unchanged to the rows.
struct TableRowsSte : public torch::autograd::Function<TableRowsSte> {
  static at::Tensor forward(AutogradContext*, const at::Tensor& rows, const at::Tensor& scales, int64_t bits) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return fq_table_rows(rows, scales, bits);
  }
  static variable_list backward(AutogradContext*, variable_list grad) {
    return {grad[0], at::Tensor(), at::Tensor()};
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(dqrm, m) {
  m.def("fq_own_scale_rows(Tensor x, int bits, Tensor(a!) scale, Tensor(b!)? workspace=None) -> Tensor");
  m.def("fq_own_scale_tensor(Tensor x, int bits, Tensor(a!) scale, Tensor(b!)? workspace=None) -> Tensor");
  m.def("fq_table_rows(Tensor rows, Tensor scales, int bits) -> Tensor");
  m.def("fq_table_scales(Tensor[] tables, int bits, Tensor(a!) scales) -> ()");
}

TORCH_LIBRARY_IMPL(dqrm, CPU, m) {
  m.impl("fq_own_scale_rows", fq_own_scale_rows);
  m.impl("fq_own_scale_tensor", fq_own_scale_tensor);
  m.impl("fq_table_rows", fq_table_rows);
  m.impl("fq_table_scales", fq_table_scales);
}

TORCH_LIBRARY_IMPL(dqrm, Autograd, m) {
  m.impl("fq_own_scale_rows",
         [](const at::Tensor& x, int64_t bits, at::Tensor& scale, const c10::optional<at::Tensor>& workspace) {
           return OwnScaleSte::apply(x, bits, scale, workspace, true);
         });
  m.impl("fq_own_scale_tensor",
         [](const at::Tensor& x, int64_t bits, at::Tensor& scale, const c10::optional<at::Tensor>& workspace) {
           return OwnScaleSte::apply(x, bits, scale, workspace, false);
         });
  m.impl("fq_table_rows", [](const at::Tensor& rows, const at::Tensor& scales, int64_t bits) {
    return TableRowsSte::apply(rows, scales, bits);
  });
}
