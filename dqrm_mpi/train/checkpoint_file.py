"""One home for a checkpoint file (``checkpoint.pt``, ``checkpoint-prev.pt``,
``checkpoint-epoch{N}.pt``): writing it, verifying it and reading it.

A checkpoint is a ``torch.save`` zip (``torch.load`` still reads it) of a dict whose first
key, ``header``, says what it is and how many bytes the file has, and whose ``digest``
holds a CRC-32 (``zlib.crc32``) of every tensor in the dict, nested dicts and lists
included (the optimizer state as much as the model), and one of the metadata: every other
value, and each tensor's path, dtype and shape.  New keys are covered without code changes.

Reading refuses, naming the file (and the tensor), a file that is empty, truncated, not a
checkpoint, or whose bytes differ from its digests; then checks what a digest cannot: every
floating tensor finite, and the model's shapes those of the architecture the same file
records.  A checkpoint written before digests existed (no header) still loads, with a note.
"""
from __future__ import annotations

import os
import re
import sys
import zlib
from pathlib import Path
from typing import Any, Iterator

import torch

from ..files import write_atomic

FORMAT = "dqrm-train checkpoint v1"
# The header's value is fixed-width text, so the pickled dict (the zip's first record, stored
# uncompressed) has the same length whatever the number, and it can be found in the first bytes
# of a file cut short: that is how a truncated file says how long it should have been.
_HEADER = re.compile(rb"dqrm-train checkpoint v1 bytes=(\d{16})")
_HEADER_SEARCH_BYTES = 4096
_ZIP_MAGIC = b"PK\x03\x04"
_RESERVED = ("header", "digest")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


def _header(file_bytes: int) -> str:
    return f"{FORMAT} bytes={file_bytes:016d}"


# ---------------------------------------------------------------- digests

