"""The compression options of dqrm-train: validation (in-process, no ranks)."""
from __future__ import annotations

from click.testing import CliRunner

from dqrm_mpi.cli.compression_options import pop_compression_config
from dqrm_mpi.cli.train import main


def test_unknown_compressor_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(main, ["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--emb-compress", "int3"])
    assert r.exit_code == 2 and "int3" in r.output


def test_options_build_the_config():
    options = {"emb_compress": "int4", "mlp_compress": "int8", "error_feedback": "both", "collective": "two-phase",
               "emb_grad_scale": "row", "mlp_grad_scale": "tensor", "emb_exchange": "sparse", "epochs": 1}
    cfg = pop_compression_config(options)
    assert options == {"epochs": 1}
    assert (cfg.emb, cfg.mlp, cfg.error_feedback, cfg.collective, cfg.emb_scale, cfg.mlp_scale, cfg.emb_exchange) == \
        ("int4", "int8", "both", "two-phase", "row", "tensor", "sparse")


def test_sparse_mlp_specs_are_validated_naming_the_option(tmp_path):
    base = ["--data", str(tmp_path), "--out", str(tmp_path / "o")]
    for bad in ("topk:2", "topk:0.01+int3", "threshold:", "topk0.01"):
        r = CliRunner().invoke(main, [*base, "--mlp-compress", bad])
        assert r.exit_code == 2 and "--mlp-compress" in r.output and "topk:RATIO[+VALUES]" in r.output, bad
    r = CliRunner().invoke(main, [*base, "--emb-compress", "int8", "--emb-exchange", "dense"])
    assert r.exit_code == 2 and "--emb-compress" in r.output and "none or fp16" in r.output
    options = {"emb_compress": "none", "mlp_compress": "topk:0.01+int8", "error_feedback": "mlp",
               "collective": "auto", "emb_grad_scale": "table", "mlp_grad_scale": "channel", "emb_exchange": "dense"}
    cfg = pop_compression_config(options)
    assert (cfg.mlp, cfg.emb_exchange) == ("topk:0.01+int8", "dense")
