"""Serving: the input map dqrm-prep keeps and dqrm-export ships, dqrm-predict on raw rows
(equal to dqrm-eval on the prepared test split), bad input, and the TorchScript /
torch.export files run by a Python that cannot import dqrm_mpi."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from data_prep.criteo_format import parse_block
from data_prep.input_map import INPUT_MAP_FILE, InputMap, load_input_map, read_input_map_file
from data_prep.options import PrepOptions
from data_prep.pipeline import run_prep
from data_prep.sources import kaggle_bounds
from data_prep.verify import verify_dataset
from dqrm_mpi import kernels
from dqrm_mpi.cli.evaluate import main as eval_main
from dqrm_mpi.cli.export import main as export_main
from dqrm_mpi.cli.predict import main as predict_main
from dqrm_mpi.data.schema import SPLITS, read_meta
from dqrm_mpi.model import DLRM
from dqrm_mpi.model.config import model_config_from_preset
from dqrm_mpi.quant import QuantConfig, prepare_qat
from dqrm_mpi.quant.packed import load_packed_with_map, packed_size
from dqrm_mpi.train.checkpoint_file import read_checkpoint, write_checkpoint

DATA = Path(__file__).resolve().parents[1] / "data"
KAGGLE = DATA / "criteo_kaggle_train_head1999.tsv"
TERABYTE = DATA / "criteo_terabyte_format_1000.tsv"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data_prep"))
from prep_testlib import load_all  # noqa: E402

QUANT = QuantConfig(emb_bits=4, mlp_bits=4)


def _prep(raw: Path, out: Path, **options) -> Path:
    run_prep(raw, out, PrepOptions(workers=1, progress=False, **options), log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory) -> tuple[Path, Path]:
    """(the raw file, the dataset dqrm-prep made of it)."""
    root = tmp_path_factory.mktemp("kaggle")
    raw = root / "train.txt"
    shutil.copy(KAGGLE, raw)
    return raw, _prep(raw, root / "ds")


@pytest.fixture(scope="module")
def checkpoint(kaggle, tmp_path_factory) -> Path:
    """A QAT INT4 checkpoint of a tiny DLRM on the Kaggle rows (a few SGD steps), its dataset recorded."""
    _, ds = kaggle
    torch.manual_seed(0)
    config = model_config_from_preset("tiny", read_meta(ds).cardinalities)
    model = DLRM(config)
    qat = prepare_qat(model, QUANT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cards = torch.tensor(config.cardinalities)
    for step in range(3):
        qat.on_step(step)
        opt.zero_grad()
        logits = model(torch.rand(64, 13), (torch.rand(64, 26) * cards).long())
        torch.nn.functional.binary_cross_entropy_with_logits(logits, (torch.rand(64) < 0.25).float()).backward()
        opt.step()
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    write_checkpoint(path, {"model": model.state_dict(), "model_config": config.to_dict(),
                            "train_config": {"quant": QUANT.to_dict(), "data": str(ds)}, "step": 3, "epoch": 0})
    return path


@pytest.fixture(scope="module")
def packed(checkpoint, kaggle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "int4.dqrm"
    _ok(export_main, [str(checkpoint), str(out), "--data", str(kaggle[1])])
    return out


def _ok(cli, args: list[str], **kw) -> str:
    r = CliRunner().invoke(cli, args, catch_exceptions=False, **kw)
    assert r.exit_code == 0, r.output
    return r.output


def _fails(cli, args: list[str]) -> str:
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and "Error:" in r.output, r.output
    return r.output


def _mapped_rows(raw: Path, imap: InputMap) -> np.ndarray:
    """Every line of ``raw`` through prep's parser and the input map, as rows [label, dense..., ids...]."""
    pb = parse_block(raw.read_bytes(), str(raw), 0, imap.max_ind_range)
    ids, _ = imap.ids(pb.cat_dict, pb.cat_idx)
    return _rows(pb.label, pb.dense, ids)


def _rows(label, dense, ids) -> np.ndarray:
    rows = np.concatenate([label.astype(np.float64)[:, None], dense.astype(np.float64), ids.astype(np.float64)], 1)
    return rows[np.lexsort(rows.T[::-1])]


@pytest.mark.parametrize("raw, options", [(KAGGLE, {}), (TERABYTE, {"max_ind_range": 5000, "freq_threshold": 2})],
                         ids=["kaggle-reference", "terabyte-hash-threshold"])
