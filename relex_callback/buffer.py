"""Delta storage: θ_0 and the observed deltas Δ_t = θ_t − θ_0 of every tracked tensor (slice).

:class:`DeltaStorage` is what the engine, the fit and the checkpoints use of a storage. Two implement it:
:class:`DeltaBuffer` keeps an exact float32 copy of θ_0 and a preallocated ``[T, numel]`` stack of deltas in a
compact dtype per tracked tensor, in host memory or on each parameter's device;
:class:`~relex_callback.store.DiskDeltaStore` keeps θ_0 in memory and the rows in a file. A tracked item may
cover only the flat range ``[start, stop)`` of its parameter, so that sharded training keeps only its own
slice (see ``distributed.py``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

from safetensors.torch import load_file

import torch

from .math.core import gram_matrix
from .units import DTYPES

__all__ = ["TrackedTensor", "DeltaStorage", "DeltaBuffer", "select_parameters", "host_available_bytes",
           "byte_view", "DAMAGED_STATE_FIX"]

logger = logging.getLogger(__name__)

_RECORD_CHUNK = 1 << 18  # elements per CPU chunk of a snapshot (1 MiB of fp32 scratch)
DAMAGED_STATE_FIX = ("Resume from an earlier checkpoint, or set start_step to this checkpoint's step to restart the "
                     "observation from its weights.")


def host_available_bytes() -> int:
    """Available host memory (``MemAvailable``), or total physical memory where /proc is absent."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class TrackedTensor:
    """One tracked parameter, or the flat slice ``[start, stop)`` of it that this process owns."""

    name: str
    param: torch.nn.Parameter
    start: int = 0
    stop: int | None = None

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = self.local_data().numel()

    def local_data(self) -> torch.Tensor:
        """The parameter's local tensor (a DTensor's local shard), as a flat view."""
        data = self.param.data
        to_local = getattr(data, "to_local", None)
        if callable(to_local):
            data = to_local()
        return data.reshape(-1)

    def view(self) -> torch.Tensor:
        return self.local_data()[self.start : self.stop]

    @property
    def numel(self) -> int:
        return int(self.stop - self.start)


def select_parameters(
    model: torch.nn.Module, include: list[str] | None = None, exclude: list[str] | None = None
) -> list[tuple[str, torch.nn.Parameter]]:
    """Floating-point trainable parameters, tied ones once (``named_parameters`` drops duplicates)."""
    chosen = []
    for name, param in model.named_parameters():
        if not param.requires_grad or not param.is_floating_point():
            continue
        if include and not any(re.search(p, name) for p in include):
            continue
        if exclude and any(re.search(p, name) for p in exclude):
            continue
        chosen.append((name, param))
    return chosen


