"""Worker for ``tests/test_distributed.py``: run under ``torchrun --nproc_per_node 2`` (gloo, CPU).

``python -m torch.distributed.run --nproc_per_node 2 tests/_distributed_worker.py OUT SCENARIO [SCENARIO ...]``

Each scenario trains a tiny real model with a ``RelexCallback`` and, independently of the callback, a
``Recorder`` that captures the *full* tracked parameters (gathered for sharded models) at θ_0 and every
snapshot step. Rank 0 writes those snapshots; every rank writes its final live weights (full) and its
report numbers. The test process then recomputes the prediction on one process and compares.

Scenarios:

* ``ddp``: the real ``transformers.Trainer`` (DDP over gloo, ``use_cpu=True``), tied embeddings, biases;
* ``ddp_peft``: the real ``Trainer`` on a LoRA ``PeftModel`` (adapter directory + merged model);
* ``fsdp2``: ``fully_shard`` per decoder layer + root, driven by a hand-written loop that calls the
  callback's events (accelerate's FSDP plugin needs an accelerator; see ``fsdp2_trainer`` for the Trainer);
* ``fsdp1``: FSDP1 with ``use_orig_params=True``, same loop;
* ``unsupported``: FSDP1 without ``use_orig_params``, a tensor-parallel DTensor (``Shard(1)``), and a ``RewardProbe``
  on FSDP1 must raise ``UnsupportedSetupError`` in ``on_train_begin``;
* ``ddp_jump``, ``fsdp2_jump``, ``zero2_jump``: jump mode with a probe whose raw score differs by rank (the first
  jump is rejected, the later ones accepted; ``optimizer_policy="reset"`` except under ZeRO); a ``JumpRecorder``
  saves each process's tensors (its shard, the fp32 masters, the optimizer state) before and after every jump;
* ``fsdp2_trainer``, ``fsdp2_trainer_jump``: FSDP2 applied by transformers (``from_pretrained(distributed_config=
  DistributedConfig(fsdp_size=2))``) and trained by the real ``Trainer``; the jump scenario's probe also generates
  on the sharded model (``generating_probe``: different prompts and completion lengths per process);
* ``zero3_jump``: jump mode under ZeRO-3 with every parameter partitioned and the generating probe;
* ``ddp_nonfinite``: a NaN in one process's prediction or deltas, or a probe raising on one process, at a jump;
* ``zero2_jump_reset``: ``optimizer_policy="reset"`` under ZeRO-2 must be refused in ``on_train_begin``;
* ``zero1``, ``zero2``, ``zero3``, ``zero2_bf16``, ``zero3_bf16``: the real ``Trainer`` with DeepSpeed ZeRO-1/2/3 (fp32 or bf16
  weights; ``zero3`` partitions every tensor, ``zero3_bf16`` keeps the tiny tensors "persistent"). DeepSpeed
  runs on CPU through its CPU accelerator and gloo; the Recorder reads fp32 masters with
  ``safe_get_full_fp32_param``.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _distributed_checks import JUMP_STEPS, POISONED, forward_loss, generation_probe  # noqa: E402
from _tiny import tiny_qwen2, tiny_tokenizer  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments  # noqa: E402

from relex_callback import RelexCallback  # noqa: E402
from relex_callback.distributed import UnsupportedSetupError, reset_communication_bytes  # noqa: E402

OBSERVE = 4
TARGETS = [10, 20]


def _full(param: torch.Tensor, full_shape=None) -> torch.Tensor:
    """The full value of a parameter on every process (collective for DTensors)."""
    data = param.data
    if hasattr(data, "full_tensor"):
        return data.full_tensor().detach().float().clone()
    return data.detach().float().clone()


class Recorder(TrainerCallback):
    """Captures the full tracked parameters at θ_0 and every observed step, independently of RELEX."""

    def __init__(self, gather=None) -> None:
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.gather = gather

    def capture(self, model, step: int) -> None:
        if self.gather is not None:
            self.snapshots[step] = self.gather(model)
            return
        self.snapshots[step] = {n: _full(p) for n, p in model.named_parameters() if p.requires_grad}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.capture(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if 0 < state.global_step <= OBSERVE:
            self.capture(model, state.global_step)


def _texts() -> list[str]:
    return [f"{a} + {b} = {a + b}" for a in range(12) for b in range(6)]


def _dataset(tok):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [tok(t)["input_ids"] for t in _texts()]})


def _collate(tok):
    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [tok.pad_token_id] * (width - len(r["input_ids"])) for r in rows])
        labels = ids.masked_fill(ids == tok.pad_token_id, -100)
        return {"input_ids": ids, "labels": labels}

    return collate


def _relex(out: Path, **extra) -> RelexCallback:
    return RelexCallback(observe=OBSERVE, extrapolate_to=TARGETS, buffer_dtype="float32", output_dir=str(out), **extra)


def _dump(out: Path, callback: RelexCallback, recorder: Recorder, final: dict[str, torch.Tensor]) -> None:
    rank = dist.get_rank()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in final.items()}, str(out / f"final-rank{rank}.safetensors"))
    report = callback.reports[TARGETS[-1]]
    info = {
        "buffer_bytes": callback.buffer.nbytes,
        "tracked_elements": sum(item.numel for item in callback.buffer.tracked),
        "kinds": sorted({type(item).__name__ for item in callback.buffer.tracked}),
        "report_buffer": report["buffer"],
        "communication_bytes": report["communication_bytes"],
        "steps": callback.buffer.steps,
        "zero3_persistent": sum(bool(getattr(item.param, "ds_persist", False)) for item in callback.buffer.tracked),
    }
    (out / f"info-rank{rank}.json").write_text(json.dumps(info))
    if rank == 0:
        flat = {f"{step}/{name}": value.contiguous() for step, snap in recorder.snapshots.items() for name, value in snap.items()}
        save_file(flat, str(out / "snapshots.safetensors"))


def _training_args(out: Path, **extra) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=8, per_device_train_batch_size=4, learning_rate=2e-2,
        use_cpu=True, ddp_backend="gloo", report_to=[], save_strategy="no", logging_steps=100,
        remove_unused_columns=False, disable_tqdm=True, seed=0, **extra,
    )


# -- scenarios -----------------------------------------------------------------------------------------------


def scenario_ddp(out: Path) -> None:
    tok = tiny_tokenizer()
    model = tiny_qwen2(tie=True, tokenizer=tok)
    relex, recorder = _relex(out), Recorder()
    trainer = Trainer(model=model, args=_training_args(out), train_dataset=_dataset(tok), data_collator=_collate(tok),
                      processing_class=tok, callbacks=[relex, recorder])
    trainer.train()
    assert trainer.state.global_step == OBSERVE, trainer.state.global_step
    _dump(out, relex, recorder, {n: _full(p) for n, p in model.named_parameters() if p.requires_grad})


def scenario_ddp_disk(out: Path) -> None:
    """DDP with the disk delta store: one θ_0 file and one deltas file per process in ``out/store``."""
    tok = tiny_tokenizer()
    model = tiny_qwen2(tie=True, tokenizer=tok)
    relex, recorder = _relex(out, buffer_device="disk", store_dir=str(out / "store")), Recorder()
    trainer = Trainer(model=model, args=_training_args(out), train_dataset=_dataset(tok), data_collator=_collate(tok),
                      processing_class=tok, callbacks=[relex, recorder])
    trainer.train()
    assert trainer.state.global_step == OBSERVE, trainer.state.global_step
    _dump(out, relex, recorder, {n: _full(p) for n, p in model.named_parameters() if p.requires_grad})


def scenario_ddp_peft(out: Path) -> None:
    from peft import LoraConfig, get_peft_model

    tok = tiny_tokenizer()
    model = get_peft_model(tiny_qwen2(tokenizer=tok),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    relex, recorder = _relex(out, merge_lora=True), Recorder()
    trainer = Trainer(model=model, args=_training_args(out), train_dataset=_dataset(tok), data_collator=_collate(tok),
                      processing_class=tok, callbacks=[relex, recorder])
    trainer.train()
    _dump(out, relex, recorder, {n: _full(p) for n, p in model.named_parameters() if p.requires_grad})
    if dist.get_rank() == 0:  # the base weights, to check the merged model
        save_file({n: p.detach().float().contiguous() for n, p in model.named_parameters() if not p.requires_grad},
                  str(out / "frozen.safetensors"))


def _manual_loop(out: Path, model, tok, relex: RelexCallback, *observers: TrainerCallback, halts: bool = True) -> None:
    """The Trainer's event order (on_train_begin; step; on_optimizer_step; on_step_end; ...; on_train_end) on a
    sharded model."""
    torch.manual_seed(1234 + dist.get_rank())
    args = _training_args(out)
    state, control = TrainerState(), TrainerControl()
    state.max_steps = 8
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    batches = [_collate(tok)([{"input_ids": tok(t)["input_ids"]} for t in _texts()[i * 8 + dist.get_rank() * 4 :][:4]])
               for i in range(8)]
    callbacks = (relex, *observers)
    for cb in callbacks:
        cb.on_train_begin(args, state, control, model=model, processing_class=tok)
    for batch in batches:
        model.train()
        model(**batch).loss.backward()
        optimizer.step()
        for cb in callbacks:
            cb.on_optimizer_step(args, state, control, model=model, optimizer=optimizer)
        optimizer.zero_grad()
        state.global_step += 1
        for cb in callbacks:
            cb.on_step_end(args, state, control, model=model, processing_class=tok, optimizer=optimizer)
        if control.should_training_stop:
            break
    assert state.global_step == (OBSERVE if halts else state.max_steps), state.global_step
    relex.on_train_end(args, state, control, model=model)


def _fsdp2_model(tok):
    from torch.distributed.fsdp import fully_shard

    model = tiny_qwen2(tokenizer=tok)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def scenario_fsdp2(out: Path) -> None:
    tok = tiny_tokenizer()
    model = _fsdp2_model(tok)
    relex, recorder = _relex(out), Recorder()
    _manual_loop(out, model, tok, relex, recorder)
    _dump(out, relex, recorder, {n: _full(p) for n, p in model.named_parameters() if p.requires_grad})


# -- jump mode under sharding ---------------------------------------------------------------------------------


def rank_probe():
    """Raw score 10 + rank before each jump; after it, rank + 0 (first jump: rejected) or rank + 20 (accepted).

    No process sees the mean (10.5, 0.5, 20.5 on 2 processes) unless RELEX averages the scores."""
    calls = []

    def probe(model) -> float:
        calls.append(1)
        if len(calls) % 2:
            return 10.0 + dist.get_rank()
        return dist.get_rank() + (0.0 if len(calls) == 2 else 20.0)

    return probe


def _jump_relex(out: Path, probe=None, **extra) -> RelexCallback:
    return RelexCallback(mode="jump", observe=OBSERVE, jump_every=2, jump_horizon=4, auto_horizon=False,
                         buffer_dtype="float32", output_dir=str(out), probe=probe or rank_probe(), **extra)


def generating_probe(tok):
    """``rank_probe``'s decisions, each after a ``RewardProbe`` generation and a forward pass on the (sharded) model
    whose reward and loss are kept in ``probe.scores``; the processes have different prompts, batch counts and
    completion lengths."""
    decide, reward, scores = rank_probe(), generation_probe(tok, dist.get_rank()), []

    def probe(model) -> float:
        scores.append((reward(model), forward_loss(model, tok)))
        return decide(model)

    probe.scores = scores
    return probe


def _local(param: torch.Tensor) -> torch.Tensor:
    data = param.data
    return (data.to_local() if hasattr(data, "to_local") else data).detach().clone()


class JumpRecorder(TrainerCallback):
    """This process's tensors right after the optimizer step of each jump step (``pre``) and after the RELEX
    callback's on_step_end (``post``): ``grab(model)`` (name → tensor) and the optimizer state of every parameter."""

    def __init__(self, grab) -> None:
        self.grab, self.tensors = grab, {}

    def _save(self, when: str, step: int, model, optimizer) -> None:
        for name, value in self.grab(model).items():
            self.tensors[f"{when}/{step}/{name}"] = value
        if optimizer is None:
            return
        inner = getattr(optimizer, "optimizer", optimizer)
        names = {id(p): n for n, p in model.named_parameters()}
        for param, entries in inner.state.items():
            for key, value in entries.items():
                if id(param) in names and torch.is_tensor(value):
                    self.tensors[f"{when}/{step}/optim/{names[id(param)]}/{key}"] = _local(value).float().reshape(-1)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step + 1 in JUMP_STEPS:
            self._save("pre", state.global_step + 1, model, optimizer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step in JUMP_STEPS:
            self._save("post", state.global_step, model, optimizer)


def _dump_jump(out: Path, relex: RelexCallback, recorder: JumpRecorder) -> None:
    rank = dist.get_rank()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in recorder.tensors.items()}, str(out / f"jump-rank{rank}.safetensors"))
    info = {"history": relex.jump.history, "kinds": sorted({type(t).__name__ for t in relex.buffer.tracked}),
            "tracked": sorted(t.name for t in relex.buffer.tracked), "generated": getattr(relex.probe, "scores", None)}
    (out / f"jump-rank{rank}.json").write_text(json.dumps(info))


