// What every kernel file shares: the run-time CPU dispatch of hot loops and the input check.
#pragma once

#include <ATen/ATen.h>

// A hot loop built three times (AVX-512, AVX2, baseline x86-64); the loader picks the best the
// CPU has, so one build serves every node of a mixed cluster.
#define DQRM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

namespace dqrm {

// Raises unless t is a float32 CPU tensor; `what` names the op and argument ("emb_sgd_sparse_ weight").
inline void check_cpu_float(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, what, ": expected a float32 CPU tensor, got ",
              t.scalar_type(), " on ", t.device());
}

}  // namespace dqrm
