"""The disk delta store holds and streams exactly what the in-memory buffer holds, and refuses damaged rows.

The fit on the store is compared bit for bit with the fit on the in-memory ``DeltaBuffer`` (same math, same
chunk order), and both with an independent oracle (``torch.linalg.svd`` of deltas formed in float64 from
weights captured by the test).
"""

import json
import os
from pathlib import Path

import pytest
import torch

from _oracle import oracle_prediction
from relex_callback import RelexCallback
from relex_callback.buffer import _RECORD_CHUNK, DeltaBuffer, TrackedTensor
from relex_callback.config import RelexConfig
from relex_callback.engine.engine import RelexEngine
from relex_callback.math.core import combine, fit_trajectory, gram_matrix
from relex_callback.store import DiskDeltaStore, StoreError, StoredStack, store_file_names


def _params(sizes, seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n)) for n in sizes]


def _record_both(tmp_path, dtype, sizes, steps, read_bytes=1 << 12, seed=0):
    """The same trajectory recorded into an in-memory buffer and a disk store (a small read block, so the fit
    crosses many block boundaries); returns both and the float64 weights at every step."""
    params = _params(sizes, seed)
    tracked = [TrackedTensor(f"p{i}", p) for i, p in enumerate(params)]
    memory = DeltaBuffer(tracked, len(steps), dtype, "cpu")
    disk = DiskDeltaStore(tracked, len(steps), dtype, tmp_path / "store", read_bytes=read_bytes)
    memory.capture_base()
    disk.capture_base()
    history = [[p.detach().double().clone() for p in params]]
    generator = torch.Generator().manual_seed(seed + 1)
    direction = [torch.randn(p.shape, generator=generator) for p in params]
    for step in steps:
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.add_(1e-2 * v + 1e-3 * torch.randn(p.shape, generator=generator))
        memory.record(step)
        disk.record(step)
        history.append([p.detach().double().clone() for p in params])
    return memory, disk, history


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_store_streams_bit_identical_grams_and_combinations(tmp_path, dtype):
    sizes = (_RECORD_CHUNK + 4099, 7, 3000)  # a tensor wider than a record chunk, a tiny one, one between
    steps = [1.0, 2.0, 4.0, 5.0, 7.0]
    memory, disk, history = _record_both(tmp_path, dtype, sizes, steps)
    for i in range(len(sizes)):
        name = f"p{i}"
        stored = disk.stack(name)
        assert isinstance(stored, StoredStack) and stored.shape == memory.stack(name).shape
        assert torch.equal(stored.to(torch.float32), memory.stack(name).to(torch.float32))
        for window in (None, 3):
            g_mem, g_disk = gram_matrix(memory.stack(name, window)), gram_matrix(disk.stack(name, window))
            assert torch.equal(g_mem, g_disk)
            weights = torch.randn(2, g_mem.shape[0], dtype=torch.float64)
            assert torch.equal(combine(memory.stack(name, window), weights), combine(disk.stack(name, window), weights))
    # the whole fit + prediction against an independent oracle on float64 deltas
    grams = [(name, g) for (_, g), name in zip(disk.grams(), disk.names)]
    fit = fit_trajectory(grams, steps, [12.0])
    for i, tensor_fit in enumerate(fit.tensors):
        predicted = disk.theta0[f"p{i}"].double() + combine(disk.stack(f"p{i}"), tensor_fit.weights).double()[0]
        deltas = torch.stack([h[i] - history[0][i] for h in history[1:]])
        expected = history[0][i] + oracle_prediction(deltas, steps, 12.0)
        scale = float(expected.sub(history[0][i]).abs().max())
        rounding = 1e-2 if dtype == "bfloat16" else 1e-5  # bf16 stored deltas vs exact float64 ones
        assert float((predicted - expected).abs().max()) <= rounding * scale


