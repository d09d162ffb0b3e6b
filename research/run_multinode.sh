#!/usr/bin/env bash
# Data-parallel LoRA finetuning across machines with MindSpore's own launcher (msrun), in the argument order of
# MindFormers' msrun_launcher.sh. Run it once on every node, with the same WORKER_NUM, MASTER_ADDR and
# MASTER_PORT and that node's NODE_RANK (0 on the master, which also runs msrun's scheduler). Collectives use
# HCCL on Ascend and mccl (TCP) on the CPU: the yaml's context.device_target (or --device_target) chooses.
#
# Usage: bash research/run_multinode.sh WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK [LOG_DIR] \
#            -- [run_visualglm_finetune.py arguments ...]
#   WORKER_NUM    workers in the whole job (ranks 0..WORKER_NUM-1); a multiple of LOCAL_WORKER
#   LOCAL_WORKER  workers on this node (every node runs the same number): its ranks are
#                 NODE_RANK*LOCAL_WORKER .. NODE_RANK*LOCAL_WORKER+LOCAL_WORKER-1, devices 0..LOCAL_WORKER-1
#   MASTER_ADDR   IPv4 address of node 0 (reachable from every node)
#   MASTER_PORT   TCP port of msrun's scheduler on node 0, 1024-65535
#   NODE_RANK     this node, 0..WORKER_NUM/LOCAL_WORKER-1
#   LOG_DIR       per-rank logs worker_<rank>.log, scheduler.log (node 0), msrun_node_<NODE_RANK>.log
#                 (default ./output/msrun_log)
# Environment: CLUSTER_TIME_OUT (default 600: seconds the nodes have to join), and MindSpore's own
# MS_NODE_TIMEOUT (seconds without a heartbeat before the scheduler declares a worker lost; see the README).
# Exit status: 0, or non-zero with one line on stderr naming the lost rank and its log.
set -uo pipefail

me=run_multinode.sh
usage() {
    echo "Usage: bash research/$me WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK [LOG_DIR]" \
         "-- [run_visualglm_finetune.py arguments ...]" >&2
}
die() {
    echo "$me: error: $*" >&2
    exit 2
}

