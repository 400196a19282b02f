#!/usr/bin/env bash
# `make demo`: the main job on a small built-in dataset.
#   1. a synthetic Criteo-format raw file from a planted click model (dqrm-prep synth)
#   2. raw -> HDF5 shards (dqrm-prep criteo), resumed or skipped when already done
#   3. data-parallel training on NP ranks with horovodrun
#   4. test accuracy, ROC AUC, log loss, samples/s and communication per step
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
RUN="$OUT/run-np$NP"

mkdir -p "$OUT/raw"
if [ ! -f "$RAW" ]; then
  echo "== 1/3 synthetic Criteo-format file: $ROWS rows -> $RAW"
  dqrm-prep synth "$RAW" --rows "$ROWS" --seed 1
fi
echo "== 2/3 dqrm-prep criteo $RAW -> $DATA"
dqrm-prep criteo "$RAW" "$DATA" --workers 2
dqrm-prep inspect "$DATA"

echo "== 3/3 horovodrun -np $NP dqrm-train (kaggle architecture)"
rm -rf "$RUN"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" horovodrun -np "$NP" -H "localhost:$NP" \
  dqrm-train --data "$DATA" --out "$RUN" --preset kaggle --batch-size 256 --lr 0.1 --epochs 1 --eval-every 400
echo "== run directory: $RUN (config.json, metrics.jsonl, summary.json, checkpoint.pt)"
