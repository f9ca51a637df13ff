#!/usr/bin/env bash
# GPU check, not run by CI. On a CUDA machine (torch, no internet needed), from the repository:
#     OUT=/some/folder .ci/gpu_check.sh
# runs bench.py's device mode at ViT-B widths (four blocks), bf16, T = 6304: eager and torch.compile'd
# (inductor) steps of LoRA, RandLoRA and full fine-tuning, the compile time apart, issue and kernel time
# from torch.profiler, and the two GPU targets. Writes to $OUT: environment.txt, bench_cuda_bf16.txt
# (the table), bench_cuda_bf16.json (rows, checks, environment), bench_cuda_bf16.log (progress, warnings).
# Each step runs under `timeout`; the whole stays under 8 minutes. To try the script on a CPU:
#     BENCH_DEVICE=cpu BENCH_EXTRA="--shape tiny --blocks 1 --tokens 16 --backend eager --repeats 2" .ci/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
DEVICE="${BENCH_DEVICE:-cuda}"
read -r -a EXTRA <<< "${BENCH_EXTRA:-}"
mkdir -p "$OUT"
status=0

timeout 60 bash -c 'git rev-parse HEAD 2>/dev/null; command -v nvidia-smi >/dev/null && nvidia-smi
python -c "import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda,
\"available\", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else \"\")"
python -c "import triton; print(\"triton\", triton.__version__)"' > "$OUT/environment.txt" 2>&1 || true

name="bench_${DEVICE}_bf16"
timeout 420 python bench.py --device "$DEVICE" --dtype bf16 --methods lora randlora full --repeats 10 --warmup 2 \
    "${EXTRA[@]}" --json "$OUT/$name.json" > "$OUT/$name.txt" 2> "$OUT/$name.log" || status=$?
cat "$OUT/$name.txt"
[ "$status" = 0 ] || { echo "bench.py exited with $status (124: timed out); see $OUT/$name.log"; tail -20 "$OUT/$name.log"; }
exit "$status"
