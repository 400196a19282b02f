# Sourced by the launch recipes: the environment every rank shares.
# - the project's venv first on PATH (DQRM_VENV, default <repo>/.venv)
# - OMP_NUM_THREADS is left as the user set it (unset: the trainer picks threads per rank)
# - PYTHONUNBUFFERED=1: rank output reaches a job's output file line by line, in order
# - Open MPI refuses root unless told (horovodrun has no flag for it)
# - srun (SLURM >= 22.05) no longer inherits --cpus-per-task: SRUN_CPUS_PER_TASK carries it
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DQRM_VENV="${DQRM_VENV:-$_repo/.venv}"
if [ -d "$DQRM_VENV/bin" ]; then export PATH="$DQRM_VENV/bin:$PATH"; fi
export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK="${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}"; fi
# Horovod: fuse small tensors (MLP gradients) into few messages; cycle time in ms.
export HOROVOD_FUSION_THRESHOLD="${HOROVOD_FUSION_THRESHOLD:-67108864}"
export HOROVOD_CYCLE_TIME="${HOROVOD_CYCLE_TIME:-1}"

# slurm_allocation: sets HOSTS ("node1:2,node2:2,node3:1") and NP (their sum) from
# SLURM_JOB_NODELIST and SLURM_TASKS_PER_NODE ("2(x2),1": tasks per node, run-length coded).
slurm_allocation() {
    local -a hosts counts=() parts
    local part n i
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    IFS=, read -ra parts <<<"$SLURM_TASKS_PER_NODE"
    for part in "${parts[@]}"; do
        if [[ "$part" =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
            for ((i = 0; i < BASH_REMATCH[2]; i++)); do counts+=("${BASH_REMATCH[1]}"); done
        elif [[ "$part" =~ ^[0-9]+$ ]]; then
            counts+=("$part")
        else
            echo "SLURM_TASKS_PER_NODE: cannot read '$part' in '$SLURM_TASKS_PER_NODE'" >&2; return 1
        fi
    done
    if [ "${#hosts[@]}" != "${#counts[@]}" ]; then
        echo "SLURM_TASKS_PER_NODE '$SLURM_TASKS_PER_NODE' counts ${#counts[@]} nodes," \
             "SLURM_JOB_NODELIST '$SLURM_JOB_NODELIST' ${#hosts[@]}" >&2
        return 1
    fi
    HOSTS="" NP=0
    for i in "${!hosts[@]}"; do
        HOSTS="${HOSTS:+$HOSTS,}${hosts[$i]}:${counts[$i]}"
        NP=$((NP + counts[i]))
    done
}

# mpirun_env_args: "-x NAME" for what every rank needs, as horovodrun forwards it: PATH (the
# venv), LD_LIBRARY_PATH and each set HOROVOD_*, OMP_*, PYTHON*, MKL_*, NCCL_*, DQRM_* variable.
# Use: mapfile -t envx < <(mpirun_env_args); mpirun "${envx[@]}" ...
mpirun_env_args() {
    local name
    for name in PATH LD_LIBRARY_PATH $(compgen -e | grep -E '^(HOROVOD_|OMP_|PYTHON|MKL_|NCCL_|DQRM_)' || true); do
        printf -- '-x\n%s\n' "$name"
    done
}

# run_forwarding_usr1 CMD...: run CMD (a launcher) and pass SIGUSR1 on to it (mpirun and srun
# forward it to the ranks).  SLURM sends USR1 to the batch shell only (--signal=B:USR1@...),
# and a shell does not run a trap while it waits for a foreground command.  Returns CMD's
# exit code; USR1_RECEIVED=1 afterwards when the signal came.
run_forwarding_usr1() {
    USR1_RECEIVED=0
    "$@" &
    local pid=$! rc
    # shellcheck disable=SC2064
    trap "USR1_RECEIVED=1 _usr1_now=1; echo \"[\$(date -u +%FT%TZ)] SIGUSR1: passed on to the ranks\" >&2; kill -USR1 $pid 2>/dev/null || true" USR1
    while :; do
        _usr1_now=0
        wait "$pid" && rc=0 || rc=$?
        [ "$_usr1_now" = 1 ] || break   # else the trap cut the wait short: wait again
    done
    trap - USR1
    return "$rc"
}
