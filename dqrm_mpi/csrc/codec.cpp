// The INT8 / INT4 gradient codec (dqrm_mpi/compression/quantize.py) in one pass per row.
//
// A layout is the Python Layout's blocks as int64 [B, 4] (lo, rows, cols, first group) tiling
// [0, n) in order, and a row_group int64 [rows of all blocks] giving each row's scale group, or
// an empty tensor when row i of a block is group first + i (the rows are their own groups).
// The float operations are quantize.py's, bit for bit:
//   encode  absmax |x| per group (a NaN wins, as torch.amax), scale = max / qmax clamped below
//           at FLT_MIN (a NaN stays), q = nearbyint(x / scale) (no clamp: |q| <= qmax), the
//           payload's integers (a NaN q is 0, as PyTorch's float -> int8 cast), then
//           x -= q * scale (error feedback) or transmitted = q * scale.
//   decode  acc = q_0 * s_0, acc += q_r * s_r in rank order, then acc * (1 / size) when size is
//           a power of two, else acc / size.
// Payload: the integers (int8, or INT4 as q + 8 two a byte, the low nibble first, a zero
// padding nibble), then the float32 scales (little-endian, unaligned).
#include "common.h"

#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int MODE_NONE = 0, MODE_TRANSMITTED = 1, MODE_FEEDBACK = 2;

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The absmax of cols floats: |x| as bits (sign cleared) ordered as unsigned integers orders
// them as floats, with every NaN above inf (so a NaN propagates, as torch.amax).
DQRM_CLONES
uint32_t absmax_bits(const float* x, int64_t cols) {
  const uint32_t* u = reinterpret_cast<const uint32_t*>(x);
  uint32_t m = 0;
  for (int64_t j = 0; j < cols; ++j) {
    uint32_t a = u[j] & 0x7FFFFFFFu;
    m = a > m ? a : m;
  }
  return m;
}

inline float scale_of(uint32_t max_bits, float qmax) {
  float s = bits_to_float(max_bits) / qmax;
  return s < FLT_MIN ? FLT_MIN : s;  // clamp_min(EPS): a NaN compares false and stays
}

// One row: q int8 [cols] = nearbyint(x / s) (NaN -> 0), and the residual or transmitted values.
DQRM_CLONES
void quantize_row(float* x, int64_t cols, float s, int8_t* q, float* t, int mode) {
  if (mode == MODE_FEEDBACK) {
    for (int64_t j = 0; j < cols; ++j) {
      float r = std::nearbyint(x[j] / s);
      q[j] = static_cast<int8_t>(static_cast<int32_t>(r == r ? r : 0.0f));
      float sent = r * s;
      x[j] = x[j] - sent;
    }
  } else if (mode == MODE_TRANSMITTED) {
    for (int64_t j = 0; j < cols; ++j) {
      float r = std::nearbyint(x[j] / s);
      q[j] = static_cast<int8_t>(static_cast<int32_t>(r == r ? r : 0.0f));
      t[j] = r * s;
    }
  } else {
    for (int64_t j = 0; j < cols; ++j) {
      float r = std::nearbyint(x[j] / s);
      q[j] = static_cast<int8_t>(static_cast<int32_t>(r == r ? r : 0.0f));
    }
  }
}

// int8 values q [len] in [-8, 7] -> INT4 nibbles (q + 8) at nibble positions [pos, pos + len) of
// out; the byte holding an odd position's low nibble was written by the values before it.  A
// last odd value gets a zero high nibble (the padding, or overwritten by the values after it).
DQRM_CLONES
void pack_nibbles(const int8_t* q, int64_t pos, int64_t len, uint8_t* out) {
  int64_t j = 0;
  if (len > 0 && (pos & 1)) {
    uint8_t& b = out[pos >> 1];
    b = static_cast<uint8_t>((b & 0x0F) | (((q[0] + 8) & 0x0F) << 4));
    j = 1;
  }
  uint8_t* o = out + ((pos + j) >> 1);
  int64_t pairs = (len - j) / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    uint32_t lo = static_cast<uint32_t>(q[j + 2 * p] + 8) & 0x0F;
    uint32_t hi = static_cast<uint32_t>(q[j + 2 * p + 1] + 8) & 0x0F;
    o[p] = static_cast<uint8_t>(lo | (hi << 4));
  }
  if (j + 2 * pairs < len) o[pairs] = static_cast<uint8_t>((q[len - 1] + 8) & 0x0F);
}

