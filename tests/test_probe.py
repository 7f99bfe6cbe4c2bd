"""RewardProbe on tiny real models: scores match an independent computation, TRL's reward call
convention is followed, model/tokenizer state is restored, and bad arguments are rejected."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from relex_callback.demo.arithmetic import addition_prompt, addition_reward
from relex_callback.probe import RewardProbe, choose_candidate

try:
    from tests._tiny import tiny_llama, tiny_qwen2, tiny_tokenizer
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from _tiny import tiny_llama, tiny_qwen2, tiny_tokenizer

PLAIN = ["What is 1 + 2?", "12 + 7 =", "What is 33 + 40? Reply with just the number.", "9", "5 + 5 = 10, 6 + 6 ="]


def char_reward(completions, **kwargs):
    """A reward that depends on every character of the completion: fraction of digits (0 for empty)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / len(t) if t else 0.0 for t in texts]


def length_reward(completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


def independent_completions(model, tok, prompt_texts, max_new_tokens, add_special_tokens=True):
    """Greedy completions one prompt at a time (no padding), cut after the first eos, decoded."""
    out_ids, out_texts = [], []
    for text in prompt_texts:
        enc = tok(text, return_tensors="pt", add_special_tokens=add_special_tokens)
        with torch.no_grad():
            seq = model.generate(
                **enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )[0, enc["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in seq:
            seq = seq[: seq.index(tok.eos_token_id) + 1]
        out_ids.append(seq)
        out_texts.append(tok.decode(seq, skip_special_tokens=True))
    return out_ids, out_texts


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2], ids=["llama-tied", "qwen2-untied"])
def test_plain_prompts_score_matches_independent_generation(build):
    tok = tiny_tokenizer()
    model = build(tokenizer=tok)
    probe = RewardProbe(
        [{"prompt": p} for p in PLAIN], [char_reward, length_reward], tok,
        max_new_tokens=6, batch_size=2, reward_weights=[1.0, 0.25],
    )
    score = probe(model)

    ids, texts = independent_completions(model, tok, PLAIN, 6)
    assert probe.last_completions == texts
    expected = [c + 0.25 * len(i) for c, i in zip(char_reward(texts), ids)]
    assert probe.last_scores == pytest.approx(expected)
    assert score == pytest.approx(sum(expected) / len(expected))
    assert tok.padding_side == "right"  # probe padded left by itself; tokenizer untouched


def test_conversational_prompts_score_matches_independent_generation():
    tok = tiny_tokenizer()
    model = tiny_qwen2(tokenizer=tok, seed=3)
    pairs = [(1, 2), (30, 4), (17, 25), (8, 80)]
    data = Dataset.from_dict({"prompt": [addition_prompt(a, b) for a, b in pairs],
                              "answer": [str(a + b) for a, b in pairs]})
    probe = RewardProbe(data, char_reward, tok, max_new_tokens=5, batch_size=3)
    score = probe(model)

    rendered = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in data["prompt"]]
    _, texts = independent_completions(model, tok, rendered, 5, add_special_tokens=False)
    assert probe.last_completions == texts
    assert score == pytest.approx(sum(char_reward(texts)) / len(texts))


def _forced_digit_probe(tok, answers, **kw):
    """Probe whose generation can only emit the bare token '7' (everything else suppressed)."""
    seven = tok.convert_tokens_to_ids("7")
    assert tok.decode([seven]) == "7"
    suppress = [i for i in range(len(tok)) if i != seven]
    prompts = [{"prompt": addition_prompt(3, 4), "answer": a} for a in answers]
    return RewardProbe(prompts, addition_reward, tok, max_new_tokens=1,
                       generation_kwargs={"suppress_tokens": suppress}, **kw)


def test_known_completion_gives_one_and_zero():
    tok = tiny_tokenizer()
    model = tiny_llama(tokenizer=tok)
    probe = _forced_digit_probe(tok, ["7", "8", "7", "77"])
    assert probe(model) == pytest.approx(0.5)
    assert probe.last_completions == ["7"] * 4
    assert probe.last_scores == [1.0, 0.0, 1.0, 0.0]
    assert _forced_digit_probe(tok, ["8", "9"])(model) == 0.0
    assert _forced_digit_probe(tok, ["7"])(model) == 1.0


