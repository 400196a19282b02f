# Sourced by the launch recipes: environment shared by every rank.
# - the project's venv first on PATH (DQRM_VENV, default <repo>/.venv)
# - OMP_NUM_THREADS: SLURM_CPUS_PER_TASK under SLURM, else what the caller set, else 1 per rank
#   (ranks on one node share its cores; set it to cores / ranks-per-node for CPU training)
# - Open MPI refuses root unless told (horovodrun has no flag for it)
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DQRM_VENV="${DQRM_VENV:-$_repo/.venv}"
if [ -d "$DQRM_VENV/bin" ]; then export PATH="$DQRM_VENV/bin:$PATH"; fi
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export OMP_NUM_THREADS="$SLURM_CPUS_PER_TASK"; fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
# Horovod: fuse small tensors (MLP gradients) into few messages; cycle time in ms.
export HOROVOD_FUSION_THRESHOLD="${HOROVOD_FUSION_THRESHOLD:-67108864}"
export HOROVOD_CYCLE_TIME="${HOROVOD_CYCLE_TIME:-1}"

# slurm_hosts SLOTS: "host1:SLOTS,host2:SLOTS,..." from SLURM_JOB_NODELIST
slurm_hosts() {
    scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/:$1/" | paste -sd, -
}
