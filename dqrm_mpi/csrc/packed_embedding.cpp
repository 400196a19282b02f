// Inference lookup of packed embedding tables: gather the rows of each sample's ids, unpack
// the INT8 / INT4 / INT2 values and scale them, in one pass into the [B, T, d] output.  The
// numbers of PackedEmbeddingTables.forward's PyTorch path (dqrm_mpi/quant/packed.py:
// dequantize(unpack(p[ids], bits, d), scale)) bit for bit: value k of a row is the unsigned
// field at bits [k b, (k + 1) b) of the row's bytes minus 2^(b-1) (dqrm_mpi/qcore/pack.py), as a
// float, times the table's or the row's float32 scale (one multiply).  Samples are independent:
// they split over torch's intra-op threads.  The tables are read where they are (no copy).
#include "common.h"

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace {

using dqrm::check_cpu_float;

// random rows of large tables: ask for the rows of the sample this many ahead while reading the current one
constexpr int64_t kAhead = 4;
// samples per thread's share of a parallel_for: below this a second thread costs more than it saves
constexpr int64_t kGrainSamples = 64;

// One row of `dim` values of `bits` bits (2, 4 or 8) -> out[0 .. dim): (u - 2^(b-1)) * scale.
DQRM_CLONES void dequantize_row(const uint8_t* row, int64_t dim, int64_t bits, float scale, float* out) {
  if (bits == 4) {
    const int64_t pairs = dim / 2;
    for (int64_t i = 0; i < pairs; ++i) {
      const int v = row[i];
      out[2 * i] = static_cast<float>((v & 15) - 8) * scale;
      out[2 * i + 1] = static_cast<float>((v >> 4) - 8) * scale;
    }
    if (dim & 1) {
      out[dim - 1] = static_cast<float>((row[pairs] & 15) - 8) * scale;
    }
  } else if (bits == 8) {
    for (int64_t k = 0; k < dim; ++k) {
      out[k] = static_cast<float>(static_cast<int>(row[k]) - 128) * scale;
    }
  } else {  // 2
    for (int64_t k = 0; k < dim; ++k) {
      out[k] = static_cast<float>(((row[k >> 2] >> ((k & 3) * 2)) & 3) - 2) * scale;
    }
  }
}

// packed: T uint8 tables [n_t, ceil(d b / 8)]; scales: T float32 [1] (per table) or [n_t] (per
// row); sparse: int32|int64 [B, T] ids, 0 <= id < n_t -> float32 [B, T, d].
at::Tensor packed_embedding_lookup(at::TensorList packed, at::TensorList scales, const at::Tensor& sparse,
                                   int64_t bits, int64_t dim) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "packed_embedding_lookup: bits must be 2, 4 or 8, got ", bits);
  const int64_t tables = static_cast<int64_t>(packed.size());
  TORCH_CHECK(static_cast<int64_t>(scales.size()) == tables && sparse.dim() == 2 && sparse.size(1) == tables,
              "packed_embedding_lookup: ", tables, " tables, ", scales.size(), " scales and ids ", sparse.sizes(),
              " do not fit");
  TORCH_CHECK(sparse.device().is_cpu() && (sparse.scalar_type() == at::kLong || sparse.scalar_type() == at::kInt),
              "packed_embedding_lookup: ids must be int32 or int64 on the CPU");
  const int64_t row_bytes = (dim * bits + 7) / 8;
  std::vector<const uint8_t*> base(tables);
  std::vector<const float*> scale(tables);
  std::vector<int64_t> rows(tables), per_row(tables);
  for (int64_t t = 0; t < tables; ++t) {
    const auto& p = packed[t];
    TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kByte && p.dim() == 2 && p.size(1) == row_bytes &&
                    p.is_contiguous(),
                "packed_embedding_lookup: table ", t, " must be contiguous uint8 [n, ", row_bytes, "], got ",
                p.scalar_type(), " ", p.sizes());
    check_cpu_float(scales[t], "packed_embedding_lookup scale");
    rows[t] = p.size(0);
    per_row[t] = scales[t].numel() == 1 ? 0 : 1;
    TORCH_CHECK(scales[t].is_contiguous() && (per_row[t] == 0 || scales[t].numel() == rows[t]),
                "packed_embedding_lookup: scale ", t, " must be [1] or [", rows[t], "], got ", scales[t].sizes());
    base[t] = p.data_ptr<uint8_t>();
    scale[t] = scales[t].data_ptr<float>();
  }
  const auto ids = sparse.to(at::kLong).contiguous();
  const int64_t batch = ids.size(0);
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < batch * tables; ++i) {
    const int64_t t = i % tables;
    TORCH_CHECK_INDEX(id[i] >= 0 && id[i] < rows[t], "packed_embedding_lookup: id ", id[i], " of table ", t,
                      " (sample ", i / tables, ") outside [0, ", rows[t], ")");
  }
  auto out = at::empty({batch, tables, dim}, sparse.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, batch, kGrainSamples, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      if (b + kAhead < hi) {
        for (int64_t t = 0; t < tables; ++t) {
          __builtin_prefetch(base[t] + id[(b + kAhead) * tables + t] * row_bytes);
        }
      }
      for (int64_t t = 0; t < tables; ++t) {
        const int64_t r = id[b * tables + t];
        dequantize_row(base[t] + r * row_bytes, dim, bits, scale[t][r * per_row[t]], o + (b * tables + t) * dim);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dqrm, m) {
  m.def("packed_embedding_lookup(Tensor[] packed, Tensor[] scales, Tensor sparse, int bits, int dim) -> Tensor");
}

TORCH_LIBRARY_IMPL(dqrm, CPU, m) { m.impl("packed_embedding_lookup", &packed_embedding_lookup); }