def test_reward_kwargs_follow_trl_convention():
    tok = tiny_tokenizer()
    model = tiny_llama(tokenizer=tok)
    seen = {}

    def spy(prompts, completions, completion_ids, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        kwargs["log_metric"]("my_metric", 0.5)
        kwargs["log_extra"]("my_col", ["x"] * len(prompts))
        return [float(int(a)) for a in kwargs["answer"]]

    data = Dataset.from_dict({
        "prompt": [addition_prompt(1, 2), addition_prompt(3, 4), addition_prompt(5, 6)],
        "answer": ["3", "7", "11"],
        "tag": ["a", "b", "c"],
        "completion": ["ignored"] * 3,
    })
    state = object()
    probe = RewardProbe(data, spy, tok, max_new_tokens=4, batch_size=2)
    assert probe(model, trainer_state=state) == pytest.approx(7.0)
    assert seen["prompts"] == data["prompt"]
    assert seen["answer"] == ["3", "7", "11"] and seen["tag"] == ["a", "b", "c"]
    assert "completion" not in seen and "prompt" not in seen
    assert seen["trainer_state"] is state
    assert all(c == [{"role": "assistant", "content": t}] for c, t in zip(seen["completions"], probe.last_completions))
    assert all(isinstance(ids, list) and 1 <= len(ids) <= 4 and all(isinstance(i, int) for i in ids)
               for ids in seen["completion_ids"])
    assert probe.last_metrics == {"my_metric": [0.5]}
    assert probe.last_extra == {"my_col": ["x", "x", "x"]}


def test_completion_ids_cut_after_first_eos_like_trl():
    tok = tiny_tokenizer()
    model = tiny_qwen2(tokenizer=tok, seed=0)
    eos, seven = tok.eos_token_id, tok.convert_tokens_to_ids("7")
    # Only eos or "7" can be generated; with this seed some rows stop early and others run to the limit,
    # so finished rows get padded inside the batch and must be cut after their eos.
    suppress = [i for i in range(len(tok)) if i not in (eos, seven)]
    got = {}

    def spy(completions, completion_ids, **kwargs):
        got.update(completions=completions, completion_ids=completion_ids)
        return [0.0] * len(completions)

    probe = RewardProbe([{"prompt": p} for p in PLAIN], spy, tok, max_new_tokens=4, batch_size=5,
                        generation_kwargs={"suppress_tokens": suppress})
    probe(model)
    expected = []
    for text in PLAIN:
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            seq = model.generate(**enc, do_sample=False, max_new_tokens=4, pad_token_id=tok.pad_token_id,
                                 eos_token_id=eos, suppress_tokens=suppress)[0, enc["input_ids"].shape[1]:].tolist()
        expected.append(seq[: seq.index(eos) + 1] if eos in seq else seq)
    assert any(ids[-1] == eos and len(ids) < 4 for ids in expected)  # the premise: mixed lengths
    assert any(len(ids) == 4 and eos not in ids for ids in expected)
    assert got["completion_ids"] == expected
    assert got["completions"] == [tok.decode(ids, skip_special_tokens=True) for ids in expected]
    assert all(isinstance(c, str) for c in got["completions"])


def test_mode_and_no_grad_during_generation_then_restored():
    tok = tiny_tokenizer()
    model = tiny_qwen2(tokenizer=tok)
    model.train()
    model.model.layers[1].eval()  # a mixed-mode model must come back exactly as it was
    before = {name: m.training for name, m in model.named_modules()}
    during = []
    handle = model.register_forward_pre_hook(lambda m, args: during.append((m.training, torch.is_grad_enabled())))
    tok.padding_side = "right"
    RewardProbe([{"prompt": p} for p in PLAIN], char_reward, tok, max_new_tokens=3, batch_size=4)(model)
    handle.remove()
    assert during and all(d == (False, False) for d in during)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert tok.padding_side == "right"


def test_mode_restored_when_reward_raises():
    tok = tiny_tokenizer()
    model = tiny_llama(tokenizer=tok).train()

    def broken(completions, **kwargs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        RewardProbe([{"prompt": "1 + 1 ="}], broken, tok, max_new_tokens=2)(model)
    assert model.training and all(m.training for m in model.modules())


def test_missing_pad_token_uses_eos():
    tok = tiny_tokenizer()
    model = tiny_llama(tokenizer=tok)
    expected = RewardProbe([{"prompt": p} for p in PLAIN], char_reward, tok, max_new_tokens=4, batch_size=5)(model)
    tok.pad_token = None
    assert tok.pad_token_id is None
    probe = RewardProbe([{"prompt": p} for p in PLAIN], char_reward, tok, max_new_tokens=4, batch_size=5)
    assert probe.pad_token_id == tok.eos_token_id
    assert probe(model) == pytest.approx(expected)  # pad id is masked out: same greedy answers


def test_none_rewards_are_unscorable_and_async_rewards_work():
    tok = tiny_tokenizer()
    model = tiny_llama(tokenizer=tok)

    def half_none(prompts, **kwargs):
        return [None if i % 2 else 1.0 for i in range(len(prompts))]

    async def async_two(prompts, **kwargs):
        return [2.0] * len(prompts)

    rows = [{"prompt": p} for p in PLAIN[:4]]
    probe = RewardProbe(rows, half_none, tok, max_new_tokens=2)
    assert probe(model) == 1.0
    assert probe.last_scores[0] == 1.0 and math.isnan(probe.last_scores[1])
    probe = RewardProbe(rows, [half_none, async_two], tok, max_new_tokens=2, reward_weights=[1.0, 0.5])
    assert probe(model) == pytest.approx((2.0 + 1.0 + 2.0 + 1.0) / 4)
    all_none = RewardProbe(rows, lambda prompts, **kw: [None] * len(prompts), tok, max_new_tokens=2)
    assert math.isnan(all_none(model))


def test_reward_model_module():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = tiny_tokenizer()
    policy = tiny_llama(tokenizer=tok)
    torch.manual_seed(1)
    rm = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)).eval()
    rows = [{"prompt": p} for p in PLAIN[:3]]
    probe = RewardProbe(rows, rm, tok, max_new_tokens=3, reward_processing_classes=[tok])
    score = probe(policy)
    expected = []
    for p, c in zip(PLAIN[:3], probe.last_completions):
        with torch.no_grad():
            expected.append(rm(**tok(p + c, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item())
    assert probe.last_scores == pytest.approx(expected, abs=1e-5)
    assert score == pytest.approx(sum(expected) / 3, abs=1e-5)
    with pytest.raises(TypeError, match="reward_processing_classes"):
        RewardProbe(rows, rm, tok)


def test_wrong_reward_length_raises():
    tok = tiny_tokenizer()
    probe = RewardProbe([{"prompt": "1 + 1 ="}, {"prompt": "2 + 2 ="}], lambda completions, **kw: [1.0], tok,
                        max_new_tokens=1)
    with pytest.raises(ValueError, match="returned 1 rewards, but 2 were expected"):
        probe(tiny_llama(tokenizer=tok))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"prompts": []}, ValueError, "prompts is empty"),
        ({"prompts": Dataset.from_dict({"prompt": []})}, ValueError, "prompts is empty"),
        ({"prompts": "What is 1 + 1?"}, TypeError, "prompts must be"),
        ({"prompts": [{"question": "x"}]}, ValueError, r"prompts\[0\] must be a dict with a 'prompt' key"),
        ({"prompts": [{"prompt": "a"}, {"prompt": [{"role": "user", "content": "b"}]}]}, ValueError, "mixes"),
        ({"prompts": [{"prompt": 3}]}, ValueError, "string or a list of chat messages"),
        ({"reward_funcs": []}, ValueError, "reward_funcs is empty"),
        ({"reward_funcs": "my-org/reward-model"}, TypeError, "pass a callable"),
        ({"reward_funcs": [addition_reward, 3]}, TypeError, r"reward_funcs\[1\] must be callable"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, TypeError, "max_new_tokens"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": True}, TypeError, "batch_size"),
        ({"reward_weights": [1.0, 2.0]}, ValueError, "reward_weights has 2 entries"),
        ({"reward_weights": ["x"]}, TypeError, "reward_weights"),
        ({"processing_class": None}, TypeError, "processing_class"),
        ({"processing_class": "tok"}, TypeError, "processing_class"),
    ],
)
def test_bad_arguments_raise(kwargs, exc, match):
    args = {"prompts": [{"prompt": addition_prompt(1, 2), "answer": "3"}], "reward_funcs": addition_reward,
            "processing_class": tiny_tokenizer()}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        RewardProbe(**args)