def _local_params(model) -> dict[str, torch.Tensor]:
    return {n: _local(p) for n, p in model.named_parameters() if p.requires_grad}


def scenario_ddp_jump(out: Path) -> None:
    tok = tiny_tokenizer()
    model = tiny_qwen2(tie=True, tokenizer=tok)
    relex, recorder = _jump_relex(out, optimizer_policy="reset"), JumpRecorder(_local_params)
    trainer = Trainer(model=model, args=_training_args(out), train_dataset=_dataset(tok), data_collator=_collate(tok),
                      processing_class=tok, callbacks=[relex, recorder])
    trainer.train()
    assert trainer.state.global_step == 8, trainer.state.global_step
    _dump_jump(out, relex, recorder)


def scenario_fsdp2_jump(out: Path) -> None:
    tok = tiny_tokenizer()
    model = _fsdp2_model(tok)
    relex, recorder = _jump_relex(out, optimizer_policy="reset"), JumpRecorder(_local_params)
    _manual_loop(out, model, tok, relex, recorder, halts=False)
    _dump_jump(out, relex, recorder)


def _native_fsdp2_model(out: Path, tok):
    """FSDP2 applied by transformers itself (``from_pretrained(distributed_config=...)``): the one way the real
    Trainer trains an FSDP model on CPU (accelerate's FSDP plugin needs an accelerator, see docs/distributed.md)."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    path = out / "base"
    if dist.get_rank() == 0:
        tiny_qwen2(tokenizer=tok).save_pretrained(path)
    dist.barrier()
    return AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(fsdp_size=dist.get_world_size()),
                                                dtype=torch.float32)


def scenario_fsdp2_trainer(out: Path) -> None:
    tok = tiny_tokenizer()
    model = _native_fsdp2_model(out, tok)
    relex, recorder = _relex(out), Recorder()
    trainer = Trainer(model=model, args=_training_args(out), train_dataset=_dataset(tok), data_collator=_collate(tok),
                      processing_class=tok, callbacks=[relex, recorder])
    trainer.train()
    assert trainer.state.global_step == OBSERVE, trainer.state.global_step
    _dump(out, relex, recorder, {n: _full(p) for n, p in trainer.model.named_parameters() if p.requires_grad})


def _sharded_and_full(model) -> dict[str, torch.Tensor]:
    """Every local shard (read with the sharded parameters registered: after a forward outside training FSDP2 keeps
    the root's gathered) and, under ``full/``, every full parameter (collective)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return {**_local_params(model), **{f"full/{n}": _full(p) for n, p in model.named_parameters()}}


def scenario_fsdp2_trainer_jump(out: Path) -> None:
    tok = tiny_tokenizer()
    model = _native_fsdp2_model(out, tok)
    relex = _jump_relex(out, probe=generating_probe(tok), optimizer_policy="reset")
    recorder = JumpRecorder(_sharded_and_full)
    trainer = Trainer(model=model, args=_training_args(out), train_dataset=_dataset(tok), data_collator=_collate(tok),
                      processing_class=tok, callbacks=[relex, recorder])
    trainer.train()
    assert trainer.state.global_step == 8, trainer.state.global_step
    _dump_jump(out, relex, recorder)


class PoisonOneRank(TrainerCallback):
    """On rank 1 only: a NaN in this process's prediction slice of ``POISONED`` (``"prediction"``), or in its delta
    recorded at step 1, written at step 3 (``"deltas"``)."""

    def __init__(self, relex: RelexCallback, case: str) -> None:
        self.relex, self.case = relex, case

    def on_train_begin(self, args, state, control, **kwargs):
        if self.case != "prediction" or dist.get_rank() != 1:
            return
        engine = self.relex.engine
        apply = engine._apply

        def poisoned(cand, item, base, moved):
            value = apply(cand, item, base, moved)
            if item.name == POISONED:
                value[0] = float("nan")
            return value

        engine._apply = poisoned

    def on_step_end(self, args, state, control, **kwargs):
        if self.case == "deltas" and dist.get_rank() == 1 and state.global_step == 3:
            self.relex.buffer.deltas[POISONED][0, 0] = float("nan")


def one_rank_failing_probe():
    """Scores 1.0, but raises on rank 1 when it scores the jumped weights."""
    calls = []

    def probe(model) -> float:
        calls.append(1)
        if len(calls) == 2 and dist.get_rank() == 1:
            raise RuntimeError("reward server unreachable")
        return 1.0

    return probe


def scenario_ddp_nonfinite(out: Path) -> None:
    """Jump mode under DDP with a fault on rank 1 only at the first jump (step 4): a NaN in its prediction, a NaN in
    its deltas, or a probe that raises. Every process must stop with an error, weights as before the jump."""
    rank = dist.get_rank()
    for case in ("prediction", "deltas", "probe"):
        directory = out / case
        tok = tiny_tokenizer()
        model = tiny_qwen2(tie=True, tokenizer=tok)
        relex = _jump_relex(directory, probe=one_rank_failing_probe() if case == "probe" else None)
        recorder = JumpRecorder(_local_params)
        trainer = Trainer(model=model, args=_training_args(directory), train_dataset=_dataset(tok),
                          data_collator=_collate(tok), processing_class=tok,
                          callbacks=[relex, PoisonOneRank(relex, case), recorder])
        try:
            trainer.train()
            error = None
        except (FloatingPointError, RuntimeError) as err:
            error = f"{type(err).__name__}: {err}"
        tensors = {**recorder.tensors, **{f"final/{n}": _local(p) for n, p in model.named_parameters()}}
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / f"jump-rank{rank}.safetensors"))
        info = {"error": error, "step": trainer.state.global_step, "history": relex.jump.history}
        (directory / f"jump-rank{rank}.json").write_text(json.dumps(info))


