"""Checkpoints of an in-memory buffer reference rows written once per run (``{output_dir}/relex-rows``).

Real ``Trainer`` runs on the tiny Llama of ``tests/_tiny.py`` with real safetensors checkpoints: the RELEX state
left on disk across all checkpoints of a run is measured against one copy of the buffer (θ_0 in fp32 + T rows),
resumed runs are compared bit for bit with uninterrupted ones, and damaged, missing or replaced rows are refused
with the file and the fix. Format-1 states (θ_0 and the deltas inline, written by older versions) still resume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from _damage import damage_rows
from _tiny import StopAt, lm_trainer
from relex_callback import RelexCallback
from relex_callback.config import RelexConfig
from relex_callback.engine.engine import RelexEngine
from relex_callback.store import StoreError

HALT = dict(observe=10, extrapolate_to=40, save_model=False, buffer_dtype="float32")
ROWS = "relex-rows"


def relex_state_bytes(out: Path) -> int:
    """Bytes of RELEX state a run left on disk: every checkpoint's ``relex_state*`` files and the run's row file."""
    files = list(out.glob("checkpoint-*/relex_state*")) + list((out / ROWS).glob("*"))
    return sum(f.stat().st_size for f in files)


def weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def assert_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name


def test_halt_run_state_across_checkpoints_costs_one_buffer_and_resumes_bit_exact(tmp_path, tok):
    straight_cb = RelexCallback(**HALT)
    straight = lm_trainer(tmp_path / "a", tok, [straight_cb], save_steps=2)
    straight.train()
    checkpoints = sorted((tmp_path / "a").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == [f"checkpoint-{s}" for s in (10, 2, 4, 6, 8)]  # sorted as text
    buffer_bytes = straight_cb.buffer.nbytes  # θ_0 (fp32) + T = 10 rows: one copy of the buffer
    total = relex_state_bytes(tmp_path / "a")
    # each row once (format 1 held θ_0 and every row so far in each of the 5 checkpoints: about 3.2x)
    assert buffer_bytes <= total <= 1.5 * buffer_bytes, (total, buffer_bytes)
    assert all(os.path.getsize(c / "relex_state.safetensors") < 20_000 for c in checkpoints)
    expected = weights(straight)

    # killed after step 7 with only the newest checkpoint kept: the rows of rotated checkpoints stay in relex-rows
    lm_trainer(tmp_path / "b", tok, [RelexCallback(**HALT), StopAt(7)], save_steps=2, save_total_limit=1).train()
    assert [c.name for c in (tmp_path / "b").glob("checkpoint-*")] == ["checkpoint-6"]
    shutil.copytree(tmp_path / "b" / "checkpoint-6", tmp_path / "c" / "checkpoint-6")  # for the negative control
    resumed_cb = RelexCallback(**HALT)
    resumed = lm_trainer(tmp_path / "b", tok, [resumed_cb], save_steps=2, save_total_limit=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-6"))
    assert resumed_cb.buffer.steps == [float(s) for s in range(1, 11)]
    assert_equal(weights(resumed), expected)  # the extrapolation, bit for bit
    assert relex_state_bytes(tmp_path / "b") <= 1.5 * buffer_bytes
    # negative control: the comparison sees a window restarted at the checkpoint
    (tmp_path / "c" / "checkpoint-6" / "relex_state.safetensors").unlink()
    restarted = lm_trainer(tmp_path / "c", tok, [RelexCallback(**{**HALT, "start_step": 6})], save_steps=100)
    restarted.train(resume_from_checkpoint=str(tmp_path / "c" / "checkpoint-6"))
    assert max(float((restarted.model.get_parameter(n) - v).abs().max()) for n, v in expected.items()) > 1e-4


@pytest.mark.parametrize("buffer", ["thinned", "window"])
def test_jump_mode_rows_are_reused_once_rotated_and_resume_is_bit_exact(tmp_path, tok, buffer):
    """Jump mode drops rows (thinning or a rolling window): a row no checkpoint on disk references is rewritten, so
    with save_total_limit=1 the row file holds at most the window's rows and those of the previous checkpoint."""
    options = dict(mode="jump", observe=4, jump_every=4, jump_horizon=4, buffer_dtype="float32",
                   **(dict(max_snapshots=4) if buffer == "thinned" else dict(window=4)))
    straight_cb = RelexCallback(**options)
    straight = lm_trainer(tmp_path / "a", tok, [straight_cb], max_steps=16, save_steps=2, save_total_limit=1)
    straight.train()
    assert [r["status"] for r in straight_cb.jump.history] == ["accepted"] * 4
    capacity, buffer_bytes = straight_cb.buffer.capacity, straight_cb.buffer.nbytes
    rows_file = tmp_path / "a" / ROWS / "deltas-rank00000-of-00001.bin"
    store = straight_cb.engine.buffer.rows_file.file
    slots = (os.path.getsize(rows_file) - store.data_start) // store.record_bytes
    recorded = 16 if buffer == "window" else 10  # snapshots taken over the run (thinning doubles the interval)
    assert capacity < slots <= capacity + 2 < recorded  # reused: without reuse every recorded snapshot has a slot
    assert relex_state_bytes(tmp_path / "a") <= 1.5 * buffer_bytes
    expected = weights(straight)

    lm_trainer(tmp_path / "b", tok, [RelexCallback(**options), StopAt(11)], max_steps=16, save_steps=2,
               save_total_limit=1).train()
    resumed = lm_trainer(tmp_path / "b", tok, [RelexCallback(**options)], max_steps=16, save_steps=2, save_total_limit=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-10"))
    assert_equal(weights(resumed), expected)


@pytest.mark.parametrize("how", ["deleted", "truncated", "flipped", "base"])
def test_missing_or_damaged_rows_are_refused_with_the_file_and_the_fix(tmp_path, tok, how):
    lm_trainer(tmp_path, tok, [RelexCallback(**HALT), StopAt(4)], save_steps=2).train()
    expected, named = damage_rows(tmp_path / ROWS, how)
    with pytest.raises(StoreError, match=expected) as info:
        lm_trainer(tmp_path, tok, [RelexCallback(**HALT)], save_steps=2).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert str(named) in str(info.value) and "set start_step to this checkpoint's step" in str(info.value)
    assert not (tmp_path / "checkpoint-6").exists()


def test_rows_replaced_by_another_run_are_refused(tmp_path, tok):
    lm_trainer(tmp_path, tok, [RelexCallback(**HALT), StopAt(4)], save_steps=2).train()
    kept = tmp_path / "kept-checkpoint-4"
    shutil.copytree(tmp_path / "checkpoint-4", kept)
    lm_trainer(tmp_path, tok, [RelexCallback(**HALT), StopAt(2)], save_steps=2, seed=1).train()  # a new θ_0
    with pytest.raises(StoreError, match="SHA-256 differs") as info:
        lm_trainer(tmp_path / "resumed", tok, [RelexCallback(**HALT)], save_steps=100,
                   resume_from_checkpoint=str(kept)).train(resume_from_checkpoint=str(kept))
    assert str(tmp_path / ROWS / "base-rank00000-of-00001.safetensors") in str(info.value)


def test_damaged_state_metadata_is_refused(tmp_path, tok):
    lm_trainer(tmp_path, tok, [RelexCallback(**HALT), StopAt(4)], save_steps=2).train()
    state = tmp_path / "checkpoint-4" / "relex_state.safetensors"
    raw = bytearray(state.read_bytes())
    at = raw.index(b'"steps"')
    raw[at + 12] ^= 0x01  # a digit of a step: still valid JSON, wrong state
    state.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="fails its CRC-32 check.*Resume from an earlier checkpoint") as info:
        lm_trainer(tmp_path, tok, [RelexCallback(**HALT)], save_steps=2).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert str(state) in str(info.value)