def test_conversational_prompts_need_a_chat_template():
    with pytest.raises(ValueError, match="chat_template"):
        RewardProbe([{"prompt": addition_prompt(1, 2)}], addition_reward, tiny_tokenizer(chat_template=False))


@pytest.mark.parametrize("conversational", [True, False], ids=["chat", "plain"])
def test_reward_call_matches_a_real_grpo_trainer(tmp_path, conversational):
    """Run one real TRL GRPO step and the probe with the same spy reward: same kwargs, same formats."""
    trl = pytest.importorskip("trl")
    tok = tiny_tokenizer()
    model = tiny_qwen2(tokenizer=tok)
    prompts = [addition_prompt(a, a + 1) for a in range(4)]
    if not conversational:
        prompts = [p[0]["content"] for p in prompts]
    data = Dataset.from_dict({"prompt": prompts, "answer": [str(2 * a + 1) for a in range(4)], "tag": list("abcd")})
    calls = []

    def spy(prompts, completions, completion_ids, **kwargs):
        calls.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **kwargs})
        return [0.0] * len(prompts)

    args = trl.GRPOConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, num_generations=2,
        max_completion_length=3, use_cpu=True, bf16=False, activation_checkpointing=False, report_to=[],
        logging_steps=1, save_strategy="no", disable_tqdm=True,
    )
    trl.GRPOTrainer(model=model, reward_funcs=spy, args=args, train_dataset=data, processing_class=tok).train()
    trainer_call = calls[0]
    RewardProbe(data, spy, tok, max_new_tokens=3)(model)
    probe_call = calls[-1]

    assert set(probe_call) == set(trainer_call)
    for key in ("answer", "tag", "prompts"):
        assert all(x in data[key if key != "prompts" else "prompt"] for x in trainer_call[key])
    for call in (trainer_call, probe_call):
        comp = call["completions"][0]
        if conversational:
            assert isinstance(comp, list) and set(comp[0]) == {"role", "content"} and comp[0]["role"] == "assistant"
        else:
            assert isinstance(comp, str)
        assert all(isinstance(ids, list) and all(isinstance(i, int) for i in ids) for ids in call["completion_ids"])
        assert callable(call["log_extra"]) and callable(call["log_metric"])


