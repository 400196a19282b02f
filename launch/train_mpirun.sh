#!/usr/bin/env bash
# dqrm-train under Open MPI's mpirun directly (Horovod's MPI controller; no horovodrun).
#
#   NP=4 HOSTS=node1:2,node2:2 launch/train_mpirun.sh --data /shared/kaggle --out /shared/runs/a
#
# -bind-to none lets each rank use OMP_NUM_THREADS cores; -x exports the environment to
# remote ranks.  Restrict the interfaces with MPIRUN_ARGS, for example
# "-mca btl_tcp_if_include eth0 -mca oob_tcp_if_include eth0".
set -euo pipefail
source "$(dirname "$0")/common.sh"
NP="${NP:-2}"
# shellcheck disable=SC2086
exec mpirun -np "$NP" -H "${HOSTS:-localhost:$NP}" -bind-to none -map-by slot \
    -x PATH -x LD_LIBRARY_PATH -x OMP_NUM_THREADS -x HOROVOD_FUSION_THRESHOLD -x HOROVOD_CYCLE_TIME \
    ${MPIRUN_ARGS:-} dqrm-train "$@"
