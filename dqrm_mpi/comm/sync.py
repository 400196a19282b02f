"""Gradient synchronizer: after ``backward()`` and before ``optimizer.step()``, make every
rank's gradients the average over all ranks, optionally compressed.

Per gradient, keyed by parameter name:
  error-feedback compensate -> compress -> the collective the compressor declares ->
  decompress and average (in float, never summing quantized integers) -> error-feedback update.

- MLP (dense) gradients, ``DenseExchange``: compressors that declare ``allreduce`` (none,
  fp16) go through one grouped allreduce-average.  The others (int16/int8/int4, per-channel
  scales) are packed into one flat byte buffer per rank and either allgathered (every rank
  dequantizes every payload and sums in rank order) or exchanged two-phase (alltoall of
  chunks, the chunk owner dequantizes, averages and re-quantizes, allgather of the reduced
  chunks).  Sparsifying compressors (topk, threshold) send (index, value) messages whose
  size may differ per rank: always allgathered with their byte counts; every rank adds
  every rank's kept values into a dense sum in rank order.
- Embedding gradients (sparse COO rows of the flat table, cut into tables as the model's
  ``embedding_tables()`` says), ``SparseExchange``:
  duplicate rows are merged locally, the tables are flattened into one id space (table
  offset + row), and each rank's ids and (compressed) values travel as one byte message
  (allgather, or two-phase with the id space split into one range per rank).  Received
  rows are summed per id and averaged.  ``--emb-exchange dense`` instead averages whole
  table-sized gradients by allreduce (a ``DenseExchange`` over the tables; the paper's
  uncompressed baseline), for tables up to ``CompressionConfig.dense_emb_max_bytes``.

Every rank decodes the same bytes and reduces them in the same order, so parameters stay
identical.  With ``none`` everywhere the result equals the uncompressed exchange bit for bit.

Overlap (``CompressionConfig.overlap``, on by default): the MLP parameters are cut into
buckets of whole tensors in reverse registration order (backward produces the top MLP's
gradients first), each its own ``DenseExchange`` (its own layout and residual: per-channel
and per-tensor scales, and the residual, are those of the exchange over everything).  After
``begin_step()``, a post-accumulate-grad hook starts a bucket's exchange (compensate, encode,
start the collective) as soon as all its gradients exist, and the embedding table's hook
starts the embedding exchange; ``synchronize()`` then only waits and decodes, so the result
is bit-identical to exchanging after backward.  Each exchange is split into ``start`` (encode,
start the collective) and ``finish`` (wait, decode): one copy of the codec path for both.
Two-phase, top-k/threshold MLP compressors, ``--emb-exchange dense`` and one rank exchange
after backward (one bucket named ``grad.mlp``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..compression import ALLREDUCE, CompressionConfig, Compressor, ResidualMemory, get_compressor
from ..compression.base import as_bytes, from_bytes
from ..compression.layout import Layout
from .collectives import Collectives


def _balanced_bounds(cum: torch.Tensor, parts: int) -> list[int]:
    """Indices splitting items with cumulative sizes ``cum`` (ascending, starting at 0) into
    ``parts`` contiguous ranges of about equal total size."""
    total = int(cum[-1])
    targets = torch.tensor([total * r / parts for r in range(parts + 1)], dtype=torch.float64)
    bounds = torch.searchsorted(cum.to(torch.float64), targets).tolist()
    bounds[0], bounds[-1] = 0, len(cum) - 1
    for i in range(1, len(bounds)):  # monotone
        bounds[i] = max(bounds[i], bounds[i - 1])
    return bounds


class _CodecClock:
    """Attributes an exchange's wall time minus its collectives' time to the codec."""

    def __init__(self, backend: Collectives, kind: str) -> None:
        self.backend, self.kind = backend, kind

    def __enter__(self) -> "_CodecClock":
        self.t0 = time.perf_counter()
        self.comm0 = sum(self.backend.traffic.seconds.values())
        return self

    def __exit__(self, *exc) -> None:
        comm = sum(self.backend.traffic.seconds.values()) - self.comm0
        self.backend.traffic.record_codec(self.kind, time.perf_counter() - self.t0 - comm)


@dataclass(frozen=True)
class Started:
    """An exchange whose payload is encoded and whose collective is in flight (``inflight``,
    a ``Collectives`` handle; None when the exchange already ran whole, e.g. two-phase):
    ``decode(result of the collective)`` gives the exchange's output."""

    inflight: Any
    decode: Callable[[Any], Any]


