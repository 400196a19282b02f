"""fbgemm's side of benchmarks/inference.py: INT4 table-batched embeddings with the same MLP.

Run by the torchrec peer venv's python (fbgemm-gpu-cpu 1.9.0, torch 2.14.1; see
benchmarks/peer_torchrec.py); it imports nothing from dqrm_mpi.  The tables are one
``IntNBitTableBatchedEmbeddingBagsCodegen`` (INT4 rows with fbgemm's per-row scale and bias,
on the host, random weights: the speed does not depend on them), one id per sample and table
(bags of one, sum pooling); the dot interaction and the MLPs are the DLRM's, in plain torch,
with the INT4 model's dequantized MLP weights (--mlp, an .npz written by inference.py).
Prints one JSON line: samples/s at batch 1, 64, 4,096, p50 / p99 latency at 1 and 64, memory.

    python peer_inference_worker.py --cardinalities 1460,583,... --mlp mlp.npz --seconds 3 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time

import fbgemm_gpu  # noqa: F401  (registers fbgemm's operators)
import numpy as np
import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

BATCHES = (1, 64, 4096)
LATENCY_BATCHES = (1, 64)
DIM = 16


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Model(torch.nn.Module):
    def __init__(self, cards: list[int], mlp: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.tables = len(cards)
        self.tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=[(f"t{i}", c, DIM, SparseType.INT4, EmbeddingLocation.HOST) for i, c in enumerate(cards)],
            device="cpu", pooling_mode=PoolingMode.SUM, output_dtype=SparseType.FP32)
        self.tbe.fill_random_weights()
        self.bottom = self._mlp(mlp, "bottom", relu_last=True)
        self.top = self._mlp(mlp, "top", relu_last=False)
        vectors = len(cards) + 1
        rows, cols = torch.tril_indices(vectors, vectors, offset=-1)
        self.register_buffer("pairs", rows * vectors + cols)

    @staticmethod
    def _mlp(mlp: dict[str, np.ndarray], part: str, relu_last: bool) -> torch.nn.Sequential:
        layers = []
        n = sum(1 for k in mlp if k.startswith(f"{part}_") and k.endswith("_weight"))
        for i in range(n):
            w = torch.from_numpy(mlp[f"{part}_{i}_weight"])
            lin = torch.nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                lin.weight.copy_(w)
                lin.bias.copy_(torch.from_numpy(mlp[f"{part}_{i}_bias"]))
            layers.append(lin)
            if relu_last or i < n - 1:
                layers.append(torch.nn.ReLU())
        return torch.nn.Sequential(*layers)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        batch = dense.shape[0]
        indices = ids.t().reshape(-1).int()  # table-major, one id per bag
        offsets = torch.arange(0, batch * self.tables + 1, dtype=torch.int32)
        emb = self.tbe(indices, offsets).view(batch, self.tables, DIM)
        bottom = self.bottom(dense)
        vectors = torch.cat([bottom.unsqueeze(1), emb], dim=1)
        dots = torch.bmm(vectors, vectors.transpose(1, 2))
        return torch.sigmoid(self.top(torch.cat([bottom, dots.flatten(1).index_select(1, self.pairs)], 1)).squeeze(-1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cardinalities", required=True)
    p.add_argument("--mlp", required=True)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cards = [int(c) for c in a.cardinalities.split(",")]
    before = rss_bytes()
    t0 = time.perf_counter()
    model = Model(cards, dict(np.load(a.mlp))).eval()
    load_s = time.perf_counter() - t0
    loaded = rss_bytes()
    out = {"variant": "fbgemm_int4", "torch": torch.__version__, "load_s": round(load_s, 2),
           "rss_before_load_bytes": before, "rss_loaded_bytes": loaded}
    with torch.no_grad():
        for batch in BATCHES:
            gen = torch.Generator().manual_seed(batch)
            data = [(torch.rand(batch, 13, generator=gen) * 4,
                     torch.stack([torch.randint(0, c, (batch,), generator=gen) for c in cards], dim=1))
                    for _ in range(8)]
            for d, s in data[:2]:
                model(d, s)
            times, n, start = [], 0, time.perf_counter()
            while time.perf_counter() - start < a.seconds or n < 3:
                d, s = data[n % len(data)]
                t1 = time.perf_counter()
                model(d, s)
                times.append(time.perf_counter() - t1)
                n += 1
            wall = time.perf_counter() - start
            out[f"samples_per_s_b{batch}"] = round(batch * n / wall, 1)
            if batch in LATENCY_BATCHES:
                out[f"p50_ms_b{batch}"] = round(float(np.percentile(times, 50)) * 1e3, 4)
                out[f"p99_ms_b{batch}"] = round(float(np.percentile(times, 99)) * 1e3, 4)
    out["rss_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main()