def _leaves(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(path, value) of every leaf under ``obj``: dict keys (in sorted order of their text) and
    list indices joined by ``/``; tensors and plain values are leaves."""
    if isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from _leaves(obj[key], f"{path}/{key}" if path else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _leaves(value, f"{path}/{i}")
    else:
        yield path, obj


def _tensor_crc(t: torch.Tensor) -> int:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return zlib.crc32(data)


def _describe(t: torch.Tensor) -> str:
    return f"tensor {str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def digest(state: dict[str, Any]) -> dict[str, Any]:
    """The digests of ``state`` (its ``header`` and ``digest`` keys left out): ``tensors``, path
    -> CRC-32 of the tensor's bytes; ``metadata``, the CRC-32 of every other leaf's path, type
    and value and every tensor's path, dtype and shape, one line each."""
    tensors: dict[str, int] = {}
    lines = []
    for path, value in _leaves({k: v for k, v in state.items() if k not in _RESERVED}, ""):
        if isinstance(value, torch.Tensor):
            tensors[path] = _tensor_crc(value)
            lines.append(f"{path}: {_describe(value)}")
        else:
            lines.append(f"{path}: {type(value).__name__} {value!r}")
    return {"algorithm": "crc32", "tensors": tensors, "metadata": zlib.crc32("\n".join(lines).encode())}


def sealed(state: dict[str, Any], file_bytes: int = 0) -> dict[str, Any]:
    """``state`` with its header first and its digests last (the dict written to disk)."""
    body = {k: v for k, v in state.items() if k not in _RESERVED}
    return {"header": _header(file_bytes), **body, "digest": digest(body)}


# ---------------------------------------------------------------- checks a digest cannot make

def check_contents(state: dict[str, Any], path: str | Path) -> None:
    """Every floating tensor finite, and the model's weights shaped as the architecture in
    ``state["model_config"]`` asks; else
    CheckpointError naming ``path`` and the tensor."""
    for name, value in _leaves({k: v for k, v in state.items() if k not in _RESERVED}, ""):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: tensor {name} holds NaN/inf values")
    expected = _architecture_shapes(state, path)
    model = state["model"]
    for name, shape in expected.items():
        if name not in model:
            raise CheckpointError(f"{path}: tensor model/{name} is missing (the architecture recorded in the file "
                                  f"has it, shape {list(shape)})")
        if tuple(model[name].shape) != shape:
            raise CheckpointError(f"{path}: tensor model/{name} has shape {list(model[name].shape)}, the "
                                  f"architecture recorded in the file gives {list(shape)}")


def _architecture_shapes(state: dict[str, Any], path: str | Path) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of the FP32 model ``state`` records (its weights and biases; the
    QAT buffers are checked by ``load_state_dict``), from a model built on the meta device:
    no memory, no draw from the random generators training uses."""
    from ..model import DLRM, ModelConfig
    from ..model.dlrm import EmbeddingTables

    try:
        config = ModelConfig(**state["model_config"])
        with torch.device("meta"):
            tables = EmbeddingTables(torch.empty(sum(config.cardinalities), config.embedding_dim),
                                     config.cardinalities)
            model = DLRM(config, embeddings=tables)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: the architecture it records cannot be built ({type(e).__name__}: {e})") \
            from None
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


# ---------------------------------------------------------------- writing

def write_checkpoint(path: str | Path, state: dict[str, Any], previous: str | Path | None = None) -> Path:
    """Write ``state`` (a dict with ``model`` and ``model_config``) to ``path`` whole or not at
    all, with header and digests, then read it back and verify it before it takes the name;
    the file it replaces is then renamed ``previous`` (when given).  ``state``'s tensors must
    be finite (CheckpointError otherwise: ``path`` is left as it was)."""
    path = Path(path)

    def keep_previous() -> None:
        if previous is not None and path.exists():
            os.replace(path, previous)

    check_contents(state, path)
    needed = sum(v.numel() * v.element_size() for _, v in _leaves(state, "") if isinstance(v, torch.Tensor))

    def write(f) -> None:
        # the file's length is known only once written; the header's value has a fixed width, so a
        # second pass (rare: when the length changed since the guess) gives the same length
        guess = path.stat().st_size if path.exists() else 0
        for _ in range(2):
            f.seek(0)
            f.truncate()
            torch.save(sealed(state, guess), f)
            if f.tell() == guess:
                break
            guess = f.tell()
        f.flush()
        verify_written(f.name, guess)

    write_atomic(path, write, needed + 1_000_000, before_replace=keep_previous)
    return path


def verify_written(tmp: str | Path, file_bytes: int) -> None:
    """Read a just-written file back: a write the disk or file system lost is caught before
    the file replaces the previous checkpoint."""
    if os.path.getsize(tmp) != file_bytes:
        raise CheckpointError(f"{tmp}: written with {os.path.getsize(tmp)} bytes, {file_bytes} expected")
    read_checkpoint(tmp)


# ---------------------------------------------------------------- reading

def read_checkpoint(path: str | Path, note=None) -> dict[str, Any]:
    """The verified contents of checkpoint ``path`` (header and digest keys removed), else
    CheckpointError naming the file and what is wrong.  ``note(text)`` (stderr by default)
    hears the one line said for a checkpoint written before digests existed."""
    path = Path(path)
    size = os.path.getsize(path)  # FileNotFoundError / PermissionError name the path themselves
    if size == 0:
        raise CheckpointError(f"{path}: empty (0 bytes): not a checkpoint")
    with open(path, "rb") as f:
        start = f.read(_HEADER_SEARCH_BYTES)
    found = _HEADER.search(start)
    expected = int(found.group(1)) if found else None
    if expected and size < expected:
        raise CheckpointError(f"{path}: truncated ({size} of {expected} bytes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a damaged file
        if found is None and not start.startswith(_ZIP_MAGIC):
            raise CheckpointError(f"{path}: not a checkpoint (no dqrm-train header)") from None
        if expected and size > expected:
            raise CheckpointError(f"{path}: damaged: {size} bytes, its header says {expected}") from None
        raise CheckpointError(f"{path}: damaged: cannot be read as a checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise CheckpointError(f"{path}: not a checkpoint (no dqrm-train header)")
    if "header" not in state:
        (note or _note)(f"note: {path} was written before checkpoints carried digests: loaded without "
                        "verifying its bytes")
    else:
        _verify_digests(state, path)
    state = {k: v for k, v in state.items() if k not in _RESERVED}
    check_contents(state, path)
    return state


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _verify_digests(state: dict[str, Any], path: Path) -> None:
    header = state["header"]
    if not isinstance(header, str) or not header.startswith(FORMAT):
        raise CheckpointError(f"{path}: not a checkpoint this version reads (header {header!r}, "
                              f"{FORMAT!r} expected)")
    saved, now = state.get("digest"), digest(state)
    if not isinstance(saved, dict) or not isinstance(saved.get("tensors"), dict):
        raise CheckpointError(f"{path}: damaged: its digests are missing")
    for name, crc in saved["tensors"].items():
        if name not in now["tensors"]:
            raise CheckpointError(f"{path}: damaged: tensor {name} is missing")
        if now["tensors"][name] != crc:
            raise CheckpointError(f"{path}: damaged: tensor {name} does not match its CRC-32 (its bytes changed "
                                  "after it was written)")
    extra = sorted(set(now["tensors"]) - set(saved["tensors"]))
    if extra:
        raise CheckpointError(f"{path}: damaged: tensor {extra[0]} has no digest")
    if now["metadata"] != saved.get("metadata"):
        raise CheckpointError(f"{path}: damaged: its metadata (step, configurations, tensor shapes) does not "
                              "match its CRC-32")