def _fsdp1(model, use_orig_params: bool):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    return FSDP(model, use_orig_params=use_orig_params, device_id=torch.device("cpu"),
                auto_wrap_policy=ModuleWrapPolicy({Qwen2DecoderLayer}))


def _fsdp1_full(model) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {k: v.float().clone() for k, v in state.items()} if dist.get_rank() == 0 else None)
    return {k: v for k, v in gathered[0].items() if not k.endswith("rotary_emb.inv_freq")}


def scenario_fsdp1(out: Path) -> None:
    tok = tiny_tokenizer()
    model = _fsdp1(tiny_qwen2(tokenizer=tok), use_orig_params=True)
    relex, recorder = _relex(out), Recorder(gather=_fsdp1_full)
    _manual_loop(out, model, tok, relex, recorder)
    _dump(out, relex, recorder, _fsdp1_full(model))


def scenario_unsupported(out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    out.mkdir(parents=True, exist_ok=True)
    messages = {}
    args = _training_args(out)
    tok = tiny_tokenizer()
    flat = _fsdp1(tiny_qwen2(tokenizer=tok), use_orig_params=False)
    tp = tiny_qwen2(tokenizer=tok)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    proj = tp.model.layers[0].mlp.up_proj
    proj.weight = torch.nn.Parameter(distribute_tensor(proj.weight.data, mesh, [Shard(1)]))
    generating = _fsdp1(tiny_qwen2(tokenizer=tok), use_orig_params=True)
    probed = _jump_relex(out / "fsdp1_generate", probe=generation_probe(tok, dist.get_rank()))
    cases = (("fsdp1_flat", flat, _relex(out / "fsdp1_flat")), ("tensor_parallel", tp, _relex(out / "tensor_parallel")),
             ("fsdp1_generate", generating, probed))
    for label, model, relex in cases:
        try:
            relex.on_train_begin(args, TrainerState(), TrainerControl(), model=model)
        except UnsupportedSetupError as err:
            messages[label] = str(err)
        else:
            messages[label] = None
    (out / f"errors-rank{dist.get_rank()}.json").write_text(json.dumps(messages))


def _zero_config(stage: int, bf16: bool, persistence_threshold: int | None = None) -> dict:
    zero: dict = {"stage": stage}
    if persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
        "zero_optimization": zero, "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False, "bf16": {"enabled": bf16}, "fp16": {"enabled": False},
    }


