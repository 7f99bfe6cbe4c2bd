"""DeltaBuffer records exactly what an independent θ_t − θ_0 gives, across chunk boundaries."""

import pytest
import torch

from relex_callback.buffer import _RECORD_CHUNK, DeltaBuffer, TrackedTensor, write_delta


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_record_equals_independent_deltas(dtype):
    torch.manual_seed(0)
    sizes = (2 * _RECORD_CHUNK + 17, 5, 1000)
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    buffer = DeltaBuffer([TrackedTensor(f"p{i}", p) for i, p in enumerate(params)], 2, dtype, "cpu")
    buffer.capture_base()
    base = [p.detach().clone() for p in params]
    for step in (1, 2):
        with torch.no_grad():
            for p in params:
                p.add_(0.01 * torch.randn_like(p))
        buffer.record(step)
        for i, p in enumerate(params):
            expected = (p.detach() - base[i]).to(getattr(torch, dtype))
            assert torch.equal(buffer.stack(f"p{i}")[step - 1], expected)
    assert buffer.steps == [1.0, 2.0]
    with pytest.raises(RuntimeError, match="buffer is full"):
        buffer.record(3)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_and_chunked_delta_are_bit_identical(param_dtype, out_dtype):
    # the GPU path (one cast-on-store kernel) and the CPU path (fp32 scratch chunks) must round identically
    torch.manual_seed(1)
    n = _RECORD_CHUNK + 333
    base = torch.randn(n)
    current = (base + 1e-3 * torch.randn(n)).to(param_dtype)
    expected = (current.to(torch.float64) - base.to(torch.float64)).to(torch.float32).to(out_dtype)
    for fused in (True, False):
        out = torch.full((n,), float("nan"), dtype=out_dtype)
        write_delta(current, base, out, [], fused=fused)
        assert torch.equal(out, expected), f"fused={fused}"
