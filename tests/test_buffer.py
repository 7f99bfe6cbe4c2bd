"""DeltaBuffer records exactly what an independent θ_t − θ_0 gives, across chunk boundaries."""

import pytest
import torch

from relex_callback.buffer import _RECORD_CHUNK, DeltaBuffer, TrackedTensor


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
