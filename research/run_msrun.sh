#!/usr/bin/env bash
# Data-parallel LoRA finetuning with MindSpore's own launcher (msrun): N workers on this machine,
# collectives over loopback on the CPU (mccl), HCCL on Ascend. Gradients are averaged across workers and
# each worker reads its own shard of the dataset; set use_parallel: True in the yaml (or not: several
# workers switch data parallel on by themselves). The one-node case of run_multinode.sh (same checks,
# same report of a lost worker).
#
# Usage: bash research/run_msrun.sh <WORKERS> [run_visualglm_finetune.py arguments ...]
#   e.g. bash research/run_msrun.sh 2 --config research/visualglm/run_visualglm_lora.yaml --batch_size 1
# Environment: MASTER_PORT (default 8118), LOG_DIR (default ./output/msrun_log).
set -euo pipefail
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
    echo "Usage: bash research/run_msrun.sh <WORKERS> [run_visualglm_finetune.py arguments ...]" >&2
    exit 2
fi
workers=$1
shift
exec bash "$(dirname "$0")/run_multinode.sh" "$workers" "$workers" 127.0.0.1 "${MASTER_PORT:-8118}" 0 \
    "${LOG_DIR:-./output/msrun_log}" -- "$@"
