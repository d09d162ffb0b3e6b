#!/usr/bin/env bash
# Data-parallel LoRA finetuning with MindSpore's own launcher (msrun): N workers on this machine,
# collectives over loopback on the CPU (mccl), HCCL on Ascend. Gradients are averaged across workers and
# each worker reads its own shard of the dataset; set use_parallel: True in the yaml (or not: several
# workers switch data parallel on by themselves).
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
here=$(cd "$(dirname "$0")" && pwd)
python_bin=$(dirname "$(command -v python)")
# msrun starts the `python` found on PATH for every worker: make it this environment's.
export PATH="$python_bin:$PATH"
exec msrun --worker_num="$workers" --local_worker_num="$workers" --master_addr=127.0.0.1 \
    --master_port="${MASTER_PORT:-8118}" --log_dir="${LOG_DIR:-./output/msrun_log}" --join=True \
    "$here/visualglm/run_visualglm_finetune.py" "$@"
