#!/usr/bin/env bash
# The project's GPU check, one script for a lent GPU machine (H100/H200 class) with the project's
# dependencies and a CUDA torch already installed (docker/Dockerfile.gpu); it downloads nothing.
#
#   bash benchmarks/gpu_check.sh            # results under $OUT (default benchmarks/results/gpu)
#   QUICK=1 bash benchmarks/gpu_check.sh    # the environment and a 2-step smoke pass only (about a minute)
#
# 1. the environment (GPU, driver, torch, CUDA, diffusers);
# 2. a smoke pass: the factory's generation path on CUDA at 64 px, 2 steps (it loads, samples, writes);
# 3. SD 1.5's architecture at 512 px, bf16: the factory at the default sampling against diffusers' pipeline as
#    it comes (fp32, 20 steps), then generation.profile fast, then fast + compile (CUDA graphs) + channels-last;
#    images/s, the ratio to the plain loop and the share of the GPU's bf16 limit (bench_generate.py).
# Each step writes its JSON and log under $OUT and the script goes on when one fails; the exit status is the
# number of failed steps. Every step has a time limit so the whole check fits in about 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python}
mkdir -p "$OUT"
failed=0

step() {  # step NAME LIMIT_SECONDS COMMAND...: run, log, time-limited; count a failure and go on
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
        echo "   ok"
    else
        echo "   FAILED ($?), see $OUT/$name.log"
        tail -5 "$OUT/$name.log"
        failed=$((failed + 1))
    fi
}

DEVICE=${DEVICE:-cuda}  # DEVICE=cpu QUICK=1 rehearses the script on a machine without a GPU
step environment 60 bash -c "{ nvidia-smi || [[ $DEVICE == cpu ]]; } && $PY -c 'import torch, diffusers, indusfactory
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available())
print(\"diffusers\", diffusers.__version__)
if torch.cuda.is_available(): print(\"device\", torch.cuda.get_device_name(0))
elif \"$DEVICE\" == \"cuda\": raise SystemExit(\"CUDA is not available to torch\")'"

common=(--device "$DEVICE" --precision bf16 --no-flow --repeats 2)
step smoke 180 "$PY" benchmarks/bench_generate.py "${common[@]}" --resolution 64 --steps 2 --repeats 1 \
    --out "$OUT/smoke.json"
if [[ -n "${QUICK:-}" ]]; then
    exit "$failed"
fi

sd15=(--sd15-architecture --resolution 512 --batch-size 16 --shard-size 64 --per-driver 8 --augmentations 8)
step sd15-default 180 "$PY" benchmarks/bench_generate.py "${common[@]}" "${sd15[@]}" --plain-defaults \
    --out "$OUT/sd15-default.json"
step sd15-fast 150 "$PY" benchmarks/bench_generate.py "${common[@]}" "${sd15[@]}" --plain-defaults \
    --profile fast --out "$OUT/sd15-fast.json"
step sd15-fast-compiled 300 "$PY" benchmarks/bench_generate.py "${common[@]}" "${sd15[@]}" --plain-defaults \
    --profile fast --channels-last --compile --compile-mode reduce-overhead --out "$OUT/sd15-fast-compiled.json"

echo "== done: $failed step(s) failed; results in $OUT"
exit "$failed"