def write_delta(current: torch.Tensor, base: torch.Tensor, out: torch.Tensor, scratch: list[torch.Tensor], fused: bool | None = None) -> None:
    """``out ← θ_t − θ_0`` (flat tensors on one device): the difference in fp32, rounded once to ``out``'s dtype.

    ``fused`` (default: off the CPU) is one kernel, ``torch.sub(θ_t, θ_0, out=out)``, which reads θ_t and θ_0
    and writes the compact delta once. On CPU that cast-on-store kernel is slow, so the difference goes
    through a cache-sized fp32 ``scratch`` chunk (kept in the list between tensors) and is copied out.
    Both give bit-identical results (docs/benchmarks.md).
    """
    if fused is None:
        fused = base.device.type != "cpu"
    if fused:
        torch.sub(current, base, out=out)
        return
    if not scratch:
        scratch.append(torch.empty(_RECORD_CHUNK, dtype=torch.float32, device=base.device))
    for start in range(0, base.numel(), _RECORD_CHUNK):
        stop = min(start + _RECORD_CHUNK, base.numel())
        piece = scratch[0][: stop - start]
        torch.sub(current[start:stop], base[start:stop], out=piece)
        out[start:stop].copy_(piece)


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (for writes and CRC-32s)."""
    return memoryview(tensor.view(torch.uint8).numpy())


class DeltaStorage(Protocol):
    """θ_0 and up to ``capacity`` snapshots Δ_t (``steps``, oldest first) of every tracked tensor: what the
    engine, the fit and the checkpoints use of a storage, whichever holds the rows."""

    tracked: list[TrackedTensor]
    capacity: int
    dtype: torch.dtype
    steps: list[float]
    theta0: dict[str, torch.Tensor]

    @property
    def location(self) -> str:
        """Where the rows live: ``"cpu"``, ``"param"`` (each parameter's device) or ``"disk"``."""

    @property
    def nbytes(self) -> int:
        """Memory of this process (host or device)."""

    @property
    def disk_nbytes(self) -> int:
        """Bytes on disk now (0 for an in-memory buffer)."""

    def capture_base(self) -> None: ...
    def record(self, step: float) -> None: ...
    def drop_oldest(self, keep: int) -> None: ...
    def keep_rows(self, rows: Iterable[int]) -> None: ...
    def stack(self, name: str, window: int | None = None) -> Any: ...
    def window_steps(self, window: int | None = None) -> list[float]: ...
    def grams(self, window: int | None = None) -> Iterator[tuple[TrackedTensor, torch.Tensor]]: ...
    def __len__(self) -> int: ...

    def checkpoint_metadata(self, state_path: Path, rows_dir: Path, rank: int, world: int) -> dict[str, str]:
        """The state-file metadata that lets :meth:`restore` rebuild θ_0 and the rows (rows already on disk are
        referenced, never copied); ``rows_dir``: where an in-memory buffer writes its run's row file."""

    def restore(self, metadata: dict[str, str], keep: int, state_path: Path, rank: int, world: int) -> str:
        """θ_0 and the first ``keep`` rows of a saved state, checked; returns where the rows came from."""

    def close(self) -> None:
        """Finish pending writes (the rows stay where they are)."""


class RowReads:
    """The reads every storage shares, over ``steps`` and ``stack``."""

    steps: list[float]
    tracked: list[TrackedTensor]

    def __len__(self) -> int:
        return len(self.steps)

    def window_steps(self, window: int | None = None) -> list[float]:
        return self.steps if window is None else self.steps[-window:]

    def grams(self, window: int | None = None) -> Iterator[tuple[TrackedTensor, torch.Tensor]]:
        for item in self.tracked:
            yield item, gram_matrix(self.stack(item.name, window))

    def stack(self, name: str, window: int | None = None) -> Any:
        raise NotImplementedError


class DeltaBuffer(RowReads):
    """Exact float32 θ_0 plus a ``[capacity, numel]`` delta stack per tracked tensor, in memory (a
    :class:`DeltaStorage`); checkpoints reference the rows of one row file per run
    (:class:`~relex_callback.store.CheckpointRows`)."""

    def __init__(
        self, tracked: Iterable[TrackedTensor], capacity: int, dtype: str = "bfloat16", device: str = "cpu"
    ) -> None:
        self.tracked = list(tracked)
        self.capacity = int(capacity)
        self.dtype = DTYPES[dtype]
        self.device = device
        self.steps: list[float] = []
        self.theta0: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, torch.Tensor] = {}
        self.rows_file: Any = None  # the run's CheckpointRows, once a checkpoint was saved or resumed

    @property
    def location(self) -> str:
        return self.device

    # -- sizing -------------------------------------------------------------------------------------------

    @staticmethod
    def bytes_needed(numels: Iterable[int], capacity: int, dtype: str) -> int:
        itemsize = DTYPES[dtype].itemsize
        return sum(int(n) * (capacity * itemsize + 4) for n in numels)

    @property
    def nbytes(self) -> int:
        return self.bytes_needed((t.numel for t in self.tracked), self.capacity, str(self.dtype).split(".")[-1])

    @property
    def disk_nbytes(self) -> int:
        return 0

    def _storage_device(self, item: TrackedTensor) -> torch.device:
        return item.view().device if self.device == "param" else torch.device("cpu")

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        pin = device.type == "cpu" and torch.cuda.is_available()
        return torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)

    # -- recording ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def capture_base(self) -> None:
        """θ_0 ← the current weights (float32, exact); clears recorded deltas (a new θ_0: the next checkpoint
        starts a new row file)."""
        self.steps = []
        self.rows_file = None
        for item in self.tracked:
            device = self._storage_device(item)
            base = self._allocate((item.numel,), torch.float32, device)
            base.copy_(item.view(), non_blocking=False)
            self.theta0[item.name] = base
            self.deltas[item.name] = self._allocate((self.capacity, item.numel), self.dtype, device)

    @torch.no_grad()
    def record(self, step: float) -> None:
        """Append Δ_step = θ_step − θ_0 for every tracked tensor."""
        if not self.theta0:
            raise RuntimeError("capture_base() must run before record()")
        if len(self.steps) >= self.capacity:
            raise RuntimeError(f"delta buffer is full ({self.capacity} snapshots)")
        row = len(self.steps)
        scratch: list[torch.Tensor] = []
        for item in self.tracked:
            base = self.theta0[item.name]
            current = item.view()
            if current.device != base.device:
                current = current.to(base.device)  # in the parameter's dtype: bf16 params cross the bus at half size
            write_delta(current, base, self.deltas[item.name][row], scratch)
        self.steps.append(float(step))

    def drop_oldest(self, keep: int) -> None:
        """Keep only the newest ``keep`` snapshots (a rolling window for repeated fits)."""
        excess = len(self.steps) - keep
        if excess <= 0:
            return
        for name, stack in self.deltas.items():
            stack[:keep].copy_(stack[excess : excess + keep].clone())
        self.steps = self.steps[excess:]

    def keep_rows(self, rows: Iterable[int]) -> None:
        """Keep only the snapshots at ``rows`` (indices into ``steps``), in their order; frees the other rows.

        Jump mode uses it to thin a full buffer (every other snapshot) so the buffer keeps spanning the
        whole trajectory since θ_0 at a coarser interval.
        """
        rows = sorted(set(int(r) for r in rows))
        if rows and not 0 <= rows[0] <= rows[-1] < len(self.steps):
            raise IndexError(f"rows {rows} out of range for {len(self.steps)} snapshots")
        index = torch.tensor(rows, dtype=torch.long)
        for stack in self.deltas.values():
            kept = stack.index_select(0, index.to(stack.device))
            stack[: len(rows)].copy_(kept)
        self.steps = [self.steps[r] for r in rows]

    # -- reading ------------------------------------------------------------------------------------------

    def stack(self, name: str, window: int | None = None) -> torch.Tensor:
        """``M`` ``[T, numel]`` (compact dtype) of one tensor, optionally only its last ``window`` rows."""
        count = len(self.steps)
        first = 0 if window is None else max(0, count - window)
        return self.deltas[name][first:count]

    def close(self) -> None:
        pass

    # -- persistence --------------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors to save: θ_0 and the recorded rows of every stack (on CPU, contiguous)."""
        out = {}
        for item in self.tracked:
            out[f"theta0/{item.name}"] = self.theta0[item.name].cpu().contiguous()
            out[f"deltas/{item.name}"] = self.stack(item.name).cpu().contiguous()
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor], steps: list[float]) -> None:
        missing = [t.name for t in self.tracked if f"theta0/{t.name}" not in tensors]
        if missing:
            raise ValueError(f"saved RELEX state lacks tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
        self.capture_base()
        for item in self.tracked:
            base = tensors[f"theta0/{item.name}"]
            rows = tensors[f"deltas/{item.name}"]
            if base.numel() != item.numel or rows.shape[0] != len(steps):
                raise ValueError(
                    f"saved RELEX state for {item.name} has shape {tuple(rows.shape)}, expected "
                    f"[{len(steps)}, {item.numel}]: the model or the selection changed since it was saved"
                )
            self.theta0[item.name].copy_(base)
            self.deltas[item.name][: len(steps)].copy_(rows)
        self.steps = [float(s) for s in steps]

    def checkpoint_metadata(self, state_path: Path, rows_dir: Path, rank: int, world: int) -> dict[str, str]:
        """Writes the rows the run's row file in ``rows_dir`` lacks (θ_0 too, the first time), each once per run;
        the state (format 3) references them."""
        from .store import CheckpointRows  # store.py builds on this module

        if self.rows_file is None or self.rows_file.directory != rows_dir:
            self.rows_file = CheckpointRows(self, rows_dir, rank, world)
        return {"rows": json.dumps(self.rows_file.save(state_path))}

    @torch.no_grad()
    def restore(self, metadata: dict[str, str], keep: int, state_path: Path, rank: int, world: int) -> str:
        """From the run's row file (format 3), or from the tensors inline (format 1, older versions)."""
        from .store import CheckpointRows

        if "rows" in metadata:
            self.rows_file = CheckpointRows.load(self, json.loads(metadata["rows"]), keep, state_path, rank, world)
            return f"the row file in {self.rows_file.directory}"
        self.rows_file = None
        try:
            tensors = load_file(str(state_path))
        except Exception as err:  # a data section cut short: safetensors raises its own error type
            raise ValueError(f"{state_path} is a truncated RELEX state ({err}). {DAMAGED_STATE_FIX}") from None
        crcs = json.loads(metadata.get("crc32", "{}"))  # absent in states written before checksums
        bad = [name for name, crc in crcs.items() if name not in tensors or zlib.crc32(byte_view(tensors[name])) != crc]
        if bad:
            raise ValueError(f"{state_path} fails its CRC-32 check in {bad[:5]}: the RELEX state is corrupted. "
                             f"{DAMAGED_STATE_FIX}")
        steps = [float(s) for s in json.loads(metadata["steps"])][:keep]
        self.load_state_tensors({k: (v[:keep] if k.startswith("deltas/") else v) for k, v in tensors.items()}, steps)
        return str(state_path)
