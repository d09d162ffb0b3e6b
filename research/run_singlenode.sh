#!/bin/bash
# Launch one process per device on a single server (data-parallel training).
#
# Every process gets DEVICE_ID, RANK_ID, RANK_SIZE and RANK_TABLE_FILE in its
# environment; its output goes to ./output/log/rank_<RANK_ID>/mindformer.log.
# The processes run in the background; this script does not wait for them.

usage() {
    cat >&2 <<'EOF'
Usage: bash run_singlenode.sh "<EXECUTE_ORDER>" <RANK_TABLE_PATH> <DEVICE_RANGE> <RANK_SIZE>
  EXECUTE_ORDER    command to run on every device (quote it), e.g. "python run_visualglm_finetune.py --config_path cfg.yaml"
  RANK_TABLE_PATH  HCCL rank table json (e.g. made by mindformers/tools/hccl_tools.py)
  DEVICE_RANGE     "[START,END)" or "[START,END]": devices START..END-1; END is EXCLUSIVE in both forms;
                   0 <= START < END <= 8.
                   Quote it (e.g. "[0, 8]"), the shell treats ')' and unquoted brackets specially.
  RANK_SIZE        number of processes: must equal END-START and the rank table's device count
Example: bash run_singlenode.sh "python run_visualglm_finetune.py --config_path run_visualglm_lora.yaml" ./hccl_8p_01234567_10.0.0.1.json "[0,8)" 8
EOF
}

MAX_DEVICES=8   # NPUs on one Atlas 800 server

die() {
    echo "run_singlenode.sh: error: $*" >&2
    exit 1
}

# An unquoted "[0, 8]" is split by the shell into "[0," and "8]": join them back.
SPLIT_HEAD_RE='^\[[[:space:]]*[0-9]+[[:space:]]*,$'
SPLIT_TAIL_RE='^[[:space:]]*[0-9]+[[:space:]]*[])]$'
if [ $# -eq 5 ] && [[ "$3" =~ $SPLIT_HEAD_RE ]] && [[ "$4" =~ $SPLIT_TAIL_RE ]]; then
    set -- "$1" "$2" "$3$4" "$5"
fi

if [ $# -ne 4 ]; then
    usage
    exit 1
fi

EXECUTE_ORDER=$1
RANK_TABLE_PATH=$2
DEVICE_RANGE=$3
RANK_SIZE_ARG=$4

[ -n "${EXECUTE_ORDER//[[:space:]]/}" ] || die "EXECUTE_ORDER is empty"

[ -f "$RANK_TABLE_PATH" ] || die "rank table file not found: $RANK_TABLE_PATH"
RANK_TABLE_ABS="$(cd "$(dirname "$RANK_TABLE_PATH")" && pwd)/$(basename "$RANK_TABLE_PATH")"

RANGE_NOSPACE=${DEVICE_RANGE//[[:space:]]/}
RANGE_RE='^\[([0-9]+),([0-9]+)[])]$'
if [[ ! "$RANGE_NOSPACE" =~ $RANGE_RE ]]; then
    die "DEVICE_RANGE '$DEVICE_RANGE' is malformed; expected \"[START,END)\" or \"[START,END]\" with integers, e.g. \"[0,8)\""
fi
START=$((10#${BASH_REMATCH[1]}))
END=$((10#${BASH_REMATCH[2]}))
if [ "$START" -ge "$END" ]; then
    die "DEVICE_RANGE '$DEVICE_RANGE': START ($START) must be smaller than END ($END, exclusive)"
fi
if [ "$END" -gt "$MAX_DEVICES" ]; then
    die "DEVICE_RANGE '$DEVICE_RANGE' reaches device $((END - 1)); one server has devices 0..$((MAX_DEVICES - 1)) (END is exclusive: at most $MAX_DEVICES)"
fi
COUNT=$((END - START))

[[ "$RANK_SIZE_ARG" =~ ^[0-9]+$ ]] && [ "$((10#$RANK_SIZE_ARG))" -gt 0 ] \
    || die "RANK_SIZE '$RANK_SIZE_ARG' must be a positive integer"
if [ "$((10#$RANK_SIZE_ARG))" -ne "$COUNT" ]; then
    die "RANK_SIZE=$RANK_SIZE_ARG but DEVICE_RANGE '$DEVICE_RANGE' launches $COUNT processes (devices $START..$((END - 1))): make them agree"
fi

# The rank table (hccl_tools.py's format) must list exactly the devices launched here.
PYTHON_BIN=$(command -v python3 || command -v python) || die "python3 not found (needed to read the rank table)"
TABLE_DEVICES=$("$PYTHON_BIN" - "$RANK_TABLE_PATH" <<'PYEOF' 2>/dev/null
import json, sys
with open(sys.argv[1], encoding="utf-8") as f:
    table = json.load(f)
print(sum(len(server["device"]) for server in table["server_list"]))
PYEOF
) || die "rank table $RANK_TABLE_PATH is not a rank table (expected JSON with server_list[].device[], as mindformers/tools/hccl_tools.py writes)"
if [ "$TABLE_DEVICES" -ne "$COUNT" ]; then
    die "rank table $RANK_TABLE_PATH lists $TABLE_DEVICES devices but DEVICE_RANGE '$DEVICE_RANGE' launches $COUNT processes"
fi

ulimit -u unlimited 2>/dev/null || true

export RANK_SIZE=$RANK_SIZE_ARG
export RANK_TABLE_FILE=$RANK_TABLE_ABS

for ((i = START; i < END; i++)); do
    export DEVICE_ID=$i
    export RANK_ID=$((i - START))
    mkdir -p "./output/log/rank_$RANK_ID" || die "cannot create ./output/log/rank_$RANK_ID"
    echo "start training for rank $RANK_ID, device $DEVICE_ID"
    bash -c "$EXECUTE_ORDER" &> "./output/log/rank_$RANK_ID/mindformer.log" &
done