def test_store_file_layout_and_rolling_rows(tmp_path):
    memory, disk, _ = _record_both(tmp_path, "float16", (100, 3), [1.0, 2.0, 3.0, 4.0])
    base_name, deltas_name = store_file_names(0, 1)
    assert (tmp_path / "store" / base_name).is_file() and (tmp_path / "store" / deltas_name).is_file()
    assert not list((tmp_path / "store").glob("*.tmp"))
    disk.flush()
    size = os.path.getsize(tmp_path / "store" / deltas_name)
    assert size == disk.data_start + 4 * disk.record_bytes  # each row appended exactly once
    disk.keep_rows([1, 3])
    memory.keep_rows([1, 3])
    assert disk.steps == memory.steps == [2.0, 4.0] and disk.rows == [1, 3]
    assert torch.equal(disk.stack("p0").to(torch.float32), memory.stack("p0").to(torch.float32))
    assert os.path.getsize(tmp_path / "store" / deltas_name) == size  # logical drop: the file keeps the rows


def test_rows_that_left_the_window_are_reused_except_the_last_checkpoints(tmp_path):
    """Jump mode's rolling window: 3 rows live, a checkpoint after each 4 records; over 30 records the file never
    holds more than 2 × 3 rows, every stack equals an in-memory rolling buffer's, the latest checkpoint resumes
    bit for bit, and an older checkpoint whose row was reused is refused with that explanation."""
    capacity, params = 3, _params((50, 7))
    tracked = [TrackedTensor(f"p{i}", p) for i, p in enumerate(params)]
    memory = DeltaBuffer(tracked, capacity, "float32", "cpu")
    disk = DiskDeltaStore(tracked, capacity, "float32", tmp_path / "store", read_bytes=256)
    memory.capture_base()
    disk.capture_base()
    generator = torch.Generator().manual_seed(3)
    references, rows_on_disk = [], []
    for step in range(1, 31):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=generator))
        for buffer in (memory, disk):
            if len(buffer) == capacity:
                buffer.drop_oldest(capacity - 1)
            buffer.record(float(step))
        if step % 4 == 0:
            references.append((dict(disk.reference()), [memory.stack(n).clone() for n in ("p0", "p1")]))
        disk.flush()
        rows_on_disk.append((os.path.getsize(disk.deltas_path) - disk.data_start) // disk.record_bytes)
        assert disk.steps == memory.steps
        for name in ("p0", "p1"):
            assert torch.equal(disk.stack(name).to(torch.float32), memory.stack(name)), (step, name)
    assert max(rows_on_disk) == 2 * capacity  # without reuse: 30
    assert len(set(disk.rows)) == capacity and max(disk.rows) < 2 * capacity

    def resume(reference):
        fresh = DiskDeltaStore(tracked, capacity, "float32", tmp_path / "store", read_bytes=256)
        fresh.load_reference(reference, keep=len(reference["rows"]), checkpoint=tmp_path / "checkpoint")
        return fresh

    latest, stacks = references[-1]
    restored = resume(latest)
    for name, expected in zip(("p0", "p1"), stacks):
        assert torch.equal(restored.stack(name).to(torch.float32), expected)
    restored.close()
    oldest, _ = references[0]  # its rows were reused by later snapshots
    with pytest.raises(StoreError, match=r"now holds step .* reused its row.*Resume from the latest checkpoint"):
        resume(oldest)


# -- end to end: Trainer, checkpoints that reference the store, resume, damage ---------------------------------------


def _lm_trainer(out, tok, callbacks, save_total_limit=None):
    from _tiny import lm_trainer

    trainer = lm_trainer(out, tok, callbacks)
    trainer.args.save_total_limit = save_total_limit
    return trainer


DISK = dict(observe=10, extrapolate_to=40, save_model=False, buffer_dtype="float32", buffer_device="disk")


def test_disk_store_run_equals_memory_run_and_checkpoints_copy_no_deltas(tmp_path, tok):
    memory_run = _lm_trainer(tmp_path / "mem", tok, [RelexCallback(**{**DISK, "buffer_device": "cpu"})])
    memory_run.train()
    disk_cb = RelexCallback(**DISK)
    disk_run = _lm_trainer(tmp_path / "disk", tok, [disk_cb])
    disk_run.train()
    for (name, a), (_, b) in zip(memory_run.model.named_parameters(), disk_run.model.named_parameters()):
        assert torch.equal(a, b), name  # bit for bit
    assert disk_cb.reports[40]["buffer"]["device"] == "disk"
    store = tmp_path / "disk" / "relex-store"
    from safetensors.torch import load_file

    theta0 = load_file(str(store / "base-rank00000-of-00001.safetensors"))
    assert set(theta0) == {n for n, _ in disk_run.model.named_parameters()}
    # negative control: the equal models are not trivially θ_0 (training and the extrapolation moved them)
    assert any(not torch.equal(p.detach(), theta0[n]) for n, p in disk_run.model.named_parameters())
    assert (store / "deltas-rank00000-of-00001.bin").is_file()
    ref_sizes = [os.path.getsize(tmp_path / "disk" / f"checkpoint-{s}" / "relex_state.safetensors") for s in (4, 8)]
    mem_sizes = [os.path.getsize(tmp_path / "mem" / f"checkpoint-{s}" / "relex_state.safetensors") for s in (4, 8)]
    assert max(ref_sizes + mem_sizes) < 20_000  # a reference: no θ_0, no deltas (the in-memory buffer: relex-rows)
    # the pre-flight estimate (logged at train begin) bounds what the store really used on disk, within a header
    estimate = disk_cb.engine.preflight
    on_disk = sum(f.stat().st_size for f in store.iterdir())
    assert estimate.disk_bytes - 8192 - 256 * len(theta0) <= on_disk <= estimate.disk_bytes
    assert disk_cb.reports[40]["buffer"]["preflight"]["disk_bytes"] == estimate.disk_bytes


def test_disk_store_resume_is_bit_exact_after_rotation(tmp_path, tok):
    straight = _lm_trainer(tmp_path / "a", tok, [RelexCallback(**DISK)])
    straight.train()
    reference = {n: p.detach().clone() for n, p in straight.model.named_parameters()}

    from _tiny import StopAt

    first = _lm_trainer(tmp_path / "b", tok, [RelexCallback(**DISK), StopAt(9)], save_total_limit=1)
    first.train()
    assert not (tmp_path / "b" / "checkpoint-4").exists()  # rotated away; the rows it covered stay in the store
    state = tmp_path / "b" / "checkpoint-8" / "relex_state.safetensors"
    from safetensors import safe_open

    with safe_open(str(state), framework="pt") as handle:
        meta = handle.metadata()
        assert list(handle.keys()) == []
    ref = json.loads(meta["store"])
    assert ref["steps"] == [float(s) for s in range(1, 9)] and len(ref["row_crc32"]) == 8
    resumed = _lm_trainer(tmp_path / "b", tok, [RelexCallback(**DISK)], save_total_limit=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-8"))
    assert resumed.state.global_step == 10
    for name, param in resumed.model.named_parameters():
        assert torch.equal(param.detach(), reference[name]), name


@pytest.mark.parametrize("damage", ["truncated", "flipped", "base"])
def test_damaged_store_is_refused_with_the_file_and_the_fix(tmp_path, tok, damage):
    from _damage import damage_rows
    from _tiny import StopAt

    first = _lm_trainer(tmp_path, tok, [RelexCallback(**DISK), StopAt(8)])
    first.train()
    expected, named = damage_rows(tmp_path / "relex-store", damage)
    resumed = _lm_trainer(tmp_path, tok, [RelexCallback(**DISK)])
    with pytest.raises(StoreError, match=expected) as info:
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
    assert str(named) in str(info.value) and "Resume from a checkpoint whose store is intact" in str(info.value)


def test_half_written_row_after_the_checkpoint_is_cut_and_recording_continues(tmp_path, tok):
    # a crash in the middle of an append leaves a partial record after the rows the checkpoint covers
    from _tiny import StopAt

    _lm_trainer(tmp_path, tok, [RelexCallback(**DISK), StopAt(8)]).train()
    deltas = tmp_path / "relex-store" / "deltas-rank00000-of-00001.bin"
    with open(deltas, "ab") as handle:
        handle.write(b"RLXROW01" + b"\x00" * 500)
    resumed_cb = RelexCallback(**DISK)
    resumed = _lm_trainer(tmp_path, tok, [resumed_cb])
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
    assert resumed.state.global_step == 10 and resumed_cb.buffer.steps == [float(s) for s in range(1, 11)]
    assert os.path.getsize(deltas) == resumed_cb.buffer.data_start + 10 * resumed_cb.buffer.record_bytes


def test_missing_store_and_device_mismatch_are_refused(tmp_path, tok):
    from _tiny import StopAt

    first = _lm_trainer(tmp_path, tok, [RelexCallback(**DISK), StopAt(4)])
    first.train()
    mismatched = _lm_trainer(tmp_path, tok, [RelexCallback(**{**DISK, "buffer_device": "cpu"})])
    with pytest.raises(ValueError, match="buffer_device='disk'.*resume with the same setting"):
        mismatched.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    (tmp_path / "relex-store").rename(tmp_path / "moved")
    resumed = _lm_trainer(tmp_path, tok, [RelexCallback(**DISK)])
    with pytest.raises(StoreError, match="does not exist.*point store_dir at where it is now"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_store_options_are_validated():
    with pytest.raises(ValueError, match=r"^store_dir='x' is the folder of the disk delta store; pass buffer_device='disk'"):
        RelexConfig(observe=10, extrapolate_to=20, store_dir="x")
    assert RelexConfig(observe=10, extrapolate_to=20, buffer_device="disk", store_dir=Path("/tmp/s")).store_dir == "/tmp/s"
    with pytest.raises(TypeError, match="^store_dir must be a str or os.PathLike path, got int"):
        RelexConfig(observe=10, extrapolate_to=20, buffer_device="disk", store_dir=3)


def test_store_under_a_file_and_over_the_memory_budget_are_refused_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    model = torch.nn.Linear(4, 4)
    engine = RelexEngine(RelexConfig(observe=4, extrapolate_to=8, buffer_device="disk", store_dir=str(blocker / "store")))
    with pytest.raises(NotADirectoryError, match="^store_dir=.* is under .*, which is a file"):
        engine.attach(model)
    engine = RelexEngine(RelexConfig(observe=4, extrapolate_to=8, buffer_device="disk", buffer_max_bytes=10,
                                     store_dir=str(tmp_path / "s")))
    with pytest.raises(MemoryError, match="disk store needs .* of host memory"):
        engine.attach(model)
    assert not (tmp_path / "s").exists()


def test_preflight_estimate_against_hand_arithmetic(caplog):
    import logging

    from relex_callback.preflight import FIT_SECONDS_PER_GRAM_MAC, FIT_SECONDS_PER_STORED_BYTE, preflight
    from relex_callback.store import FIT_READ_BYTES

    numels = [1000, 24]
    memory = preflight(numels, RelexConfig(observe=10, extrapolate_to=20), world_size=4)
    assert memory.memory_bytes == 1024 * (10 * 2 + 4)  # θ_0 in fp32 + T bf16 rows
    # the run's row file (relex-rows): θ_0 and each row once, like the disk store; a checkpoint adds a reference
    assert memory.disk_bytes == 1024 * 4 + 10 * (40 + 1024 * 2) + 8192 + 256 * 2
    assert memory.checkpoint_bytes < 20_000 and memory.write_bytes_per_snapshot == 1024 * 2
    disk = preflight(numels, RelexConfig(observe=10, extrapolate_to=20, buffer_device="disk", buffer_dtype="float16"))
    assert disk.memory_bytes == 1024 * (4 + 2) + FIT_READ_BYTES
    assert disk.disk_bytes == 1024 * 4 + 10 * (40 + 1024 * 2) + 8192 + 256 * 2
    jump = preflight(numels, RelexConfig(mode="jump", observe=10, buffer_device="disk", buffer_dtype="float16"))
    assert jump.disk_bytes == 1024 * 4 + 2 * 10 * (40 + 1024 * 2) + 8192 + 256 * 2  # the last checkpoint's rows too
    assert disk.write_bytes_per_snapshot == 2048 and disk.checkpoint_bytes < 20_000
    assert disk.fit_seconds == pytest.approx(FIT_SECONDS_PER_STORED_BYTE * 10 * 2048 + FIT_SECONDS_PER_GRAM_MAC * 100 * 1024)
    # attach logs it before any buffer is allocated, also when the budget then refuses the buffer
    engine = RelexEngine(RelexConfig(observe=4, extrapolate_to=8, buffer_max_bytes=10))
    with caplog.at_level(logging.INFO, logger="relex_callback"), pytest.raises(MemoryError):
        engine.attach(torch.nn.Linear(4, 4))
    assert "RELEX pre-flight (auto buffer" in caplog.text and engine.buffer is None
