#!/usr/bin/env bash
# dqrm-train under Open MPI's mpirun directly (Horovod's MPI controller; no horovodrun).
# Everything after the script name goes to dqrm-train.
#
#   NP=4 HOSTS=node1:2,node2:2 launch/train_mpirun.sh --data /shared/kaggle --out /shared/runs/a
#   salloc -N 2 --ntasks-per-node=2 -c 8 launch/train_mpirun.sh ...   # inside an allocation:
#                                                                      # hosts and NP from SLURM
# -bind-to none lets each rank use its threads' cores; -x passes PATH (the venv),
# LD_LIBRARY_PATH and the HOROVOD_*, OMP_*, PYTHON* variables to every rank.  Restrict the
# interfaces with MPIRUN_ARGS, e.g. "-mca btl_tcp_if_include eth0 -mca oob_tcp_if_include eth0".
set -euo pipefail
source "$(dirname "$0")/common.sh"
if [ -z "${HOSTS:-}" ] && [ -n "${SLURM_JOB_NODELIST:-}" ] && [ -n "${SLURM_TASKS_PER_NODE:-}" ]; then
    slurm_allocation                     # HOSTS and NP from the allocation
fi
NP="${NP:-2}"
mapfile -t envx < <(mpirun_env_args)
# shellcheck disable=SC2086
exec mpirun -np "$NP" -H "${HOSTS:-localhost:$NP}" -bind-to none -map-by slot "${envx[@]}" \
    ${MPIRUN_ARGS:-} dqrm-train "$@"
