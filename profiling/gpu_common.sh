# Sourced by the gpu_round*.sh scripts: environment, the output folder and `run`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
out=${OUT:-out}; mkdir -p "$out"
run() {  # name, timeout, command...: the command's output goes to $out/name.log
    local name=$1 limit=$2; shift 2
    echo "== $name $(date +%T)"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1 || echo "   ($name exited with $?)"
}