@pytest.mark.parametrize(
    ("current", "scores", "targets", "allow_worse", "expected"),
    [
        (0.5, [0.4, 0.7, 0.6], [20, 30, 50], False, 1),  # best candidate
        (0.5, [0.7, 0.7, 0.6], [50, 30, 20], False, 1),  # tie: the nearer target wins
        (0.5, [0.7, 0.7, 0.6], [20, 30, 50], False, 0),
        (0.8, [0.4, 0.7, 0.6], [20, 30, 50], False, None),  # all below the current weights: keep them
        (0.8, [0.4, 0.7, 0.6], [20, 30, 50], True, 1),
        (0.7, [0.4, 0.7, 0.6], [20, 30, 50], False, 1),  # equal to current counts as not worse
        (0.5, [math.nan, 0.4, math.inf * 0], [20, 30, 50], False, None),
        (math.nan, [math.nan, 0.1, 0.2], [20, 30, 50], False, 2),
        (0.5, [math.nan, math.nan], [20, 30], True, None),
    ],
)
def test_choose_candidate_rule(current, scores, targets, allow_worse, expected):
    assert choose_candidate(current, scores, targets, allow_worse) == expected


def test_choose_candidate_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 scores for 3 targets"):
        choose_candidate(0.5, [0.1, 0.2], [1, 2, 3])


@pytest.mark.parametrize("busiest", [3, 5])
def test_on_sharded_weights_every_process_runs_the_busiest_ones_generate_calls(monkeypatch, busiest):
    """On sharded weights (stubbed here: one process, another one said to need ``busiest`` batches) the probe runs
    as many ``generate`` calls as the busiest process, repeating its last batch, with ``synced_gpus=True``; the
    extra calls do not change its score. Unsharded, it runs its own batches only (the control)."""
    import relex_callback.probe as probe_module

    tok = tiny_tokenizer()
    model = tiny_qwen2(tokenizer=tok)
    probe = RewardProbe([{"prompt": p} for p in PLAIN[:3]], length_reward, tok, max_new_tokens=4, batch_size=2)
    calls = []
    generate = model.generate

    def counted(**kwargs):
        calls.append((kwargs["input_ids"].shape[0], kwargs.get("synced_gpus")))
        return generate(**{k: v for k, v in kwargs.items() if k != "synced_gpus"})

    monkeypatch.setattr(model, "generate", counted)
    alone = probe(model)
    assert calls == [(2, None), (1, None)]
    calls.clear()
    monkeypatch.setattr(probe_module, "shards_parameters", lambda m: True)
    monkeypatch.setattr(probe_module, "all_reduce_max", lambda n: max(n, busiest))
    assert probe(model) == alone
    assert calls == [(2, True), (1, True)] + [(1, True)] * (busiest - 2)
