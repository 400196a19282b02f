"""Codec A/B, interleaved step by step in one process, at Kaggle dimensions (the ``comm.py --codec``
set-up: the Kaggle MLP's gradients and 128 samples' embedding rows per rank, 2 ranks stood in for
in process): this checkout's gradient exchanges with its fused CPU kernels against the same code's
PyTorch path (``kernels.disabled()``, as DQRM_KERNELS=0), or, with ``--base``, against another
checkout (a base commit).  Prints, per configuration, the median thread CPU ms of the MLP and the
embedding exchange for each side and their ratios (CPU time: steadier than wall time on a shared
machine), the exchanges' own codec clock (wall time less the stand-in collectives, what
``comm.py --codec`` reports) and where the CPU time goes (the compressors' encode and decode
methods, and the rest of both exchanges: error-feedback bookkeeping, headers, the stand-in
collectives' copies, Python), after checking that both give bit-identical averaged gradients
at every step (error feedback included).

    python benchmarks/codec_ab.py --configs sparse_int8 sparse_int4 mlp_topk0.01_int8_ef   # kernels vs PyTorch
    git worktree add --detach /tmp/base 13f3e88
    python benchmarks/codec_ab.py --base /tmp/base --configs sparse_int8 sparse_int4 mlp_topk0.01_int8_ef

The base checkout's ``dqrm_mpi`` is copied under another package name (its imports are
relative), so both versions live in this process.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmarks._common import KAGGLE_CARDINALITIES, machine  # noqa: E402
from comm import CONFIGS, _LocalBackend, _zipf_ids  # noqa: E402


class _PartClock:
    """Thread CPU seconds a side spends in its compressors' encode and decode methods (outermost
    calls only), wrapped on the compressor objects."""

    PARTS = {"encode": ("encode", "encode_into", "encode_feedback_into"),
             "decode": ("decode_add", "decode_many", "decode_mean")}

    def __init__(self, compressors: list) -> None:
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self._depth = 0
        for c in compressors:
            for part, names in self.PARTS.items():
                for name in names:
                    if hasattr(c, name):
                        setattr(c, name, self._timed(getattr(c, name), part))

    def _timed(self, method, part: str):
        def timed(*args, **kwargs):
            self._depth += 1
            t0 = time.thread_time()
            try:
                return method(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds[part] += time.thread_time() - t0
        return timed

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, dict.fromkeys(self.PARTS, 0.0)
        return out


def _exchanges(pkg: str, shapes: dict, spec: tuple) -> tuple:
    sync = importlib.import_module(f"{pkg}.comm.sync")
    get_compressor = importlib.import_module(f"{pkg}.compression").get_compressor
    emb_c, mlp_c, ef, _ = spec
    backend = _LocalBackend(2)
    names = [f"embeddings.tables.{t}.weight" for t in range(26)]
    mlp, emb = get_compressor(mlp_c), get_compressor(emb_c)
    return (sync.DenseExchange(backend, shapes, mlp, "channel", ef in ("mlp", "both")),
            sync.SparseExchange(backend, names, list(KAGGLE_CARDINALITIES), 16, emb, "table", ef in ("emb", "both")),
            _PartClock([mlp, emb]))


def compare(configs: list[str], steps: int, batch: int, sides: dict[str, tuple[str, bool]]) -> dict:
    """``sides``: label -> (package, kernels on), the first label the one measured against the second."""
    import torch

    from dqrm_mpi import kernels
    from dqrm_mpi.model.config import model_config_from_preset
    from dqrm_mpi.model.dlrm import BottomMLP, TopMLP

    cfg = model_config_from_preset("kaggle", KAGGLE_CARDINALITIES)
    shapes = {f"bottom.{n}": p.shape for n, p in BottomMLP(13, cfg.bottom_mlp).named_parameters()}
    shapes.update({f"top.{n}": p.shape for n, p in TopMLP(cfg.num_interactions, cfg.top_mlp).named_parameters()})
    offsets = torch.tensor([0, *torch.tensor(KAGGLE_CARDINALITIES).cumsum(0).tolist()])
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    out = {}
    for name in configs:
        ex = {label: _exchanges(pkg, shapes, CONFIGS[name]) for label, (pkg, _) in sides.items()}
        new, base = sides
        cpu = {(label, part): [] for label in ex for part in ("mlp", "emb", "codec", "encode", "decode", "other")}
        for step in range(steps + 3):  # 3 warm-up steps
            gen = torch.Generator().manual_seed(step)
            grads = {n: torch.randn(s, generator=gen) * 1e-3 for n, s in shapes.items()}
            gid = torch.unique(torch.stack([_zipf_ids(gen, c, batch) for c in KAGGLE_CARDINALITIES], dim=1)
                               + offsets[:-1])
            vals = torch.randn(gid.numel(), 16, generator=gen) * 1e-3
            results = {}
            for label in ((base, new) if step % 2 else (new, base)):
                mlp, emb, parts = ex[label]
                mlp.backend.traffic.take()
                parts.take()
                with contextlib.nullcontext() if sides[label][1] else kernels.disabled():
                    c0 = time.thread_time()
                    averaged = mlp.exchange(grads)
                    c1 = time.thread_time()
                    rows = emb.exchange(gid, vals)
                    c2 = time.thread_time()
                results[label] = (averaged, rows)
                if step >= 3:
                    cpu[(label, "mlp")].append(c1 - c0)
                    cpu[(label, "emb")].append(c2 - c1)
                    cpu[(label, "codec")].append(sum(mlp.backend.traffic.codec.values()))
                    seconds = parts.take()
                    cpu[(label, "encode")].append(seconds["encode"])
                    cpu[(label, "decode")].append(seconds["decode"])
                    cpu[(label, "other")].append(c2 - c0 - seconds["encode"] - seconds["decode"])
            (a_base, r_base), (a_new, r_new) = results[base], results[new]
            if not (all(torch.equal(a_base[n], a_new[n]) for n in shapes)
                    and all(torch.equal(x, y) for x, y in zip(r_base, r_new))):
                raise SystemExit(f"{name}: the checkouts' exchanges differ at step {step}")
        row = {f"{label}_{part}_{'wall' if part == 'codec' else 'cpu'}_ms_p50": round(med(v) * 1e3, 3)
               for (label, part), v in cpu.items()}
        row[f"codec_wall_ratio_{new}_vs_{base}"] = round(med(cpu[(new, "codec")]) / med(cpu[(base, "codec")]), 3)
        for part in ("mlp", "emb"):
            row[f"{part}_ratio_{new}_vs_{base}"] = round(med(cpu[(new, part)]) / med(cpu[(base, part)]), 3)
        total = {label: med([a + b for a, b in zip(cpu[(label, "mlp")], cpu[(label, "emb")])]) for label in ex}
        row[f"total_ratio_{new}_vs_{base}"] = round(total[new] / total[base], 3)
        row["bit_identical"] = True
        out[name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="root of another checkout (its dqrm_mpi/ is compared, kernels on both); "
                                   "default: this checkout with its kernels against its PyTorch path")
    ap.add_argument("--configs", nargs="+", default=["sparse_int8", "sparse_int4", "mlp_topk0.01_int8_ef"],
                    choices=[c for c, spec in CONFIGS.items() if spec is not None and spec[3] == "allgather"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=128, help="per-rank batch (embedding rows)")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    from dqrm_mpi import kernels
    res = {"benchmark": "codec_ab", "machine": machine(), "steps": a.steps, "threads": 1}
    if a.base is None:
        if not kernels.enabled():
            raise SystemExit(f"the kernels are off or not built ({kernels.WHY_NOT or 'DQRM_KERNELS=0'}): "
                             "build them with `python setup.py build_ext --inplace`")
        res["configs"] = compare(a.configs, a.steps, a.batch, {"kernels": ("dqrm_mpi", True),
                                                               "pytorch": ("dqrm_mpi", False)})
    else:
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(a.base) / "dqrm_mpi"
            if not source.is_dir():
                raise SystemExit(f"--base {a.base}: no dqrm_mpi/ there")
            shutil.copytree(source, Path(tmp) / "dqrm_base")
            sys.path.insert(0, tmp)
            res["base"] = str(Path(a.base).resolve())
            res["configs"] = compare(a.configs, a.steps, a.batch, {"new": ("dqrm_mpi", True),
                                                                   "base": ("dqrm_base", True)})
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