def test_format_1_inline_state_of_older_versions_still_resumes_bit_exact(tmp_path, tok):
    straight = lm_trainer(tmp_path / "a", tok, [RelexCallback(**HALT)], save_steps=2)
    straight.train()
    lm_trainer(tmp_path / "b", tok, [RelexCallback(**HALT), StopAt(4)], save_steps=2).train()
    checkpoint = tmp_path / "b" / "checkpoint-4"
    state = checkpoint / "relex_state.safetensors"
    engine = RelexEngine(RelexConfig(**HALT))
    engine.attach(lm_trainer(tmp_path / "x", tok, []).model)
    engine.load_state(state, engine.read_state_metadata(state), 4)
    # what the older writer put into checkpoint-N: θ_0 and the deltas inline, with per-tensor CRC-32s
    import zlib

    from relex_callback.store import byte_view

    tensors = engine.buffer.state_tensors()
    metadata = {"format_version": "1", "steps": json.dumps(engine.buffer.steps), "config": json.dumps(engine.config.to_dict()),
                "rank": "0", "world_size": "1",
                "crc32": json.dumps({name: zlib.crc32(byte_view(t)) for name, t in tensors.items()})}
    save_file(tensors, str(state), metadata=metadata)
    shutil.rmtree(tmp_path / "b" / ROWS)  # format 1 needs no row file
    with safe_open(str(state), framework="pt") as handle:
        assert handle.metadata()["format_version"] == "1" and len(list(handle.keys())) > 0
    resumed = lm_trainer(tmp_path / "b", tok, [RelexCallback(**HALT)], save_steps=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert_equal(weights(resumed), weights(straight))


@pytest.mark.parametrize("options", [
    dict(fit="poly2", observe=4, extrapolate_to=40),  # snapshot_every=2 leaves T = 2 < 3, which the config refuses
    dict(fit="poly2", rank=2, observe=6, extrapolate_to=40),
    dict(observe=10, rank=4, extrapolate_to=40),
    dict(mode="jump", observe=4, max_snapshots=16),
])
def test_every_setting_the_budget_error_suggests_is_accepted_and_fits(options):
    from relex_callback.buffer import DeltaBuffer

    model = torch.nn.Linear(64, 64)
    numels = [p.numel() for p in model.parameters()]
    capacity = RelexConfig(**options).buffer_capacity
    budget = DeltaBuffer.bytes_needed(numels, capacity, "bfloat16")  # fits in bf16, not in fp32
    engine = RelexEngine(RelexConfig(buffer_dtype="float32", buffer_max_bytes=budget, **options))
    with pytest.raises(MemoryError, match="settings that fit") as info:
        engine.attach(model)
    suggested = re.findall(r"buffer_dtype='(\w+)', snapshot_every=(\d+)", str(info.value))
    assert suggested
    for dtype, every in suggested:
        accepted = RelexConfig(**{**options, "buffer_dtype": dtype, "snapshot_every": int(every)})  # no refusal
        assert DeltaBuffer.bytes_needed(numels, accepted.buffer_capacity, dtype) <= budget, (dtype, every)


def test_budget_error_sizes_jump_mode_by_its_buffer_capacity():
    from relex_callback.buffer import DeltaBuffer

    model = torch.nn.Linear(64, 64)
    numels = [p.numel() for p in model.parameters()]
    options = dict(mode="jump", observe=4, max_snapshots=16)  # the buffer holds 16 rows, not observe // every = 4
    budget = DeltaBuffer.bytes_needed(numels, 8, "bfloat16")  # not even 16 bf16 rows fit
    engine = RelexEngine(RelexConfig(buffer_dtype="float32", buffer_max_bytes=budget, **options))
    with pytest.raises(MemoryError, match="fewer tracked tensors") as info:
        engine.attach(model)
    assert "settings that fit" not in str(info.value)


def test_checkpoint_copied_beside_another_runs_rows_uses_its_own(tmp_path, tok):
    straight = lm_trainer(tmp_path / "a", tok, [RelexCallback(**HALT)], save_steps=2)
    straight.train()
    lm_trainer(tmp_path / "b", tok, [RelexCallback(**HALT), StopAt(4)], save_steps=2).train()
    lm_trainer(tmp_path / "c", tok, [RelexCallback(**HALT), StopAt(2)], save_steps=2, seed=1).train()  # other rows
    shutil.copytree(tmp_path / "b" / "checkpoint-4", tmp_path / "c" / "checkpoint-4")
    resumed_cb = RelexCallback(**HALT)
    resumed = lm_trainer(tmp_path / "c", tok, [resumed_cb], save_steps=100)
    resumed.train(resume_from_checkpoint=str(tmp_path / "c" / "checkpoint-4"))
    assert_equal(weights(resumed), weights(straight))