def test_input_map_gives_prep_ids_for_every_row(raw, options, tmp_path):
    shutil.copy(raw, tmp_path / "train.txt")
    ds = _prep(tmp_path / "train.txt", tmp_path / "ds", **options)
    imap = load_input_map(ds)
    assert imap.cardinalities == read_meta(ds).cardinalities
    assert (imap.max_ind_range, imap.freq_threshold) == (options.get("max_ind_range"), options.get("freq_threshold", 0))
    splits = load_all(ds)
    prepped = _rows(*(np.concatenate([splits[s][k] for s in SPLITS]) for k in ("label", "dense", "sparse")))
    np.testing.assert_array_equal(_mapped_rows(tmp_path / "train.txt", imap), prepped)
    assert json.loads((ds / "meta.json").read_text())["extra"]["input_map"]["sha256"] == imap.digest
    assert (ds / INPUT_MAP_FILE).read_bytes() == imap.to_bytes()  # the same bytes for the same map


@pytest.mark.parametrize("threshold", [0, 2])
def test_unseen_values_get_the_oov_id(threshold, tmp_path):
    line = KAGGLE.read_bytes().split(b"\n")[0].rstrip(b"\r").split(b"\t")
    values = [int(line[14 + j] or b"0", 16) for j in range(26)]
    imap = InputMap(None, threshold, tuple(np.unique(np.array([3, 7, v], np.uint32)) for v in values))
    line[14] = b"0badf00d"  # C1: in no vocabulary
    pb = parse_block(b"\t".join(line) + b"\n", "new.tsv", 0)
    ids, unseen = imap.ids(pb.cat_dict, pb.cat_idx)
    assert ids[0, 0] == 0 and unseen.tolist() == [1] + [0] * 25
    ranks = [int(np.searchsorted(v, x)) + (threshold > 0) for v, x in zip(imap.vocabs[1:], values[1:])]
    assert ids[0, 1:].tolist() == ranks  # a seen value: its rank in the vocabulary (+1 with T >= 1)