def _zero_full_fp32(model) -> dict[str, torch.Tensor]:
    """Every trainable parameter's fp32 master copy, assembled by DeepSpeed (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _zero_full_16bit(model) -> dict[str, torch.Tensor]:
    import deepspeed

    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None, enabled=hasattr(param, "ds_id")):
                out[name] = param.data.detach().float().cpu().clone()
    return out


def _scenario_zero(out: Path, stage: int, bf16: bool, persistence_threshold: int | None = None) -> None:
    tok = tiny_tokenizer()
    model = tiny_qwen2(tie=True, tokenizer=tok)
    relex, recorder = _relex(out), Recorder(gather=_zero_full_fp32)
    args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=8, per_device_train_batch_size=4, learning_rate=2e-2,
        report_to=[], save_strategy="no", logging_steps=100, remove_unused_columns=False, disable_tqdm=True, seed=0,
        deepspeed=_zero_config(stage, bf16, persistence_threshold), bf16=bf16, use_cpu=bf16 and not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": tok(t)["input_ids"]} for t in _texts()],
                      data_collator=_collate(tok), processing_class=tok, callbacks=[relex, recorder])
    trainer.train()
    assert trainer.state.global_step == OBSERVE, trainer.state.global_step
    final = {f"fp32/{k}": v for k, v in _zero_full_fp32(trainer.model).items()}
    final.update({f"16bit/{k}": v for k, v in _zero_full_16bit(trainer.model).items()})
    _dump(out, relex, recorder, final)


def _zero_trainer(out: Path, stage: int, callbacks: list, persistence_threshold: int | None = None) -> Trainer:
    tok = tiny_tokenizer()
    model = tiny_qwen2(tie=True, tokenizer=tok)  # built before the ZeRO-3 arguments exist: no zero.Init
    args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=8, per_device_train_batch_size=4, learning_rate=2e-2,
        report_to=[], save_strategy="no", logging_steps=100, remove_unused_columns=False, disable_tqdm=True, seed=0,
        deepspeed=_zero_config(stage, False, persistence_threshold),
    )
    return Trainer(model=model, args=args, data_collator=_collate(tok), processing_class=tok,
                   train_dataset=[{"input_ids": tok(t)["input_ids"]} for t in _texts()], callbacks=callbacks)


def scenario_zero3_jump(out: Path) -> None:
    """Every parameter partitioned (no persistent ones), a probe that generates on the partitioned model."""
    def grab(model):  # the full fp32 masters and the full 16-bit weights (both collective)
        return {**{f"fp32/{k}": v for k, v in _zero_full_fp32(model).items()},
                **{f"16bit/{k}": v for k, v in _zero_full_16bit(model).items()}}

    relex = _jump_relex(out, probe=generating_probe(tiny_tokenizer()))
    recorder = JumpRecorder(grab)
    trainer = _zero_trainer(out, 3, [relex, recorder], persistence_threshold=0)
    trainer.train()
    assert trainer.state.global_step == 8, trainer.state.global_step
    _dump_jump(out, relex, recorder)


def scenario_zero2_jump(out: Path) -> None:
    def grab(model):  # the full fp32 masters (collective) and the 16-bit weights every process holds
        return {**{f"fp32/{k}": v for k, v in _zero_full_fp32(model).items()},
                **{f"16bit/{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}

    relex = _jump_relex(out)
    recorder = JumpRecorder(grab)
    trainer = _zero_trainer(out, 2, [relex, recorder])
    trainer.train()
    assert trainer.state.global_step == 8, trainer.state.global_step
    _dump_jump(out, relex, recorder)


def scenario_zero2_jump_reset(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    trainer = _zero_trainer(out, 2, [_jump_relex(out, optimizer_policy="reset")])
    try:
        trainer.train()
        message = None
    except ValueError as err:
        message = str(err)
    (out / f"errors-rank{dist.get_rank()}.json").write_text(json.dumps({"reset": message}))


def scenario_zero1(out: Path) -> None:
    _scenario_zero(out, 1, bf16=False)


def scenario_zero2(out: Path) -> None:
    _scenario_zero(out, 2, bf16=False)


def scenario_zero2_bf16(out: Path) -> None:
    _scenario_zero(out, 2, bf16=True)


def scenario_zero3(out: Path) -> None:
    _scenario_zero(out, 3, bf16=False, persistence_threshold=0)  # every parameter partitioned between steps


def scenario_zero3_bf16(out: Path) -> None:
    _scenario_zero(out, 3, bf16=True)  # the tiny model's tensors are all below the persistence threshold


def main() -> None:
    out = Path(sys.argv[1])
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    for name in sys.argv[2:]:
        target = out / name
        reset_communication_bytes()  # the counters are per process; count each scenario on its own
        try:
            globals()[f"scenario_{name}"](target)
        except Exception:  # keep going: the test reports the traceback of the failed scenario
            target.mkdir(parents=True, exist_ok=True)
            (target / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    # A native abort (SIGABRT, SIGSEGV) prints every thread's Python stack, so a rare crash can be traced.
    faulthandler.enable(all_threads=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    status = 0
    try:
        main()
    except BaseException:  # e.g. a failed barrier: report it, then leave the same way as on success
        traceback.print_exc()
        status = 1
    # Skip interpreter finalization on every path. A gloo process group still referenced after
    # destroy_process_group() (by a DeviceMesh or a DTensor, for instance) is destructed during finalization while
    # its worker threads may still hold work with Python references, which aborts the process after every result
    # was written ("terminate called without an active exception"; pytorch#179291, pytorch#190489).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
