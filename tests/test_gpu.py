"""The delta buffer's device branches: on CUDA (skipped without it), and every branch reachable on a CPU.

CUDA: a buffer on the parameters' GPU (``buffer_device="param"``, the fused one-kernel delta), a pinned host
buffer (``buffer_device="cpu"``), and the budget taken from ``torch.cuda.mem_get_info`` (real, then faked small).
``benchmarks/gpu_check.sh`` runs this module on a GPU machine. Expected deltas come from plain fp64 subtraction.
"""

from __future__ import annotations

import pytest
import torch

from relex_callback.buffer import write_delta
from relex_callback.config import RelexConfig
from relex_callback.engine import RelexEngine, plan_buffer

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is False); "
                          "run on a GPU machine: bash benchmarks/gpu_check.sh")


def _engine(model: torch.nn.Module, steps: int = 3, **options) -> tuple[RelexEngine, list[dict[str, torch.Tensor]]]:
    """Attach, capture θ_0 and record ``steps`` random moves; returns the engine and the weights at each step."""
    engine = RelexEngine(RelexConfig(**{"observe": steps, "extrapolate_to": 2 * steps, "buffer_dtype": "float32", **options}))
    engine.attach(model)
    engine.capture_base(0)
    seen = [{n: p.detach().double().cpu().clone() for n, p in model.named_parameters()}]
    generator = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator).to(param.device, param.dtype))
        engine.record(step)
        seen.append({n: p.detach().double().cpu().clone() for n, p in model.named_parameters()})
    return engine, seen


def _assert_deltas(engine: RelexEngine, seen: list[dict[str, torch.Tensor]]) -> None:
    for item in engine.tracked:
        assert torch.equal(engine.buffer.theta0[item.name].double().cpu(), seen[0][item.name].reshape(-1)), item.name
        for row in range(len(seen) - 1):
            expected = (seen[row + 1][item.name] - seen[0][item.name]).reshape(-1).float()
            assert torch.equal(engine.buffer.deltas[item.name][row].cpu(), expected), (item.name, row)


# -- CUDA -----------------------------------------------------------------------------------------------------


@CUDA
@pytest.mark.gpu
def test_buffer_on_the_parameters_gpu_records_exact_deltas():
    engine, seen = _engine(torch.nn.Linear(64, 32).cuda(), buffer_device="param")
    assert all(t.is_cuda for t in (*engine.buffer.theta0.values(), *engine.buffer.deltas.values()))
    _assert_deltas(engine, seen)


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("param_dtype, out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                    (torch.float32, torch.float16)])
def test_fused_delta_kernel_on_cuda_is_bit_identical_to_the_chunked_cpu_path(param_dtype, out_dtype):
    current = torch.randn(300_000, generator=torch.Generator().manual_seed(1)).to(param_dtype)
    base = torch.randn(300_000, generator=torch.Generator().manual_seed(2))
    on_cpu = torch.empty(300_000, dtype=out_dtype)
    write_delta(current, base, on_cpu, [], fused=False)
    on_gpu = torch.empty(300_000, dtype=out_dtype, device="cuda")
    write_delta(current.cuda(), base.cuda(), on_gpu, [])  # fused by default off the CPU
    assert torch.equal(on_gpu.cpu(), on_cpu)


@CUDA
@pytest.mark.gpu
def test_host_buffer_of_a_gpu_model_is_pinned_and_exact():
    engine, seen = _engine(torch.nn.Linear(64, 32).cuda(), buffer_device="cpu")
    for tensor in (*engine.buffer.theta0.values(), *engine.buffer.deltas.values()):
        assert tensor.device.type == "cpu" and tensor.is_pinned()
    _assert_deltas(engine, seen)


@CUDA
@pytest.mark.gpu
def test_cuda_memory_budget_places_spills_and_refuses(monkeypatch, caplog):
    engine, _ = _engine(torch.nn.Linear(64, 32).cuda(), buffer_device="auto")  # the real free memory: fits
    assert all(t.is_cuda for t in engine.buffer.deltas.values())
    free = 1000  # bytes "free" on the GPU: half of it is far below the buffer
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free, 10 * free))
    spilled, seen = _engine(torch.nn.Linear(64, 32).cuda(), buffer_device="auto")
    assert all(t.device.type == "cpu" and t.is_pinned() for t in spilled.buffer.deltas.values())
    _assert_deltas(spilled, seen)
    refused = RelexEngine(RelexConfig(observe=3, extrapolate_to=6, buffer_dtype="float32", buffer_device="param"))
    with pytest.raises(MemoryError, match=r"but the GPU budget is 500 B \(buffer_max_bytes=None\)\. .*buffer_device='cpu'"):
        refused.attach(torch.nn.Linear(64, 32).cuda())
    assert refused.buffer is None