// INT4 nibbles at positions [pos, pos + len) of data -> int8 values q [len] (nibble - 8).
DQRM_CLONES
void unpack_nibbles(const uint8_t* data, int64_t pos, int64_t len, int8_t* q) {
  int64_t j = 0;
  if (len > 0 && (pos & 1)) {
    q[0] = static_cast<int8_t>((data[pos >> 1] >> 4) - 8);
    j = 1;
  }
  const uint8_t* d = data + ((pos + j) >> 1);
  const int64_t pairs = (len - j) / 2;
  int8_t* o = q + j;
  for (int64_t p = 0; p < pairs; ++p) {
    o[2 * p] = static_cast<int8_t>((d[p] & 0x0F) - 8);
    o[2 * p + 1] = static_cast<int8_t>((d[p] >> 4) - 8);
  }
  if (j + 2 * pairs < len) q[len - 1] = static_cast<int8_t>((d[pairs] & 0x0F) - 8);
}

// How dequantize_row writes q * s into out: stored or added (the product rounded first), then,
// for the last rank of a mean, times 1 / size (size a power of two) or divided by size.
enum RowOp { STORE, ADD, STORE_MUL, ADD_MUL, STORE_DIV, ADD_DIV };

DQRM_CLONES
void dequantize_row(const int8_t* q, int64_t cols, float s, float* out, int op, float f) {
  switch (op) {
    case STORE:
      for (int64_t j = 0; j < cols; ++j) out[j] = static_cast<float>(q[j]) * s;
      break;
    case ADD:
      for (int64_t j = 0; j < cols; ++j) {
        float v = static_cast<float>(q[j]) * s;
        out[j] = out[j] + v;
      }
      break;
    case STORE_MUL:
      for (int64_t j = 0; j < cols; ++j) {
        float v = static_cast<float>(q[j]) * s;
        out[j] = v * f;
      }
      break;
    case ADD_MUL:
      for (int64_t j = 0; j < cols; ++j) {
        float v = static_cast<float>(q[j]) * s;
        float sum = out[j] + v;
        out[j] = sum * f;
      }
      break;
    case STORE_DIV:
      for (int64_t j = 0; j < cols; ++j) {
        float v = static_cast<float>(q[j]) * s;
        out[j] = v / f;
      }
      break;
    default:  // ADD_DIV
      for (int64_t j = 0; j < cols; ++j) {
        float v = static_cast<float>(q[j]) * s;
        float sum = out[j] + v;
        out[j] = sum / f;
      }
  }
}

struct Block {
  int64_t lo, rows, cols, group;
};

// The layout's blocks, checked: int64 [B, 4] tiling [0, n) in order; row_group empty or int64
// [rows of all blocks] in [0, groups).  Returns the blocks and the number of rows.
std::vector<Block> read_layout(const at::Tensor& blocks, const at::Tensor& row_group, int64_t n,
                               int64_t groups, int64_t* total_rows) {
  TORCH_CHECK(blocks.dtype() == at::kLong && blocks.dim() == 2 && blocks.size(1) == 4 && blocks.is_contiguous(),
              "codec: blocks must be a contiguous int64 [B, 4] (lo, rows, cols, first group), got ",
              blocks.dtype(), " ", blocks.sizes());
  TORCH_CHECK(row_group.dtype() == at::kLong && row_group.dim() == 1 && row_group.is_contiguous(),
              "codec: row_group must be a contiguous int64 [rows] (or empty)");
  std::vector<Block> out;
  const int64_t* b = blocks.data_ptr<int64_t>();
  int64_t at = 0, rows = 0;
  for (int64_t i = 0; i < blocks.size(0); ++i) {
    Block k{b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]};
    TORCH_CHECK(k.rows >= 0 && k.cols >= 0, "codec: block ", i, " has a negative size");
    if (k.rows == 0 || k.cols == 0) continue;
    TORCH_CHECK(k.lo == at, "codec: block ", i, " starts at ", k.lo, ", expected ", at,
                " (blocks must tile the vector in order)");
    TORCH_CHECK(row_group.numel() || (k.group >= 0 && k.group + k.rows <= groups),
                "codec: block ", i, "'s groups are outside [0, ", groups, ")");
    at += k.rows * k.cols;
    rows += k.rows;
    out.push_back(k);
  }
  TORCH_CHECK(at == n, "codec: the blocks cover ", at, " values, the vector has ", n);
  if (row_group.numel()) {
    TORCH_CHECK(row_group.numel() == rows, "codec: row_group has ", row_group.numel(), " entries, the blocks ",
                rows, " rows");
    const int64_t* g = row_group.data_ptr<int64_t>();
    for (int64_t r = 0; r < rows; ++r)
      TORCH_CHECK(g[r] >= 0 && g[r] < groups, "codec: row_group[", r, "] = ", g[r], " is outside [0, ", groups, ")");
  }
  *total_rows = rows;
  return out;
}

