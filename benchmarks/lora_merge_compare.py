"""Which LoRA extrapolation predicts the real trajectory better: A and B separately, or the merged ΔW = s·BA?

Trains a LoRA adapter with the real TRL GRPOTrainer (default: the packaged SmolLM2-135M-Instruct, r=8 on
q/k/v/o, the offline addition task), records every adapter tensor after every step, then fits RELEX on the
first ``--observe`` steps and predicts each later recorded step K. For every LoRA module it compares the
predicted LoRA term of the weight with the real one, s·B_K A_K, as a relative distance
||pred − real|| / ||real − real_N|| summed over modules (N = last observed step; "stay" = keep step N).

    python benchmarks/lora_merge_compare.py --observe 10 --steps 30 --out benchmarks/results/lora_merge.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from relex_callback.math.core import combine, fit_trajectory, gram_matrix
from relex_callback.peft_support import lora_pairs, merged_delta_gram

logger = logging.getLogger("lora_merge_compare")


class Capture(TrainerCallback):
    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def _grab(self, step, model) -> None:
        self.weights[step] = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._grab(state.global_step, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._grab(state.global_step, model)


def digits_reward(completions, **kwargs) -> list[float]:
    """A dense reward: the fraction of digit characters in the completion text."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def factor_prediction(weights, names, steps, targets):
    """RELEX on each factor tensor separately (the callback's default): {name: [n, *shape]}."""
    grams, stacks = [], {}
    for name in names:
        base = weights[0][name].reshape(-1)
        stacks[name] = torch.stack([weights[s][name].reshape(-1) - base for s in steps])
        grams.append((name, gram_matrix(stacks[name])))
    fit = fit_trajectory(grams, steps, targets)
    return {t.name: (combine(stacks[t.name], t.weights) + weights[0][t.name].reshape(-1)).view(len(targets), *weights[0][t.name].shape)
            for t in fit.tensors}


def merged_prediction(weights, pairs, steps, targets):
    """RELEX on the merged update of every module: {prefix: [n, d_out, d_in]} (the total LoRA term)."""
    grams, histories = [], {}
    for pair in pairs:
        a = torch.stack([weights[s][pair.a_name] for s in [0, *steps]])
        b = torch.stack([weights[s][pair.b_name] for s in [0, *steps]])
        histories[pair.prefix] = (a, b)
        grams.append((pair.prefix, merged_delta_gram(a, b, pair.scaling)))
    fit = fit_trajectory(grams, steps, targets)
    out = {}
    for pair, t in zip(pairs, fit.tensors, strict=True):
        a, b = histories[pair.prefix]
        coef = torch.cat([1.0 - t.weights.sum(1, keepdim=True), t.weights], 1).float()
        out[pair.prefix] = torch.stack([pair.scaling * torch.einsum("k,kor,kri->oi", row, b, a) for row in coef])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--observe", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a tiny random Qwen2 (tests/_tiny.py) instead of SmolLM2")
    parser.add_argument("--reward", choices=["addition", "digits"], default="addition",
                        help="'digits' (fraction of digit characters) is dense, for the tiny model")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from relex_callback.demo import addition_reward, load_smollm2, make_addition_dataset

    if args.tiny:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from _tiny import tiny_qwen2, tiny_tokenizer

        tok = tiny_tokenizer()
        tok.padding_side = "left"
        model = tiny_qwen2(tokenizer=tok)
    else:
        model, tok = load_smollm2()
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    config = GRPOConfig(
        output_dir="/tmp/lora_merge_compare", per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations, max_completion_length=16, learning_rate=args.lr, lr_scheduler_type="constant",
        beta=0.0, max_steps=args.steps, use_cpu=not torch.cuda.is_available(), bf16=False, gradient_checkpointing=False,
        save_strategy="no", logging_steps=5, report_to=[], seed=args.seed, disable_tqdm=True,
    )
    capture = Capture()
    reward = addition_reward if args.reward == "addition" else digits_reward
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, processing_class=tok,
                          train_dataset=make_addition_dataset(500, seed=args.seed), peft_config=lora, callbacks=[capture])
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    pairs = lora_pairs(trainer.model)
    steps = list(range(1, args.observe + 1))
    targets = [k for k in (2 * args.observe, 3 * args.observe, args.steps) if args.observe < k <= args.steps]
    targets = sorted(set(targets))
    names = [n for p in pairs for n in (p.a_name, p.b_name)]
    factors = factor_prediction(capture.weights, names, steps, [float(t) for t in targets])
    merged = merged_prediction(capture.weights, pairs, steps, [float(t) for t in targets])
    w = capture.weights
    rows = []
    for j, target in enumerate(targets):
        err = {"factors": 0.0, "merged": 0.0, "stay": 0.0}
        norm = 0.0
        for pair in pairs:
            real = pair.scaling * w[target][pair.b_name] @ w[target][pair.a_name]
            last = pair.scaling * w[args.observe][pair.b_name] @ w[args.observe][pair.a_name]
            fac = pair.scaling * factors[pair.b_name][j] @ factors[pair.a_name][j]
            err["factors"] += float((fac - real).pow(2).sum())
            err["merged"] += float((merged[pair.prefix][j] - real).pow(2).sum())
            err["stay"] += float((last - real).pow(2).sum())
            norm += float((real - last).pow(2).sum())
        rows.append({"target": target, "ratio": target / args.observe,
                     **{k: (v / norm) ** 0.5 if norm > 0 else None for k, v in err.items()}})
    result = {"model": "tiny Qwen2 (tests/_tiny.py)" if args.tiny else "SmolLM2-135M-Instruct", "reward": args.reward, "lora_r": args.lora_r, "lr": args.lr, "observe": args.observe,
              "steps": args.steps, "modules": len(pairs), "train_seconds": seconds, "relative_distance": rows}
    logger.info(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
