#!/usr/bin/env bash
# dqrm-train under horovodrun.  Everything after the script name goes to dqrm-train.
#
#   NP=2 launch/train_horovodrun.sh --data data/kaggle --out runs/a                 # this machine
#   NP=8 HOSTS=node1:4,node2:4 launch/train_horovodrun.sh --data /shared/kaggle \
#        --out /shared/runs/int8 --batch-size 512 --emb-compress int8 --mlp-compress int8
#   HOSTFILE=hosts.txt NP=8 launch/train_horovodrun.sh ...     # lines "node1 slots=4"
#
# Multi-host: passwordless ssh between the hosts, the same repository path and venv on
# each (or a shared file system), data and --out on a shared file system.
# HOROVODRUN_ARGS adds options such as "--gloo" or "--network-interface eth0".
#
# Stopping the job: signal this script's process group (Ctrl-C, or kill -TERM -- -PGID):
# mpirun is in it and passes SIGTERM to every rank.  A signal to this script's pid alone also
# ends the job: horovodrun (which this script becomes) replaces itself with `sh -c mpirun ...`,
# so the signal ends that shell only, but every rank watches its launcher processes and sends
# itself SIGTERM within about a second when one is gone (dqrm_mpi/train/launcher_watch.py).
# A rank stopped or hung for --stall-timeout seconds (default 600) ends the job with code 124.
set -euo pipefail
source "$(dirname "$0")/common.sh"
NP="${NP:-2}"
if [ -n "${HOSTFILE:-}" ]; then hosts=(-hostfile "$HOSTFILE"); else hosts=(-H "${HOSTS:-localhost:$NP}"); fi
# shellcheck disable=SC2086
exec horovodrun -np "$NP" "${hosts[@]}" ${HOROVODRUN_ARGS:-} dqrm-train "$@"
