#!/usr/bin/env bash
# Prepared GPU check for the scale-out work (issue 5). Run it on a CUDA machine from the repo root, e.g. with the
# device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540).
# Before that, here: bash benchmarks/prepare_gpu_wheels.sh  (DeepSpeed + hjson + pydantic wheels into .whl/).
# Writes $OUT (or ./gpu_check_out): versions.json, gpu_tests.log, deepspeed_cuda.log, deepspeed_cpu.log,
# buffer_timing.jsonl, summary.json. Budget: about 5-7 minutes on one H100.
set -uo pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
python3 - <<'PY' > "$OUT/versions.json"
import json, importlib, torch
v = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
     "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
for name in ("transformers", "accelerate", "peft", "deepspeed", "trl", "datasets"):
    try:
        v[name] = importlib.import_module(name).__version__
    except Exception as err:  # noqa: BLE001
        v[name] = f"missing ({type(err).__name__})"
print(json.dumps(v))
PY
cat "$OUT/versions.json"
t0=$(date +%s)
# 0. the CUDA branches of the delta buffer (tests/test_gpu.py: GPU buffer, fused delta, pinned host buffer, budget)
timeout 120 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py > "$OUT/gpu_tests.log" 2>&1
gpu_tests=$?
start=$(date +%s)
# 1. DeepSpeed ZeRO-1/2/3 (fp32 and bf16) with the real Trainer on CUDA, one process per GPU (at most 2)
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_deepspeed.py -x > "$OUT/deepspeed_cuda.log" 2>&1
ds_cuda=$?
t1=$(date +%s)
# 2. the same tests with 2 processes on DeepSpeed's CPU accelerator (gloo), as the CPU-only CI would run them
CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu RELEX_TEST_WORLD=2 timeout 200 \
    python3 -m pytest -q -p no:cacheprovider tests/test_deepspeed.py -x > "$OUT/deepspeed_cpu.log" 2>&1
ds_cpu=$?
t2=$(date +%s)
# 3. delta-buffer timings on the GPU (buffer on the GPU vs pinned host memory)
timeout 150 python3 benchmarks/gpu_buffer_timing.py --params 1e9 --snapshots 8 --out "$OUT/buffer_timing.jsonl" > "$OUT/buffer_timing.log" 2>&1
timing=$?
t3=$(date +%s)
tail -3 "$OUT/gpu_tests.log" "$OUT/deepspeed_cuda.log" "$OUT/deepspeed_cpu.log"; cat "$OUT/buffer_timing.jsonl" 2>/dev/null
python3 - "$OUT" "$gpu_tests" "$ds_cuda" "$ds_cpu" "$timing" "$((start - t0))" "$((t1 - start))" "$((t2 - t1))" "$((t3 - t2))" <<'PY'
import json, sys
out, gpu_tests, ds_cuda, ds_cpu, timing, s0, s1, s2, s3 = sys.argv[1:]
summary = {"gpu_tests_rc": int(gpu_tests), "deepspeed_cuda_rc": int(ds_cuda), "deepspeed_cpu_rc": int(ds_cpu),
           "buffer_timing_rc": int(timing),
           "seconds": {"gpu_tests": int(s0), "deepspeed_cuda": int(s1), "deepspeed_cpu": int(s2), "buffer_timing": int(s3)}}
open(f"{out}/summary.json", "w").write(json.dumps(summary) + "\n")
print(json.dumps(summary))
PY