positional=()
while [ $# -gt 0 ] && [ "$1" != "--" ] && [[ "$1" != -* ]]; do
    positional+=("$1")
    shift
done
[ "${1:-}" = "--" ] && shift
if [ ${#positional[@]} -lt 5 ] || [ ${#positional[@]} -gt 6 ]; then
    usage
    exit 2
fi
worker_num=${positional[0]}
local_worker=${positional[1]}
master_addr=${positional[2]}
master_port=${positional[3]}
node_rank=${positional[4]}
log_dir=${positional[5]:-./output/msrun_log}

count='^[1-9][0-9]{0,5}$'
[[ "$worker_num" =~ $count ]] || die "WORKER_NUM '$worker_num' must be a whole number >= 1"
[[ "$local_worker" =~ $count ]] || die "LOCAL_WORKER '$local_worker' must be a whole number >= 1"
[ "$local_worker" -le "$worker_num" ] \
    || die "LOCAL_WORKER ($local_worker) must not exceed WORKER_NUM ($worker_num)"
[ $((worker_num % local_worker)) -eq 0 ] \
    || die "WORKER_NUM ($worker_num) must be a multiple of LOCAL_WORKER ($local_worker): every node runs the same number of workers"
nodes=$((worker_num / local_worker))
octet='(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])'
[[ "$master_addr" =~ ^$octet\.$octet\.$octet\.$octet$ ]] \
    || die "MASTER_ADDR '$master_addr' must be an IPv4 address such as 192.168.1.10 (node 0's)"
[[ "$master_port" =~ ^[0-9]{1,5}$ ]] && [ "$((10#$master_port))" -ge 1024 ] && [ "$((10#$master_port))" -le 65535 ] \
    || die "MASTER_PORT '$master_port' must be a port number in 1024-65535"
[[ "$node_rank" =~ ^[0-9]{1,6}$ ]] && [ "$((10#$node_rank))" -lt "$nodes" ] \
    || die "NODE_RANK '$node_rank' must be 0..$((nodes - 1)) ($worker_num workers, $local_worker per node: $nodes nodes)"
master_port=$((10#$master_port))
node_rank=$((10#$node_rank))
[[ "${CLUSTER_TIME_OUT:-1}" =~ ^[1-9][0-9]*$ ]] \
    || die "CLUSTER_TIME_OUT '$CLUSTER_TIME_OUT' must be a whole number of seconds >= 1"
mkdir -p "$log_dir" 2>/dev/null && [ -w "$log_dir" ] || die "LOG_DIR '$log_dir' cannot be created or written"
log_dir=$(cd "$log_dir" && pwd)
command -v msrun >/dev/null || die "msrun not found on PATH (it comes with the mindspore package)"

here=$(cd "$(dirname "$0")" && pwd)
# msrun starts the `python` found on PATH for every worker: make it this environment's.
PATH="$(dirname "$(command -v python)"):$PATH"
export PATH
launcher_log="$log_dir/msrun_node_$node_rank.log"

# After a lost node msrun on node 0 waits for its scheduler, which lingers about MS_NODE_TIMEOUT seconds more
# in its own finalize once the workers are gone, and a worker of this node told of the loss may hang in its
# own finalize as well: once the scheduler has logged the loss and this node's workers had WORKER_GRACE seconds
# to end on their own, stop what is left of them and the scheduler, so that the job ends within seconds of
# the loss being detected. Processes are found by their MS_ROLE among this script's descendants.
WORKER_GRACE=10
descendants_with_role() {
    local pid
    for pid in $(ps -e -o pid=,ppid= | awk -v root=$$ '{parent[$1] = $2}
        END {for (p in parent) for (q = parent[p]; q > 1; q = parent[q]) if (q == root) {print p; break}}'); do
        # (2>/dev/null first: a process may end between ps and here)
        tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qx "MS_ROLE=$1" && echo "$pid"
    done
}
stop_lingering_scheduler() {
    local sched_log=$1 started=$2 lost_at=0
    while sleep 1; do
        [ -f "$sched_log" ] && [ "$(stat -c %Y "$sched_log")" -ge "$started" ] || continue   # not a stale log
        grep -q "is timed out" "$sched_log" || continue
        [ "$lost_at" -eq 0 ] && lost_at=$SECONDS
        [ -n "$(descendants_with_role MS_WORKER)" ] && [ $((SECONDS - lost_at)) -lt $WORKER_GRACE ] && continue
        local left pid
        left="$(descendants_with_role MS_WORKER) $(descendants_with_role MS_SCHED)"
        [ -z "${left// /}" ] && return 0
        kill -TERM $left 2>/dev/null
        for _ in 1 2 3 4 5; do
            sleep 1
            left=$(for pid in $left; do kill -0 "$pid" 2>/dev/null && echo "$pid"; done)
            [ -z "$left" ] && return 0
        done
        kill -KILL $left 2>/dev/null
        return 0
    done
}
watchdog=
if [ "$node_rank" -eq 0 ]; then
    stop_lingering_scheduler "$log_dir/scheduler.log" "$(date +%s)" &
    watchdog=$!
fi

interrupted=0
trap 'interrupted=1' INT TERM   # msrun stops the workers itself on Ctrl-C, then exits 0: report it as 130
# msrun's stdout (the workers' logs, tailed) stays on stdout; its own messages and traceback go to its log file.
msrun --worker_num="$worker_num" --local_worker_num="$local_worker" --master_addr="$master_addr" \
    --master_port="$master_port" --node_rank="$node_rank" --log_dir="$log_dir" --join=True \
    --cluster_time_out="${CLUSTER_TIME_OUT:-600}" \
    "$here/visualglm/run_visualglm_finetune.py" "$@" 2>"$launcher_log"
status=$?
[ -n "$watchdog" ] && kill "$watchdog" 2>/dev/null
if [ "$interrupted" -eq 1 ]; then
    echo "$me: interrupted; workers stopped (logs in $log_dir)" >&2
    exit 130
fi
[ "$status" -eq 0 ] && exit 0

# Which rank was lost. msrun names the first local worker that ended badly by pid; the worker printed its pid
# with its rank (finetune.init_distributed). A worker that the cluster stopped because another was lost carries
# MindSpore's marks of it in its log; the scheduler (node 0) names a worker whose heartbeat stopped.
stopped_by_cluster='Callback on exception is called|RunRingAllReduce.*failed|timed out node|AllReduceCPUKernelMod launch failed'
read -r pid code < <(sed -nE 's/.*Worker process ([0-9]+) exit with exception\. Error code: (-?[0-9]+).*/\1 \2/p' \
    "$launcher_log" | head -n 1)
if [ -n "${pid:-}" ]; then
    rank=$(grep -lE "^rank [0-9]+/[0-9]+: pid $pid\$" "$log_dir"/worker_*.log 2>/dev/null | head -n 1 \
        | sed -E 's/.*worker_([0-9]+)\.log$/\1/')
    how="exit code $code"
    [ "$code" -lt 0 ] && how="killed by signal $((-code))"
    if [ -z "$rank" ]; then
        echo "$me: error: a worker of this node (pid $pid, $how) stopped before joining the cluster; logs: $log_dir/worker_*.log" >&2
        exit "$status"
    fi
    if ! grep -qE "$stopped_by_cluster" "$log_dir/worker_$rank.log"; then
        echo "$me: error: lost rank $rank ($how) on this node; its log: $log_dir/worker_$rank.log" >&2
        exit "$status"
    fi
fi
lost=$(sed -nE 's/.*The node: ([0-9]+) is timed out.*/\1/p' "$log_dir/scheduler.log" 2>/dev/null | head -n 1)
if [ -n "$lost" ]; then
    echo "$me: error: lost rank $lost (its heartbeat stopped) on node $((lost / local_worker)); its log: $log_dir/worker_$lost.log on that node" >&2
elif [ "$node_rank" -ne 0 ]; then
    echo "$me: error: the cluster stopped this node's workers after a worker of another node was lost; node 0's launcher names it (its $log_dir/scheduler.log); logs here: $log_dir" >&2
else
    echo "$me: error: the job failed (msrun exit $status); see $launcher_log and $log_dir/worker_*.log" >&2
fi
exit "$status"
