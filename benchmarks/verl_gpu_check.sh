#!/usr/bin/env bash
# verl end to end on one GPU: a tiny GRPO job (verl 0.9.1 + vLLM, trainer mode "relex", jump mode) on synthetic
# "a + b" prompts, then a check that the first jump reached the rollout engine. Not run in CI (needs CUDA, verl
# and vLLM installed in the active environment, and a local HF model directory).
#   bash benchmarks/verl_gpu_check.sh /path/to/hf-model [out_dir]
# What it checks: verl logs training/rollout_probs_diff_mean, the gap between the rollout engine's log-probs
# and the actor's, every step. If a jump changed the actor but not the rollout engine, the step after the jump
# shows a gap far above the steps before it; the script prints the gap per step and fails on a jump.
set -euo pipefail
MODEL=${1:?usage: verl_gpu_check.sh MODEL_DIR [OUT_DIR]}
OUT=${2:-runs/verl-gpu-check}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
python - "$OUT" <<'PY'
import random, sys
import pandas as pd
out = sys.argv[1]
def rows(n, seed):
    rng = random.Random(seed)
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        yield {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": f"What is {a} + {b}? Answer as #### <number>."}],
               "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(a + b)}, "extra_info": {}}
pd.DataFrame(list(rows(512, 0))).to_parquet(f"{out}/train.parquet")
pd.DataFrame(list(rows(64, 1))).to_parquet(f"{out}/val.parquet")
PY
python -m verl.trainer.main_ppo --config-path "$PWD/integrations/verl" --config-name relex_grpo \
  actor_rollout_ref.model.path="$MODEL" data.train_files="$OUT/train.parquet" data.val_files="$OUT/val.parquet" \
  data.train_batch_size=16 data.max_prompt_length=64 data.max_response_length=32 \
  actor_rollout_ref.actor.ppo_mini_batch_size=8 actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8 \
  actor_rollout_ref.actor.optim.lr=1e-6 actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.n=4 \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.4 actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 \
  trainer.n_gpus_per_node=1 trainer.nnodes=1 trainer.total_training_steps=8 trainer.save_freq=-1 trainer.test_freq=-1 \
  trainer.val_before_train=false trainer.logger='["console","file"]' trainer.default_local_dir="$OUT/ckpt" \
  relex.mode=jump relex.observe=4 +relex.jump_every=2 +relex.jump_horizon=4 relex.extrapolate_to=null \
  2>&1 | tee "$OUT/train.log"
python - "$OUT/train.log" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
gap = {int(s): float(v) for s, v in re.findall(r"step:(\d+) .*?training/rollout_probs_diff_mean:([-\d.e]+)", text)}
jumps = [int(s) for s, v in re.findall(r"step:(\d+) .*?relex/jump_accepted:([\d.]+)", text) if float(v) == 1.0]
print("rollout/actor log-prob gap by step:", gap, "accepted jumps at:", jumps)
before = [v for s, v in gap.items() if s <= 4]
after = [gap[s + 1] for s in jumps if s + 1 in gap]
assert jumps and after, "no accepted jump with a following step was logged"
assert max(after) <= 3 * max(before) + 1e-3, "the rollout engine did not receive a jump"
print("OK: the jumped weights reached the rollout engine")
PY