// INT4: room for the widest row's integers (a row is packed or unpacked there); INT8: none
std::vector<int8_t> int4_row_scratch(const std::vector<Block>& layout, int64_t bits) {
  int64_t widest = 0;
  if (bits == 4)
    for (const Block& b : layout) widest = std::max(widest, b.cols);
  return std::vector<int8_t>(widest);
}

int64_t data_nbytes(int64_t n, int64_t bits) { return (n * bits + 7) / 8; }

void check_bits(int64_t bits) { TORCH_CHECK(bits == 8 || bits == 4, "codec: bits must be 8 or 4, got ", bits); }

// x float32 [n] -> out uint8 [>= data bytes + 4 groups]: the integers, then the scales.
// mode 1: transmitted float32 [n] = q * scale; mode 2: x -= q * scale in place.
void codec_encode(at::Tensor x, const at::Tensor& blocks, const at::Tensor& row_group, int64_t groups,
                  int64_t bits, at::Tensor out, const c10::optional<at::Tensor>& transmitted, bool feedback) {
  check_bits(bits);
  TORCH_CHECK(x.device().is_cpu() && x.dtype() == at::kFloat && x.dim() == 1 && x.is_contiguous(),
              "codec_encode: x must be a contiguous float32 [n] CPU tensor");
  const int64_t n = x.numel(), nd = data_nbytes(n, bits);
  TORCH_CHECK(out.device().is_cpu() && out.dtype() == at::kByte && out.dim() == 1 && out.is_contiguous() &&
              out.numel() >= nd + 4 * groups, "codec_encode: out must be a contiguous uint8 [>= ", nd + 4 * groups,
              "] CPU tensor");
  float* t = nullptr;
  if (transmitted.has_value()) {
    TORCH_CHECK(!feedback, "codec_encode: transmitted and feedback exclude each other");
    const at::Tensor& tr = *transmitted;
    TORCH_CHECK(tr.device().is_cpu() && tr.dtype() == at::kFloat && tr.is_contiguous() && tr.numel() == n,
                "codec_encode: transmitted must be a contiguous float32 [", n, "] CPU tensor");
    t = tr.data_ptr<float>();
  }
  const int mode = feedback ? MODE_FEEDBACK : (t ? MODE_TRANSMITTED : MODE_NONE);
  int64_t rows = 0;
  const std::vector<Block> layout = read_layout(blocks, row_group, n, groups, &rows);
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  float* xp = x.data_ptr<float>();
  uint8_t* data = out.data_ptr<uint8_t>();
  std::vector<float> scales(groups, FLT_MIN);  // an empty group's scale: max(0 / qmax, EPS)
  std::vector<int8_t> q4 = int4_row_scratch(layout, bits);  // INT4: a row's integers before packing
  auto quantize = [&](const Block& b, int64_t i, float s) {
    const int64_t at = b.lo + i * b.cols;
    int8_t* q = bits == 8 ? reinterpret_cast<int8_t*>(data) + at : q4.data();
    quantize_row(xp + at, b.cols, s, q, t ? t + at : nullptr, mode);
    if (bits == 4) pack_nibbles(q, at, b.cols, data);
  };
  if (row_group.numel() == 0) {  // a row is its own group: absmax and quantize it while in cache
    for (const Block& b : layout)
      for (int64_t i = 0; i < b.rows; ++i) {
        const float s = scale_of(absmax_bits(xp + b.lo + i * b.cols, b.cols), qmax);
        scales[b.group + i] = s;
        quantize(b, i, s);
      }
  } else {  // rows share groups: every group's absmax first
    const int64_t* g = row_group.data_ptr<int64_t>();
    std::vector<uint32_t> maxima(groups, 0);
    int64_t r = 0;
    for (const Block& b : layout)
      for (int64_t i = 0; i < b.rows; ++i, ++r) {
        const uint32_t m = absmax_bits(xp + b.lo + i * b.cols, b.cols);
        if (m > maxima[g[r]]) maxima[g[r]] = m;
      }
    for (int64_t k = 0; k < groups; ++k) scales[k] = scale_of(maxima[k], qmax);
    r = 0;
    for (const Block& b : layout)
      for (int64_t i = 0; i < b.rows; ++i, ++r) quantize(b, i, scales[g[r]]);
  }
  std::memcpy(data + nd, scales.data(), 4 * groups);
}

