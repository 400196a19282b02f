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
               "emb_grad_scale": "row", "mlp_grad_scale": "tensor", "epochs": 1}
    cfg = pop_compression_config(options)
    assert options == {"epochs": 1}
    assert (cfg.emb, cfg.mlp, cfg.error_feedback, cfg.collective, cfg.emb_scale, cfg.mlp_scale) == \
        ("int4", "int8", "both", "two-phase", "row", "tensor")