def test_changed_vocabulary_is_refused_with_its_digest(kaggle, checkpoint, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(kaggle[1], ds)
    imap = read_input_map_file(ds / INPUT_MAP_FILE)
    vocabs = list(imap.vocabs)
    vocabs[4] = vocabs[4].copy()
    vocabs[4][-1] += 1  # one value of C5 changed: ids of the shards no longer match it
    changed = InputMap(imap.max_ind_range, imap.freq_threshold, tuple(vocabs))
    (ds / INPUT_MAP_FILE).write_bytes(changed.to_bytes())
    out = _fails(export_main, [str(checkpoint), str(tmp_path / "m.dqrm"), "--data", str(ds)])
    assert changed.digest[:16] in out and imap.digest[:16] in out and INPUT_MAP_FILE in out
    assert not (tmp_path / "m.dqrm").exists()
    problems = verify_dataset(ds)
    assert len(problems) == 1 and changed.digest[:16] in problems[0]


def test_export_ships_the_map_of_the_checkpoints_dataset(packed, checkpoint, kaggle, tmp_path):
    info = json.loads(_ok(export_main, [str(checkpoint), str(tmp_path / "m.dqrm")]))  # no --data: the recorded one
    assert info["input_map"] == load_input_map(kaggle[1]).digest[:16]
    assert (tmp_path / "m.dqrm").read_bytes() == packed.read_bytes()
    model, _ = load_packed_with_map(packed)  # sizes: the model's without the map, as dqrm-eval reports it
    assert info["bytes"] == packed_size(model.config, QUANT) < info["file_bytes"] == packed.stat().st_size
    evaluated = json.loads(_ok(eval_main, [str(packed), "--data", str(kaggle[1])]))
    assert evaluated["model_bytes"] == info["bytes"]
    _, parts = load_packed_with_map(packed)
    assert InputMap.from_parts(parts, str(packed)).digest == load_input_map(kaggle[1]).digest


def _test_lines(raw: Path) -> list[bytes]:
    lines = raw.read_bytes().split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    a, b = kaggle_bounds(len(lines))
    return lines[a:b]


def test_predict_on_the_raw_test_day_equals_eval_on_the_prepared_split(packed, kaggle, tmp_path):
    raw, ds = kaggle
    _ok(eval_main, [str(packed), "--data", str(ds), "--predictions", str(tmp_path / "eval.npy"), "--batch-size", "64"])
    expected = np.load(tmp_path / "eval.npy")
    lines = _test_lines(raw)
    (tmp_path / "test.tsv").write_bytes(b"\n".join(lines) + b"\n")
    report = json.loads(_ok(predict_main, [str(packed), str(tmp_path / "test.tsv"), "--out", str(tmp_path / "p.npy"),
                                           "--batch-size", "64", "--no-progress"]))
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), expected)
    evaluated = json.loads(_ok(eval_main, [str(packed), "--data", str(ds), "--batch-size", "64"]))
    assert report["rows"] == len(expected) and report["auc"] == evaluated["auc"]
    assert report["log_loss"] == evaluated["log_loss"]
    _ok(predict_main, [str(packed), str(tmp_path / "test.tsv"), "--out", str(tmp_path / "q.npy"), "--mlp",
                       "int8-dynamic", "--no-progress"])
    int8 = np.load(tmp_path / "q.npy")  # torch's INT8 dynamic linear layers: close, not the same
    assert not np.array_equal(int8, expected) and np.abs(int8 - expected).max() < 0.02
    # without the label column, gzip, from standard input, as text: the same scores
    unlabeled = b"\n".join(line.split(b"\t", 1)[1] for line in lines) + b"\n"
    with gzip.open(tmp_path / "test.gz", "wb") as f:
        f.write(unlabeled)
    proc = subprocess.run([sys.executable, "-c", "from dqrm_mpi.cli.predict import main; main()", str(packed), "-",
                           "--out", str(tmp_path / "p.txt"), "--batch-size", "64"],
                          input=(tmp_path / "test.gz").read_bytes(), capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "auc" not in json.loads(proc.stdout) and b"143 rows" in proc.stderr  # the progress line's last state
    np.testing.assert_array_equal(np.loadtxt(tmp_path / "p.txt", dtype=np.float32), expected.astype(np.float32))


@pytest.mark.parametrize("case", ["truncated gzip", "wrong field count", "empty file", "bad field, no label"])
def test_bad_input_is_named_and_nothing_is_written(case, packed, kaggle, tmp_path):
    lines = _test_lines(kaggle[0])
    raw = tmp_path / "in.tsv"
    if case == "truncated gzip":
        raw = tmp_path / "in.gz"
        raw.write_bytes(gzip.compress(b"\n".join(lines * 40) + b"\n")[:20_000])
        expected = f"{raw}: truncated or corrupt gzip file after line "
    elif case == "wrong field count":
        lines[6] = lines[6].rsplit(b"\t", 1)[0]
        raw.write_bytes(b"\n".join(lines) + b"\n")
        expected = f"{raw}:7: expected 40 tab-separated fields, got 39 fields"
    elif case == "empty file":
        raw.write_bytes(b"")
        expected = f"{raw}: input file is empty"
    else:
        lines = [line.split(b"\t", 1)[1] for line in lines]
        lines[2] = lines[2].replace(b"\t", b"\txyz\t", 1)[:-1].rsplit(b"\t", 1)[0]  # I2 = xyz, still 39 fields
        raw.write_bytes(b"\n".join(lines) + b"\n")
        expected = f"{raw}:3: field I2 (column 2 of 39): expected an integer"
    out = tmp_path / "out" / "scores.txt"
    out.parent.mkdir()
    text = _fails(predict_main, [str(packed), str(raw), "--out", str(out), "--no-progress"])
    assert expected in text.replace("\n", " ")
    assert os.listdir(out.parent) == []


def test_predict_needs_a_model_with_its_input_map(checkpoint, kaggle, tmp_path):
    bare = tmp_path / "bare" / "checkpoint.pt"  # recorded dataset gone: exported without a map
    bare.parent.mkdir()
    ck = read_checkpoint(checkpoint)
    ck["train_config"]["data"] = str(tmp_path / "gone")
    write_checkpoint(bare, {k: v for k, v in ck.items() if k not in ("header", "digest")})
    _ok(export_main, [str(bare), str(tmp_path / "bare.dqrm")])
    out = _fails(predict_main, [str(tmp_path / "bare.dqrm"), str(KAGGLE), "--out", str(tmp_path / "s.txt")])
    assert "has no input map" in out and "--data" in out and not (tmp_path / "s.txt").exists()


CLEAN = """
import sys
sys.path.append(sys.argv[1])  # torch's site-packages, without its .pth files (dqrm_mpi's editable install)
try:
    import dqrm_mpi
except ImportError:
    pass
else:
    raise SystemExit("dqrm_mpi is importable here")
import numpy as np, torch
dense, ids = torch.from_numpy(np.load(sys.argv[2])), torch.from_numpy(np.load(sys.argv[3]))
a = torch.jit.load(sys.argv[4])(dense, ids)
b = torch.export.load(sys.argv[5]).module()(dense, ids)
np.save(sys.argv[6], np.stack([a.numpy(), b.numpy()]))
"""


def test_exported_modules_run_in_a_python_without_dqrm_mpi(checkpoint, packed, kaggle, tmp_path):
    for fmt, name in (("torchscript", "m.pt"), ("export", "m.pt2")):
        _ok(export_main, [str(checkpoint), str(tmp_path / name), "--format", fmt])
    model, _ = load_packed_with_map(packed)
    cards = torch.tensor(model.config.cardinalities)
    torch.manual_seed(1)
    dense, ids = torch.rand(37, 13) * 3, (torch.rand(37, 26) * cards).long()  # a batch size not traced with
    np.save(tmp_path / "dense.npy", dense.numpy())
    np.save(tmp_path / "ids.npy", ids.numpy())
    with torch.no_grad():
        want = torch.sigmoid(model(dense, ids)).numpy()
        with kernels.disabled():
            assert np.array_equal(torch.sigmoid(model(dense, ids)).numpy(), want)
    site = str(Path(torch.__file__).resolve().parents[1])
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "serve.py").write_text(CLEAN)
    proc = subprocess.run([sys.executable, "-I", "-S", "serve.py", site, *(str(tmp_path / n) for n in (
        "dense.npy", "ids.npy", "m.pt", "m.pt2", "got.npy"))], cwd=clean, env={"PATH": os.environ["PATH"]},
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = np.load(tmp_path / "got.npy")
    np.testing.assert_array_equal(got[0], want)
    np.testing.assert_array_equal(got[1], want)
    import zipfile
    with zipfile.ZipFile(tmp_path / "m.pt") as z:  # the input map rides along
        assert any(n.endswith("extra/" + "input_map.npz") for n in z.namelist())


def test_a_loaded_packed_model_holds_its_tables_packed(packed):
    """No FP32 copy of a table: the model's tensors take about the file's bytes (the MLP
    dequantized to FP32 is the only growth) and its tables are the file's packed bytes."""
    model, parts = load_packed_with_map(packed)
    d = model.config.embedding_dim
    tensors = list(model.parameters()) + list(model.buffers())
    assert not any(t.dtype == torch.float32 and t.dim() == 2 and t.shape[1] == d and t.shape[0] == n
                   for t in tensors for n in model.config.cardinalities if n > d)
    table_bytes = sum(t.nbytes for name, t in model.named_buffers() if name.startswith("embeddings.q_"))
    assert table_bytes == sum(n * ((d * QUANT.emb_bits + 7) // 8) for n in model.config.cardinalities)
    mlp_fp32 = sum(p.nbytes for p in model.parameters())
    held = sum(t.nbytes for t in tensors) + sum(v.nbytes for v in parts.vocabs)
    assert held <= packed.stat().st_size + mlp_fp32


@pytest.mark.parametrize("quant", [QuantConfig(emb_bits=8, emb_scale="row", mlp_bits=8, mlp_scale="tensor", act_bits=8),
                                   QuantConfig()], ids=["int8-rowwise-act8", "fp32"])
def test_exported_modules_of_other_modes_score_as_the_packed_model(quant, kaggle, tmp_path):
    from dqrm_mpi.quant.packed import export_packed, load_packed
    from dqrm_mpi.quant.serving import export_serving

    torch.manual_seed(0)
    model = DLRM(model_config_from_preset("tiny", read_meta(kaggle[1]).cardinalities))
    qat = prepare_qat(model, quant) if quant.enabled else None
    for step in range(2):  # activation scales observed
        if qat is not None:
            qat.on_step(step)
        model(torch.rand(64, 13), torch.zeros(64, 26, dtype=torch.long))
    export_packed(model, quant, tmp_path / "m.dqrm")
    packed = load_packed(tmp_path / "m.dqrm")
    dense = torch.rand(11, 13) * 3
    ids = (torch.rand(11, 26) * torch.tensor(packed.config.cardinalities)).long()
    with torch.no_grad():
        want = torch.sigmoid(packed(dense, ids))
    export_serving(packed, tmp_path / "m.pt", "torchscript")
    export_serving(load_packed(tmp_path / "m.dqrm"), tmp_path / "m.pt2", "export")
    assert torch.equal(torch.jit.load(str(tmp_path / "m.pt"))(dense, ids), want)
    assert torch.equal(torch.export.load(str(tmp_path / "m.pt2")).module()(dense, ids), want)
