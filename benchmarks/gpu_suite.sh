#!/usr/bin/env bash
# Everything the GPU machine should measure, in one run of at most ~9.5 minutes (the steps' limits), into one report.
#
#   bash benchmarks/gpu_suite.sh            # on the device machine, from the repository root
#
# With a .venv (`make install`) it uses that; without one (a lent machine with its own torch, triton and transformers,
# nothing installable) it runs the checkout with python3. The steps need only the engine's packages: the cluster's
# (redis, NIXL, kubernetes, ...) are imported only by the steps' optional parts, which are left out when missing.
#
# 1. the `gpu` tests (Triton kernels compiled for the device, the whole engine in bf16 against transformers);
# 2. the engine benchmark on a ~1.1B Llama in bf16 against transformers `generate`, same device and run;
# 3. batch-1 decode per token against the HBM roofline (bandwidth measured on the device), with the decode step
#    replayed as a CUDA graph (the default) and eagerly (SPLITSERVE_CUDA_GRAPHS=0);
# 4. tensor parallel 2 against 1 on the GPU (both ranks share it; collectives staged through host memory);
# 5. KV transfer throughput over the torch.distributed and NIXL backends (host memory: the benchmark does not
#    register VRAM yet; NIXL only where it is installed).
# Each step has its own time limit and the suite goes on when one fails; the report says which. Nothing here changes
# the GPU's clocks, power limit or modes.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else
    PY=python3
    export PYTHONPATH="$PWD:$PWD/proto${PYTHONPATH:+:$PYTHONPATH}"  # the checkout itself, not installed
  fi
fi
REPORT=${REPORT:-${OUT:-.cache}/gpu-suite-report.md}  # its figures, explained, go to docs/benchmarks.md
LOGS=${LOGS:-${OUT:-.cache}/gpu-suite}
mkdir -p "$LOGS" "$(dirname "$REPORT")"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run it with a limit, keep its output, note its status in the report
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  {
    echo "### $name"
    echo
    echo "\`$*\` -> exit $rc in $((SECONDS - start)) s$([ $rc -eq 124 ] && echo " (time limit $limit s)")"
    echo
    echo '```'
    grep -E '^\{|passed|failed|error|Error' "$LOGS/$name.log" | tail -n 30
    echo '```'
    echo
  } >>"$REPORT"
}

{
  echo "# GPU benchmarks"
  echo
  echo "Written by \`benchmarks/gpu_suite.sh\` on $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null)."
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv 2>&1 | head -n 5
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
  echo '```'
  echo
} >"$REPORT"

step gpu-tests 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu
# The ~1.1B model is made once, on the CPU, with its own limit: the benchmarks below reuse it.
step make-1b-model 120 "$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); import bench_model as b
b.ensure_model(b.CACHE / "bench-llama-1b", seed=0, dtype="bfloat16", max_position_embeddings=2048, **b.SHAPES["1b"])'
step engine-1b-vs-transformers 120 "$PY" benchmarks/engine_throughput.py --device cuda --shape 1b --dtype bfloat16 \
  --requests 64 --budget 4096
step decode-roofline-1b 60 "$PY" benchmarks/decode_roofline.py --device cuda --shape 1b --tokens 256
step decode-roofline-1b-eager 40 env SPLITSERVE_CUDA_GRAPHS=0 "$PY" benchmarks/decode_roofline.py --device cuda \
  --shape 1b --tokens 128
step tensor-parallel 50 "$PY" benchmarks/tensor_parallel.py --device cuda --skip-transfer --rounds 2
backends="torch"
"$PY" -c 'import nixl._api' 2>/dev/null && backends="nixl torch"
step kv-transfer 30 "$PY" benchmarks/kv_transfer.py --backends $backends --sizes-mib 64 256 --layers 32 --repeats 3
echo "report: $REPORT (logs in $LOGS)"
