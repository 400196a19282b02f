#!/usr/bin/env bash
# `make demo`: the main job on a small built-in dataset.
#   1. a synthetic Criteo-format raw file from a planted click model (dqrm-prep synth)
#   2. raw -> HDF5 shards (dqrm-prep criteo), resumed or skipped when already done
#   3. data-parallel INT4 quantization-aware training on NP ranks with horovodrun, gradients
#      exchanged compressed (sparse embedding rows + INT8 values, INT8 MLP with error feedback)
#   4. test accuracy, ROC AUC, log loss, samples/s and measured communication per step
#   5. the packed INT4 model (dqrm-export) evaluated from the file itself (dqrm-eval)
# Environment: NP (ranks, default 2), ROWS (default 300000), OUT (default demo_out).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
NP="${NP:-2}"
ROWS="${ROWS:-300000}"
OUT="${OUT:-$ROOT/demo_out}"
RAW="$OUT/raw/train.txt"
DATA="$OUT/data"
RUN="$OUT/run-int4-np$NP"
MODEL="$OUT/model-int4.dqrm"

mkdir -p "$OUT/raw"
if [ ! -f "$RAW" ]; then
  echo "== 1/4 synthetic Criteo-format file: $ROWS rows -> $RAW"
  dqrm-prep synth "$RAW" --rows "$ROWS" --seed 1
fi
echo "== 2/4 dqrm-prep criteo $RAW -> $DATA"
dqrm-prep criteo "$RAW" "$DATA" --workers 2
dqrm-prep inspect "$DATA"

echo "== 3/4 horovodrun -np $NP dqrm-train: kaggle architecture, INT4 QAT, INT8 gradient exchange"
rm -rf "$RUN"
horovodrun -np "$NP" -H "localhost:$NP" \
  dqrm-train --data "$DATA" --out "$RUN" --preset kaggle --batch-size 256 --lr 0.1 --epochs 1 --eval-every 500 \
    --emb-bits 4 --mlp-bits 4 --mlp-scale channel --scale-period 200 \
    --emb-compress int8 --mlp-compress int8 --error-feedback mlp
echo "== run directory: $RUN (config.json, metrics.jsonl, summary.json, checkpoint.pt)"

echo "== 4/4 packed INT4 model: dqrm-export, then dqrm-eval from the packed file"
dqrm-export "$RUN/checkpoint.pt" "$MODEL"
dqrm-eval "$MODEL" --data "$DATA" --split test
