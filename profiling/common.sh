# Sourced by the table scripts in profiling/: environment, the output folder and `run`.
# They run from the repository root, installed or not (PYTHONPATH covers a bare checkout).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0  # never NVLink multicast
out=${OUT:-profiling_out}; mkdir -p "$out"
run() {  # name, time limit in s, command...: output to $out/name.log, its table to stdout
    local name=$1 limit=$2; shift 2
    echo "== $name ($(date +%T))"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1 || echo "   ($name exited with $?)"
}
table() {  # name: the table rows (lines with '|') and any error of a log
    grep "|" "$out/$1.log" | grep -v "^I[0-9]\|^W[0-9]" | cut -c1-220
    grep -m2 -A8 "Traceback\|Error:" "$out/$1.log" | head -20
}
