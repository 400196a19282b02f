"""torchrec's side of benchmarks/peer_torchrec.py: train its DLRM, print samples/s as JSON.

Run by the peer venv's python (torchrec 1.9.2, fbgemm-gpu-cpu 1.9.0, torch 2.14.1); it
imports nothing from dqrm_mpi.  The model is torchrec.models.dlrm.DLRM over a
FusedEmbeddingBagCollection: all tables in one fbgemm SplitTableBatchedEmbeddingBagsCodegen
(table-batched lookup, exact SGD applied to the looked-up rows inside backward), and
torch.optim.SGD on the dense and over arches.  Batches come from --data, an .npz with
dense float32 [n, 13], sparse int64 [n, 26] and label float32 [n] (the rows dqrm-train
reads); they are cycled.

    python peer_torchrec_worker.py --data batches.npz --cardinalities 1460,583,... \
        --batch-size 128 --warmup 30 --steps 200 --threads 2
    python peer_torchrec_worker.py --check      # versions, once the venv is installed
"""
from __future__ import annotations

import argparse
import json
import time

import fbgemm_gpu  # noqa: F401  (registers fbgemm's operators)
import numpy as np
import torch
import torchrec
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def build(cardinalities: list[int], dim: int, bottom: list[int], top: list[int],
          lr: float) -> tuple[DLRM, torch.optim.Optimizer]:
    """torchrec's DLRM with fused SGD embeddings, and the SGD for its dense part."""
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=c, feature_names=[f"f{i}"])
              for i, c in enumerate(cardinalities)]
    ebc = FusedEmbeddingBagCollection(tables=tables, optimizer_type=torch.optim.SGD, optimizer_kwargs={"lr": lr},
                                      device=torch.device("cpu"))
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=13, dense_arch_layer_sizes=bottom,
                 over_arch_layer_sizes=top)
    dense = [*model.dense_arch.parameters(), *model.inter_arch.parameters(), *model.over_arch.parameters()]
    return model, torch.optim.SGD(dense, lr=lr)


def batches(path: str, batch: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(dense [b, 13], sparse values feature-major [26 * b], label [b]) per whole batch in ``path``."""
    data = np.load(path)
    dense, sparse, label = (torch.from_numpy(data[k]) for k in ("dense", "sparse", "label"))
    return [(dense[s:s + batch], sparse[s:s + batch].t().reshape(-1).contiguous(), label[s:s + batch])
            for s in range(0, len(label) - batch + 1, batch)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="print the versions and exit")
    p.add_argument("--data")
    p.add_argument("--cardinalities", help="rows per table, comma separated (26)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=30, help="steps before the clock starts")
    p.add_argument("--steps", type=int, default=200, help="measured steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--bottom-mlp", default="512-256-64-16")
    p.add_argument("--top-mlp", default="512-256-1")
    a = p.parse_args()
    if a.check:
        print(json.dumps({"torch": torch.__version__, "torchrec": torchrec.__version__,
                          "fbgemm_gpu": getattr(fbgemm_gpu, "__version__", "?")}))
        return
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cards = [int(c) for c in a.cardinalities.split(",")]
    model, opt = build(cards, a.embedding_dim, [int(w) for w in a.bottom_mlp.split("-")],
                       [int(w) for w in a.top_mlp.split("-")], a.lr)
    data = batches(a.data, a.batch_size)
    keys = [f"f{i}" for i in range(len(cards))]
    lengths = torch.ones(len(cards) * a.batch_size, dtype=torch.int32)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    losses = []

    def step(i: int) -> None:
        dense, values, label = data[i % len(data)]
        features = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(dense, features).squeeze(1), label)
        loss.backward()  # the embedding rows take their SGD update here
        opt.step()
        losses.append(loss.item())

    for i in range(a.warmup):
        step(i)
    start = time.perf_counter()
    for i in range(a.warmup, a.warmup + a.steps):
        step(i)
    seconds = time.perf_counter() - start
    print(json.dumps({"samples_per_second": a.steps * a.batch_size / seconds, "ms_per_step": 1e3 * seconds / a.steps,
                      "steps": a.steps, "warmup": a.warmup, "batches_in_data": len(data),
                      "loss_first": losses[0], "loss_last_mean": sum(losses[-20:]) / len(losses[-20:]),
                      "torch": torch.__version__, "torchrec": torchrec.__version__,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