def _finish(backend: Collectives, kind: str, started: Started) -> Any:
    """Wait for ``started``'s collective and decode its result (decoding counts as codec time)."""
    with _CodecClock(backend, kind):
        return started.decode(None if started.inflight is None else backend.wait(started.inflight))


@dataclass(frozen=True)
class _Chunk:
    lo: int      # first element
    hi: int      # one past the last element
    seg_lo: int  # first scale group
    seg_hi: int


class DenseExchange:
    """Averages named dense gradients across ranks through one compressor.

    shapes: name -> shape of each gradient, in a fixed order shared by all ranks.
    granularity: ``channel`` (one scale per row of a >= 2-D tensor, one per 1-D tensor) or
      ``tensor`` (one scale per tensor); ignored by compressors without scales.

    The compressor's declared ``collective`` decides the path: ``allreduce`` averages the
    payloads themselves (one grouped allreduce); any other works on one flat float32 buffer
    of all gradients (and one flat residual with error feedback), encodes straight into a
    reused byte buffer, allgathers it (or, ``two_phase``, exchanges chunks) and decodes every
    rank's payload in one pass; the scale groups are a ``Layout`` of 2-D blocks.  A sparse
    compressor (``compressor.sparse``) selects per tensor, scales per tensor (``granularity``
    and ``two_phase`` do not apply) and its messages are allgathered with their sizes.
    """

    def __init__(self, backend: Collectives, shapes: dict[str, torch.Size], compressor: Compressor,
                 granularity: str = "channel", error_feedback: bool = False, two_phase: bool = False,
                 kind: str = "mlp", tag: str | None = None) -> None:
        if granularity not in ("channel", "tensor"):
            raise ValueError(f"granularity must be channel or tensor, got {granularity!r}")
        if compressor.collective == ALLREDUCE and not compressor.linear:
            raise ValueError(f"{compressor.name}: declares allreduce, but its payloads cannot be summed")
        self.backend, self.compressor, self.kind = backend, compressor, kind
        self.tag = tag or f"grad.{kind}"  # the collectives' names (one per exchange object: buckets differ)
        self.allreduce = compressor.collective == ALLREDUCE  # else allgather or two-phase
        self.names = list(shapes)
        self.shapes = {n: torch.Size(s) for n, s in shapes.items()}
        self.numels = [self.shapes[n].numel() for n in self.names]
        self.numel = sum(self.numels)
        self.memory = ResidualMemory() if error_feedback else None
        self.sparse = compressor.sparse
        self.two_phase = two_phase and not self.allreduce and not self.sparse
        seg_sizes: list[int] = []
        for n in self.names:
            s = self.shapes[n]
            if granularity == "channel" and len(s) >= 2 and not self.sparse:
                seg_sizes += [s[1:].numel()] * s[0]
            else:
                seg_sizes.append(s.numel())
        self.num_groups = len(seg_sizes)
        sizes = torch.tensor(seg_sizes, dtype=torch.int64)
        cum = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
        seg_bounds = _balanced_bounds(cum, backend.size) if self.two_phase else [0, self.num_groups]
        self.chunks = [_Chunk(int(cum[a]), int(cum[b]), a, b) for a, b in zip(seg_bounds[:-1], seg_bounds[1:])]
        self.layouts = [Layout.from_sizes(seg_sizes[c.seg_lo:c.seg_hi]) for c in self.chunks]
        self.chunk_nbytes = [compressor.nbytes(c.hi - c.lo, c.seg_hi - c.seg_lo) for c in self.chunks]
        self._buffers: dict[str, torch.Tensor] = {}
        self.steps = 0  # exchanges so far: the clock of a top-k warm-up when no global step is given

    def _buf(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A scratch buffer reused across steps (never handed out beyond one exchange)."""
        b = self._buffers.get(key)
        if b is None or b.shape != torch.Size(shape) or b.dtype != dtype:
            b = self._buffers[key] = torch.empty(shape, dtype=dtype)
        return b

    # analytic sizes (what the tests compare the logged bytes with)
    def payload_nbytes(self) -> int:
        """Bytes of this rank's compressed payload handed to the first collective."""
        if self.allreduce:
            return self.compressor.data_nbytes(self.numel)
        if self.sparse:  # top-k: fixed; threshold: at most every value (+ the allgather's dim-0 count)
            kept = self.compressor.kept(self.layouts[0])
            return self.compressor.message_nbytes(self.numel if kept is None else kept, self.num_groups)
        return sum(self.chunk_nbytes)

    def exchange(self, grads: dict[str, torch.Tensor], step: int | None = None) -> dict[str, torch.Tensor]:
        """name -> local gradient  =>  name -> gradient averaged over ranks (new tensors).  ``step``:
        the global step, the clock of a sparse compressor's warm-up (default: exchanges so far)."""
        return self.finish(self.start(grads, step))

    def start(self, grads: dict[str, torch.Tensor], step: int | None = None) -> Started:
        """Error-feedback compensate and encode ``grads`` and start the collective; ``finish``
        waits and decodes.  Sparse and two-phase exchanges run whole here (nothing in flight)."""
        step = self.steps if step is None else step
        self.steps = step + 1
        with _CodecClock(self.backend, self.kind):
            if self.allreduce:
                comp = {n: (self.memory.compensate(n, grads[n]) if self.memory else grads[n]) for n in self.names}
                return self._allreduce_start(comp)
            device = grads[self.names[0]].device if self.names else torch.device("cpu")
            residual = self._residual()
            if self.sparse:
                out = self._sparse_allgather(grads, residual, step)
                return Started(None, lambda _: self._unflat(out, device))
            flat = self._flat(grads, residual)  # with error feedback: the residual itself
            if self.two_phase:
                out = self._two_phase(flat, residual)
                return Started(None, lambda _: self._unflat(out, device))
            msg = self._buf("msg", (self.chunk_nbytes[0],), torch.uint8)
            self._encode(flat, residual, msg)
            inflight = self.backend.allgather_stacked_start(msg, name=self.tag, kind=self.kind)
            return Started(inflight, lambda gathered: self._unflat(self._reduce(gathered, self.layouts[0]), device))

    def finish(self, started: Started) -> dict[str, torch.Tensor]:
        """``start``'s exchange done: name -> gradient averaged over ranks."""
        return _finish(self.backend, self.kind, started)

    def _unflat(self, out: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        return {n: t.view(self.shapes[n]).to(device) for n, t in zip(self.names, torch.split(out, self.numels))}

    def _flat(self, grads: dict[str, torch.Tensor], residual: torch.Tensor | None = None) -> torch.Tensor:
        """The gradients as one float32 [numel] vector on the CPU, in ``names`` order: with error
        feedback added into ``residual`` itself (it becomes the compensated gradient, no copy),
        else in a buffer reused across steps."""
        local = [grads[n].detach().reshape(-1).to(device="cpu", dtype=torch.float32) for n in self.names]
        if residual is None:
            return torch.cat(local, out=self._buf("flat", (self.numel,), torch.float32))
        for g, r in zip(local, torch.split(residual, self.numels)):
            r.add_(g)
        return residual

    def _residual(self) -> torch.Tensor | None:
        """The flat FP32 residual (zeros at first); memory.residuals holds per-name views of it."""
        if self.memory is None:
            return None
        r = self._buffers.get("residual")
        if r is None:
            r = self._buffers["residual"] = torch.zeros(self.numel, dtype=torch.float32)
            for n, v in zip(self.names, torch.split(r, self.numels)):
                self.memory.residuals[n] = v.view(self.shapes[n])
        return r

    def _allreduce_start(self, comp: dict[str, torch.Tensor]) -> Started:
        c = [self.compressor.compress(comp[n]) for n in self.names]
        if self.memory:
            for n, ci in zip(self.names, c):
                self.memory.update(n, comp[n], self.compressor.decompress(ci).view(self.shapes[n]))
        inflight = self.backend.allreduce_start([ci.data for ci in c], name=self.tag, kind=self.kind)
        return Started(inflight, lambda avg: {
            n: self.compressor.decompress(type(ci)(a, ci.scales, ci.numel)).view(self.shapes[n])
            for n, ci, a in zip(self.names, c, avg)})

    def _encode(self, flat: torch.Tensor, residual: torch.Tensor | None, msg: torch.Tensor) -> None:
        """Encode each chunk of the compensated ``flat`` into its slice of ``msg``; with error
        feedback ``flat`` is the residual, which becomes compensated - what the receivers decode."""
        work = self._buf("work", (self.numel,), torch.float32)
        at = 0
        for c, layout, nb in zip(self.chunks, self.layouts, self.chunk_nbytes):
            if residual is None:
                self.compressor.encode_into(flat[c.lo:c.hi], layout, msg[at:at + nb], None, work[c.lo:c.hi])
            else:
                self.compressor.encode_feedback_into(flat[c.lo:c.hi], layout, msg[at:at + nb], work[c.lo:c.hi])
            at += nb

    def _reduce(self, bufs: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Payloads uint8 [size, nbytes] of one chunk -> their float average [numel] (new tensor),
        summed in rank order (the same float sum on every rank)."""
        return self.compressor.decode_mean(bufs, layout, self.backend.size)

    def _sparse_allgather(self, grads: dict[str, torch.Tensor], residual: torch.Tensor | None,
                          step: int) -> torch.Tensor:
        """(index, value) messages of any size per rank: allgathered with their byte counts, each
        rank's kept values added into one dense sum in rank order, then averaged.  With error
        feedback the residual itself becomes the compensated gradient (residual + gradient, in
        place), then loses what was sent: no copy of the flat vector."""
        layout = self.layouts[0]
        flat = self._flat(grads, residual)
        msg, idx, sent = self.compressor.encode(flat, layout, step)
        if residual is not None:  # what was not sent (and the kept values' rounding) waits for the next step
            residual.index_add_(0, idx, sent, alpha=-1)  # residual[idx] -= sent (unique idx), without a gather
        parts = self.backend.allgather([msg], name=self.tag, kind=self.kind)[0]
        out = torch.zeros(self.numel, dtype=torch.float32)
        touched = torch.cat([self.compressor.decode_add(p, layout, out, source=f"rank {r}", step=step)
                             for r, p in enumerate(parts)])
        if touched.numel() > self.numel // 8:  # a pass over the vector is cheaper than a scatter
            return out.div_(self.backend.size)
        out.index_copy_(0, touched, out.index_select(0, touched).div_(self.backend.size))  # the rest stays 0
        return out

    def _two_phase(self, flat: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        msg = self._buf("msg", (sum(self.chunk_nbytes),), torch.uint8)
        self._encode(flat, residual, msg)
        received, rsplits = self.backend.alltoall(msg, self.chunk_nbytes, name=f"{self.tag}.scatter",
                                                  kind=self.kind)
        r = self.backend.rank
        mine, layout = self.chunks[r], self.layouts[r]
        avg = self._reduce(received.view(len(rsplits), self.chunk_nbytes[r]), layout)
        reduced = torch.empty(self.chunk_nbytes[r], dtype=torch.uint8)
        self.compressor.encode_into(avg, layout, reduced, work=self._buf("work", (self.numel,), torch.float32)[
            :mine.hi - mine.lo])
        gathered = self.backend.allgather([reduced], name=f"{self.tag}.gather", kind=self.kind)[0]
        out = torch.empty(self.numel, dtype=torch.float32)
        for p, c, lay in zip(gathered, self.chunks, self.layouts):
            self.compressor.decode_many(p.view(1, -1), lay, out[c.lo:c.hi].view(1, -1))
        return out


class SparseExchange:
    """Exchanges coalesced embedding-gradient rows across ranks.

    Ids live in one flat space over the tables (table offset + row).  One message per rank
    and destination: ``n`` (int64), ids (int32 when the id space fits, else int64), then
    the compressor's payload of the n x dim values and its scales.

    granularity: ``table`` (one scale per table: the scales of all tables are sent),
      ``row`` (one per row) or ``tensor`` (one per message).
    """

    HEADER = 8

    def __init__(self, backend: Collectives, names: list[str], rows: list[int], dim: int,
                 compressor: Compressor, granularity: str = "table", error_feedback: bool = False,
                 two_phase: bool = False, kind: str = "emb") -> None:
        if granularity not in ("table", "row", "tensor"):
            raise ValueError(f"granularity must be table, row or tensor, got {granularity!r}")
        self.backend, self.compressor, self.kind = backend, compressor, kind
        self.tag = f"grad.{kind}"  # the collectives' names
        self.names, self.rows, self.dim, self.granularity = list(names), list(rows), dim, granularity
        self.offsets = torch.tensor([0, *torch.tensor(rows, dtype=torch.int64).cumsum(0).tolist()],
                                    dtype=torch.int64)
        self.total_rows = int(self.offsets[-1])
        self.id_dtype = torch.int32 if self.total_rows < 2 ** 31 else torch.int64
        self.id_bytes = 4 if self.id_dtype == torch.int32 else 8
        self.memory = ResidualMemory() if error_feedback else None
        self.two_phase = two_phase
        # two-phase: rank r owns ids [bounds[r], bounds[r + 1])
        self.bounds = torch.tensor([self.total_rows * r // backend.size for r in range(backend.size + 1)],
                                   dtype=torch.int64)

    # -- analytic size -------------------------------------------------------------
    def num_groups(self, n: int) -> int:
        return {"table": len(self.rows), "row": n, "tensor": 1}[self.granularity]

    def message_nbytes(self, n: int) -> int:
        """Bytes of one message carrying n rows."""
        return self.HEADER + n * self.id_bytes + self.compressor.nbytes(n * self.dim, self.num_groups(n))

    # -- encoding --------------------------------------------------------------------
    def _layout(self, ids: torch.Tensor) -> Layout:
        """Scale groups of the n x dim values: rows of ``dim``, grouped by table, row or tensor."""
        n = ids.numel()
        if self.granularity == "tensor":
            return Layout.single(n * self.dim)
        if self.granularity == "row":
            return Layout.rows(n, self.dim, None, n)
        return Layout.rows(n, self.dim, torch.searchsorted(self.offsets[1:], ids, right=True), len(self.rows))

    def encode(self, ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(message uint8, the values as the receivers will decode them)."""
        n = ids.numel()
        msg = torch.empty(self.message_nbytes(n), dtype=torch.uint8)
        end = self.HEADER + n * self.id_bytes
        msg[:self.HEADER].copy_(as_bytes(torch.tensor([n], dtype=torch.int64)))
        msg[self.HEADER:end].copy_(as_bytes(ids.to(self.id_dtype)))
        transmitted = torch.empty(n, self.dim, dtype=torch.float32)
        self.compressor.encode_into(values.reshape(-1).to(torch.float32), self._layout(ids), msg[end:],
                                    transmitted.view(-1))
        return msg, transmitted

    def decode(self, msg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(from_bytes(msg[:self.HEADER], torch.int64)[0])
        end = self.HEADER + n * self.id_bytes
        ids = from_bytes(msg[self.HEADER:end], self.id_dtype).to(torch.int64)
        values = torch.empty(1, n * self.dim, dtype=torch.float32)
        if n:  # a rank (or, two-phase, an id range) without rows sends only the header and its scales
            self.compressor.decode_many(msg[end:].view(1, -1), self._layout(ids), values)
        return ids, values.view(n, self.dim)

    # -- error feedback on the touched rows ----------------------------------------------
    def _tables(self, ids: torch.Tensor) -> list[tuple[int, int, int]]:
        """(table, lo, hi) slices of sorted global ids."""
        bounds = torch.searchsorted(ids, self.offsets).tolist()
        return [(t, bounds[t], bounds[t + 1]) for t in range(len(self.rows)) if bounds[t + 1] > bounds[t]]

    def _compensate(self, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        out = values.clone()
        for t, lo, hi in self._tables(ids):
            out[lo:hi] = self.memory.compensate_rows(self.names[t], (self.rows[t], self.dim),
                                                     ids[lo:hi] - self.offsets[t], values[lo:hi])
        return out

    def _remember(self, ids: torch.Tensor, comp: torch.Tensor, transmitted: torch.Tensor) -> None:
        for t, lo, hi in self._tables(ids):
            self.memory.update_rows(self.names[t], ids[lo:hi] - self.offsets[t], comp[lo:hi], transmitted[lo:hi])

    # -- the exchange ------------------------------------------------------------------
    def exchange(self, ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local unique sorted global ids int64 [n] and values [n, dim] => rows of the average
        gradient: ids [m] and values [m, dim] (ids may repeat: sum them per id)."""
        return self.finish(self.start(ids, values))

    def start(self, ids: torch.Tensor, values: torch.Tensor) -> Started:
        """Compensate, encode and start the allgather (``finish`` waits and decodes); the
        two-phase exchange runs whole here."""
        with _CodecClock(self.backend, self.kind):
            comp = self._compensate(ids, values) if self.memory else values
            if self.two_phase:
                out = self._two_phase(ids, comp)
                return Started(None, lambda _: out)
            msg, transmitted = self.encode(ids, comp)
            if self.memory:
                self._remember(ids, comp, transmitted)
            return Started(self.backend.allgather_start([msg], name=self.tag, kind=self.kind),
                           self._decode_parts)

    def finish(self, started: Started) -> tuple[torch.Tensor, torch.Tensor]:
        """``start``'s exchange done: ids [m] and values [m, dim] of the average gradient."""
        return _finish(self.backend, self.kind, started)

    def _decode_parts(self, gathered: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        decoded = [self.decode(p) for p in gathered[0]]
        return torch.cat([d[0] for d in decoded]), torch.cat([d[1] for d in decoded]) / self.backend.size

    def _two_phase(self, ids: torch.Tensor, comp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cuts = torch.searchsorted(ids, self.bounds).tolist()
        msgs, transmitted = zip(*(self.encode(ids[a:b], comp[a:b]) for a, b in zip(cuts[:-1], cuts[1:])))
        if self.memory:
            self._remember(ids, comp, torch.cat(transmitted))
        received, rsplits = self.backend.alltoall(torch.cat(msgs), [m.numel() for m in msgs],
                                                  name=f"{self.tag}.scatter", kind=self.kind)
        decoded = [self.decode(p) for p in torch.split(received, rsplits)]
        mine_ids = torch.cat([d[0] for d in decoded])
        mine_vals = torch.cat([d[1] for d in decoded]) / self.backend.size
        if mine_ids.numel():
            merged = torch.sparse_coo_tensor(mine_ids.unsqueeze(0), mine_vals, (self.total_rows, self.dim),
                                             check_invariants=False).coalesce()
            mine_ids, mine_vals = merged.indices()[0], merged.values()
        reduced, _ = self.encode(mine_ids, mine_vals)
        parts = self.backend.allgather([reduced], name=f"{self.tag}.gather", kind=self.kind)[0]
        decoded = [self.decode(p) for p in parts]
        return torch.cat([d[0] for d in decoded]), torch.cat([d[1] for d in decoded])


def _buckets(params: list[tuple[str, nn.Parameter]], bucket_bytes: int) -> list[list[tuple[str, nn.Parameter]]]:
    """``params`` in order, cut into runs of whole tensors holding at least ``bucket_bytes`` of
    FP32 each (the last may hold less; 0: one tensor per bucket)."""
    groups: list[list[tuple[str, nn.Parameter]]] = [[]]
    held = 0
    for n, p in params:
        if groups[-1] and held >= bucket_bytes:
            groups.append([])
            held = 0
        groups[-1].append((n, p))
        held += 4 * p.numel()
    return [g for g in groups if g]


class _Bucket:
    """MLP parameters whose gradients travel together through one ``DenseExchange``."""

    def __init__(self, params: list[tuple[str, nn.Parameter]], exchange: DenseExchange) -> None:
        self.params, self.exchange = params, exchange
        self.ready = 0  # gradients accumulated in this backward
        self.started: Started | None = None


class GradientSynchronizer:
    """Averages the gradients of ``model`` across ranks; parameters are keyed by name.

    ``config`` (default: no compression) picks the compressors, error feedback, collective
    and embedding exchange (sparse rows or dense tables); see ``CompressionConfig``.  A single
    rank communicates nothing.  ``sparse_names``: the parameters with sparse gradients; a
    model that stores its tables in one such parameter (DLRM's flat table) says how it is
    cut by ``embedding_tables()`` -> [(table name, rows)], and the embedding exchange scales
    and remembers per table under those names.
    """

    def __init__(self, backend: Collectives, model: nn.Module, sparse_names: set[str],
                 config: CompressionConfig | None = None) -> None:
        params = dict(model.named_parameters())
        missing = set(sparse_names) - set(params)
        if missing:
            raise ValueError(f"sparse parameters not in the model: {sorted(missing)}")
        self.backend = backend
        self.config = config = config or CompressionConfig()
        self.dense = [(n, p) for n, p in params.items() if n not in sparse_names and p.requires_grad]
        self.sparse = [(n, params[n]) for n in sorted(sparse_names, key=list(params).index)]
        dims = {p.shape[1] for _, p in self.sparse}
        if len(dims) > 1:
            raise ValueError(f"embedding tables must share one dim, got {sorted(dims)}")
        rows = [p.shape[0] for _, p in self.sparse]  # the sparse parameters, one flat id space
        self.offsets = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()], dtype=torch.int64)
        self.total_rows = int(self.offsets[-1])
        self.dim = dims.pop() if dims else 0
        # The tables that space is cut into (scales and residuals are per table): the model's
        # ``embedding_tables()`` when it stores several tables in one parameter, else one per parameter.
        tables = [(n, p.shape[0]) for n, p in self.sparse]
        if self.sparse and hasattr(model, "embedding_tables"):
            tables = model.embedding_tables()
        if sum(n for _, n in tables) != self.total_rows:
            raise ValueError(f"the embedding tables have {sum(n for _, n in tables)} rows in all, the sparse "
                             f"parameters {self.total_rows}")
        self.table_names = [name for name, _ in tables]
        self.table_rows = [n for _, n in tables]
        mlp_two_phase = config.use_two_phase(backend.size, config.mlp)
        emb_two_phase = config.use_two_phase(backend.size, config.emb)
        mlp = get_compressor(config.mlp)
        self.sparse_exchange = SparseExchange(
            backend, self.table_names, self.table_rows, self.dim, get_compressor(config.emb), config.emb_scale,
            config.emb_error_feedback, emb_two_phase, kind="emb")
        self.table_exchange = None  # --emb-exchange dense: whole tables through one allreduce
        if config.emb_exchange == "dense" and self.sparse and backend.size > 1:
            nbytes = 4 * self.total_rows * self.dim
            if nbytes > config.dense_emb_max_bytes:
                raise ValueError(
                    f"--emb-exchange dense would allreduce {nbytes / 2**30:.3g} GiB of FP32 embedding gradients "
                    f"per step and rank ({len(tables)} tables, {self.total_rows:,} rows x {self.dim}), above the "
                    f"limit of {config.dense_emb_max_bytes / 2**30:.3g} GiB; use --emb-exchange sparse (lossless: "
                    "the touched rows only) or smaller tables")
            self.table_exchange = DenseExchange(backend, {n: (r, self.dim) for n, r in tables},
                                                get_compressor(config.emb), "tensor", config.emb_error_feedback,
                                                kind="emb")
        # Overlap: only where every exchange is one collective started from encoded payloads.
        self.overlap = (config.overlap and backend.size > 1 and not (mlp_two_phase or emb_two_phase)
                        and not mlp.sparse and self.table_exchange is None)
        # The MLP's buckets: one of everything without overlap (collective "grad.mlp"), else
        # whole tensors in reverse registration order (backward makes the top MLP's first).
        groups = _buckets(self.dense[::-1], config.bucket_bytes) if self.overlap else [self.dense]
        self.buckets = [_Bucket(group, DenseExchange(
            backend, {n: p.shape for n, p in group}, mlp, config.mlp_scale, config.mlp_error_feedback, mlp_two_phase,
            kind="mlp", tag=f"grad.mlp.{i}" if self.overlap else None)) for i, group in enumerate(groups)]
        self._in_flight: list[_Bucket] = []  # MLP buckets started this step, in start order
        self._emb_started: Started | None = None
        self._emb_ready = 0  # sparse parameters whose gradient this backward has accumulated
        self._armed = False  # begin_step() was called: backward's hooks start the exchange
        self._first_start: float | None = None
        self._backward_end: float | None = None  # backward_done() this step
        self._hook_seconds = 0.0
        self.start_order: list[tuple[str, bool]] = []  # this step's (collective name, started in backward)
        self.last_start_order: list[tuple[str, bool]] = []  # the last synchronized step's
        if self.overlap:
            for b in self.buckets:
                for _, p in b.params:
                    p.register_post_accumulate_grad_hook(lambda _p, b=b: self._dense_ready(b))
            for _, p in self.sparse:
                p.register_post_accumulate_grad_hook(lambda _p: self._emb_ready_hook())

    def error_feedback_nbytes(self) -> int:
        """Bytes held by residuals now (embedding residuals are table-sized)."""
        exchanges = (*(b.exchange for b in self.buckets), self.sparse_exchange, self.table_exchange)
        return sum(e.memory.nbytes() for e in exchanges if e is not None and e.memory)

    def begin_step(self) -> None:
        """Call before ``backward()`` (with overlap): its hooks then start each bucket's exchange as
        soon as the bucket's gradients are accumulated, and the embedding exchange once the
        embedding gradient exists; ``synchronize()`` starts what backward did not and finishes.
        Local ``p.grad`` stays untouched until ``synchronize()``.  Without overlap: nothing."""
        self._armed = self.overlap

    def backward_done(self) -> None:
        """Call right after ``backward()``: from here on the step waits for the exchange.  What
        runs between this and ``synchronize()`` (the finite-flags agreement: its collective
        queues behind the exchange's in flight) counts as waited, and as part of the exchange."""
        if self.backend.size > 1:
            self._backward_end = self._clock_start()

    def _clock_start(self) -> float:
        now = time.perf_counter()
        if self._first_start is None:
            self._first_start = now
        return now

    def _dense_ready(self, bucket: "_Bucket") -> None:
        """A hook: one more of ``bucket``'s gradients is accumulated; start it once all are."""
        if not self._armed:
            return
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._start_in_backward(lambda: self._start_bucket(bucket, None, in_backward=True))

    def _emb_ready_hook(self) -> None:
        """A hook on a sparse parameter: once every one has its gradient, start the embedding exchange."""
        if not self._armed:
            return
        self._emb_ready += 1
        if self._emb_ready == len(self.sparse):
            self._start_in_backward(lambda: self._start_sparse(in_backward=True))

    def _start_in_backward(self, start: Callable[[], None]) -> None:
        """Run a hook's ``start()``; its time is the step's (``waited_seconds``), inside the span."""
        t0 = self._clock_start()
        start()
        self._hook_seconds += time.perf_counter() - t0

    def _start_bucket(self, bucket: "_Bucket", step: int | None, in_backward: bool) -> None:
        grads = {}
        for n, p in bucket.params:
            if p.grad is None:  # a parameter unused this step still takes part (as zeros)
                p.grad = torch.zeros_like(p)
            grads[n] = p.grad
        bucket.started = bucket.exchange.start(grads, step)
        self._in_flight.append(bucket)
        self.start_order.append((bucket.exchange.tag, in_backward))

    def _start_sparse(self, in_backward: bool) -> None:
        ids, values = self.local_sparse_rows()
        # the exchange encodes and decodes in host memory; set_sparse_grads moves the result
        self._emb_started = self.sparse_exchange.start(ids.cpu(), values.cpu())
        self.start_order.append((self.sparse_exchange.tag, in_backward))

    def synchronize(self, step: int | None = None) -> None:
        """Average every gradient in place.  ``step``: the global step (0 for the first), the
        clock of a top-k warm-up (default: calls so far, which restart with the process).

        Starts the exchanges backward's hooks did not (all of them without overlap), waits for
        each and decodes it in rank order, then writes ``p.grad``.  Records the step's
        ``exchange_seconds`` (first start in backward, else ``backward_done()``, else this call,
        to last decode) and ``waited_seconds`` (hook encoding plus the time from
        ``backward_done()``, else from this call, to the last decode) in ``backend.traffic``."""
        if self.backend.size == 1:
            return
        t0 = self._clock_start() if self._backward_end is None else self._backward_end
        for bucket in self.buckets:
            if bucket.started is None:
                self._start_bucket(bucket, step, in_backward=False)
        if self.table_exchange:
            self._dense_tables()
        elif self.sparse and self._emb_started is None:
            self._start_sparse(in_backward=False)
        for bucket in self._in_flight:  # in start order: the earliest is the likeliest done
            averaged = bucket.exchange.finish(bucket.started)
            for n, p in bucket.params:  # fresh tensors each step (zero_grad drops them): no copy
                p.grad = averaged[n].to(p.dtype)
            bucket.started, bucket.ready = None, 0
        if self._emb_started is not None:
            self.set_sparse_grads(*self.sparse_exchange.finish(self._emb_started))
        end = time.perf_counter()
        self.backend.traffic.record_exchange(end - self._first_start, self._hook_seconds + end - t0)
        self._in_flight, self._emb_started, self._emb_ready, self._armed = [], None, 0, False
        self._first_start, self._backward_end, self._hook_seconds = None, None, 0.0
        self.last_start_order, self.start_order = self.start_order, []

    def _dense_tables(self) -> None:
        """Dense embedding exchange: every table's full-size gradient averaged (rows no rank
        touched are zeros), then stored sparse again (the rows with a nonzero average)."""
        flat = torch.cat([torch.zeros_like(p) if p.grad is None else p.grad.to_dense() for _, p in self.sparse])
        averaged = self.table_exchange.exchange(dict(zip(self.table_names, torch.split(flat, self.table_rows))))
        flat = torch.cat([averaged[n] for n in self.table_names])
        for (_, p), g in zip(self.sparse, torch.split(flat, [p.shape[0] for _, p in self.sparse])):
            p.grad = g.to_sparse(sparse_dim=1)

    def local_sparse_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's embedding gradient: global row ids int64 [nnz] (unique, sorted) and values [nnz, d]."""
        ids, values = [], []
        for (name, p), offset in zip(self.sparse, self.offsets[:-1].tolist()):
            g = p.grad
            if g is None:
                continue
            if not g.is_sparse:
                raise TypeError(f"{name}: expected a sparse gradient (an embedding lookup with sparse=True), "
                                "got dense")
            g = g.coalesce()
            ids.append(g.indices()[0] + offset)
            values.append(g.values())
        if not ids:
            return torch.empty(0, dtype=torch.int64), torch.empty(0, self.dim)
        return torch.cat(ids), torch.cat(values)

    def set_sparse_grads(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Sum ``values`` [n, d] per global row id [n] and store them as the tables' gradients.

        ids and values may be on any device (the exchange returns them in host memory): the
        sum and the gradients are made on the tables' device, ids and values moved there together."""
        device = self.sparse[0][1].device
        ids, values = ids.to(device), values.to(device)
        merged = torch.sparse_coo_tensor(ids.unsqueeze(0), values, (self.total_rows, self.dim),
                                         check_invariants=False).coalesce()
        rows, vals = merged.indices()[0], merged.values()
        bounds = torch.searchsorted(rows, self.offsets.to(device)).tolist()
        for t, (_, p) in enumerate(self.sparse):
            lo, hi = bounds[t], bounds[t + 1]
            p.grad = torch.sparse_coo_tensor(
                (rows[lo:hi] - int(self.offsets[t])).unsqueeze(0), vals[lo:hi], p.shape,
                is_coalesced=True, check_invariants=False)