# -- the same branches without CUDA -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "param", "auto"])
def test_host_buffer_of_a_cpu_model_is_exact(device):
    engine, seen = _engine(torch.nn.Linear(64, 32), buffer_device=device)
    assert engine.buffer.device == ("param" if device == "param" else "cpu")  # "auto" of a CPU model: the host
    for tensor in (*engine.buffer.theta0.values(), *engine.buffer.deltas.values()):
        assert tensor.device.type == "cpu"
    _assert_deltas(engine, seen)


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_host_buffer_of_a_cpu_model_is_pinned_when_cuda_is_present(device):
    """README: ``buffer_device="cpu"`` is host memory, pinned when CUDA is present (a CPU model's "auto" is "cpu").
    Without CUDA no memory can be pinned, so this is skipped there rather than asserting ``not is_pinned()``."""
    engine, seen = _engine(torch.nn.Linear(64, 32), buffer_device=device)
    assert engine.buffer.device == "cpu"
    for tensor in (*engine.buffer.theta0.values(), *engine.buffer.deltas.values()):
        assert tensor.device.type == "cpu" and tensor.is_pinned()
    _assert_deltas(engine, seen)


def test_a_small_host_budget_refuses_before_any_buffer_is_allocated():
    needed = (64 * 32 + 32) * (3 * 4 + 4)  # elements × (T fp32 deltas + fp32 θ_0)
    engine = RelexEngine(RelexConfig(observe=3, extrapolate_to=6, buffer_dtype="float32", buffer_device="cpu",
                                     buffer_max_bytes=needed - 1))
    with pytest.raises(MemoryError) as refused:
        engine.attach(torch.nn.Linear(64, 32))
    message = str(refused.value)
    assert message.startswith(f"the RELEX delta buffer needs {needed / 1024:.1f} KiB but the host budget is ")
    assert f"(buffer_max_bytes={needed - 1})" in message and "buffer_dtype='bfloat16', snapshot_every=1" in message
    assert "buffer_device='cpu'" not in message  # already on the host: not offered as a fix
    assert engine.buffer is None
    engine = RelexEngine(RelexConfig(observe=3, extrapolate_to=6, buffer_dtype="float32", buffer_device="cpu",
                                     buffer_max_bytes=needed))
    assert engine.attach(torch.nn.Linear(64, 32)).nbytes == needed  # control: exactly the budget fits


def test_gpu_budget_message_offers_the_host_buffer():
    """The GPU plan of a buffer that does not fit half the (fake) free GPU memory with ``buffer_device="param"``:
    refused, with the host buffer among the fixes."""
    config = RelexConfig(observe=3, extrapolate_to=6, buffer_dtype="float32", buffer_device="param")
    plan = plan_buffer(config, [2080], on_gpu=True, gpu_free=1000, host_free=10**9)
    assert (plan.device, plan.where, plan.budget, plan.fits) == ("param", "GPU", 500, False)
    message = RelexEngine(config)._budget_message(plan, [2080])
    assert "but the GPU budget is 500 B" in message and "buffer_device='cpu' (host memory)" in message