// Payloads uint8 [r, >= data bytes + 4 groups] (one per rank) -> out float32: with size > 0 the
// mean [n] (summed in rank order, then divided by size), else every payload's values [r, n].
void decode(const at::Tensor& bufs, const at::Tensor& blocks, const at::Tensor& row_group, int64_t groups,
            int64_t bits, int64_t size, at::Tensor& out, const char* op) {
  check_bits(bits);
  TORCH_CHECK(bufs.device().is_cpu() && bufs.dtype() == at::kByte && bufs.dim() == 2 && bufs.stride(1) == 1,
              op, ": bufs must be a uint8 [r, nbytes] CPU tensor with contiguous rows");
  const bool mean = size > 0;
  const int64_t ranks = bufs.size(0), n = mean ? out.numel() : (out.dim() == 2 ? out.size(1) : -1);
  TORCH_CHECK(out.device().is_cpu() && out.dtype() == at::kFloat &&
              (mean ? out.dim() == 1 : out.dim() == 2 && out.size(0) == ranks) && out.stride(-1) == 1,
              op, ": out must be a float32 ", mean ? "[n]" : "[r, n]", " CPU tensor with contiguous rows");
  const int64_t nd = data_nbytes(n, bits);
  TORCH_CHECK(bufs.size(1) >= nd + 4 * groups, op, ": payloads of ", bufs.size(1), " bytes, ", n,
              " values and ", groups, " scales take ", nd + 4 * groups);
  TORCH_CHECK(!mean || ranks > 0, op, ": no payloads");
  int64_t rows = 0;
  const std::vector<Block> layout = read_layout(blocks, row_group, n, groups, &rows);
  const uint8_t* base = bufs.data_ptr<uint8_t>();
  const int64_t stride = bufs.stride(0);
  std::vector<float> scales(ranks * groups);
  for (int64_t k = 0; k < ranks; ++k) std::memcpy(&scales[k * groups], base + k * stride + nd, 4 * groups);
  const int64_t* g = row_group.numel() ? row_group.data_ptr<int64_t>() : nullptr;
  float* o = out.data_ptr<float>();
  const int64_t ostride = mean ? 0 : out.stride(0);
  std::vector<int8_t> q4 = int4_row_scratch(layout, bits);  // INT4: a row's integers, unpacked
  // a mean: x / 2^k and x * 2^-k are the same float, and a multiply is cheaper
  const bool power_of_two = (size & (size - 1)) == 0;
  const float f = power_of_two ? 1.0f / static_cast<float>(size) : static_cast<float>(size);
  int64_t r = 0;
  for (const Block& b : layout)
    for (int64_t i = 0; i < b.rows; ++i, ++r) {
      const int64_t at = b.lo + i * b.cols, group = g ? g[r] : b.group + i;
      for (int64_t k = 0; k < ranks; ++k) {
        const int8_t* q = reinterpret_cast<const int8_t*>(base + k * stride) + at;
        if (bits == 4) {
          unpack_nibbles(base + k * stride, at, b.cols, q4.data());
          q = q4.data();
        }
        int op = mean && k > 0 ? ADD : STORE;
        if (mean && k == ranks - 1) op = power_of_two ? (k ? ADD_MUL : STORE_MUL) : (k ? ADD_DIV : STORE_DIV);
        dequantize_row(q, b.cols, scales[k * groups + group], o + k * ostride + at, op, f);
      }
    }
}

void codec_decode_many(const at::Tensor& bufs, const at::Tensor& blocks, const at::Tensor& row_group,
                       int64_t groups, int64_t bits, at::Tensor out) {
  decode(bufs, blocks, row_group, groups, bits, 0, out, "codec_decode_many");
}

void codec_decode_mean(const at::Tensor& bufs, const at::Tensor& blocks, const at::Tensor& row_group,
                       int64_t groups, int64_t bits, int64_t size, at::Tensor out) {
  TORCH_CHECK(size > 0, "codec_decode_mean: size must be positive, got ", size);
  decode(bufs, blocks, row_group, groups, bits, size, out, "codec_decode_mean");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dqrm, m) {
  m.def("codec_encode(Tensor(a!) x, Tensor blocks, Tensor row_group, int groups, int bits, Tensor(b!) out, "
        "Tensor(c!)? transmitted, bool feedback) -> ()");
  m.def("codec_decode_many(Tensor bufs, Tensor blocks, Tensor row_group, int groups, int bits, Tensor(a!) out) -> ()");
  m.def("codec_decode_mean(Tensor bufs, Tensor blocks, Tensor row_group, int groups, int bits, int size, "
        "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(dqrm, CPU, m) {
  m.impl("codec_encode", &codec_encode);
  m.impl("codec_decode_many", &codec_decode_many);
  m.impl("codec_decode_mean", &codec_decode_mean);
}
