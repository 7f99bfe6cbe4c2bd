"""The pre-flight estimate: what a RELEX window costs one process before any training step runs.

For the tracked elements of one process, the window T and the buffer choice it gives the bytes held in memory,
the bytes on disk (the disk store, or what one checkpoint copies with an in-memory buffer), the bytes written per
snapshot, and the expected fit time from per-byte costs measured by ``benchmarks/bench_store.py`` on one core of
the project's CPU machine (``docs/benchmarks.md``, "Disk delta store"); other hardware scales these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from .buffer import DeltaBuffer
from .units import format_bytes
from .config import RelexConfig
from .store import FIT_READ_BYTES, store_footprint

__all__ = ["Preflight", "preflight", "FIT_SECONDS_PER_STORED_BYTE", "FIT_SECONDS_PER_GRAM_MAC"]

FIT_SECONDS_PER_STORED_BYTE = 1.8e-9
"""Fit seconds per byte of stored deltas (reads, upcasts, combine pass), one CPU core: the least-squares fit of
``benchmarks/bench_store.py`` over T = 10 ... 200 at 16M parameters, disk store, bf16 (docs/benchmarks.md)."""
FIT_SECONDS_PER_GRAM_MAC = 1.25e-10
"""Fit seconds per multiply-add of the Gram pass (T² per tracked element), one CPU core, same fit. On the shared
machine it was measured on, the same fit over the 4M-parameter sweep gave 3.9e-10: read it as ±3x."""


@dataclass(frozen=True)
class Preflight:
    """Per-process costs of one RELEX window (bytes and seconds)."""

    elements: int  # tracked elements on this process
    world_size: int
    snapshots: int  # T
    buffer_device: str
    memory_bytes: int  # host or GPU memory held by the buffer (disk store: θ_0, staging row, read block)
    disk_bytes: int  # the store's files (in memory: the run's row file, relex-rows) at the full window, twice its rows in jump mode
    checkpoint_bytes: int  # what one checkpoint adds at the full window: a reference to rows written once per run
    write_bytes_per_snapshot: int  # written once per recorded step (in memory: at the next checkpoint save)
    fit_seconds: float  # expected Gram + combine passes, one CPU core

    def summary_line(self) -> str:
        where = "disk store" if self.buffer_device == "disk" else f"{self.buffer_device} buffer"
        return (
            f"RELEX pre-flight ({where}, per process of {self.world_size}, {self.elements:,} tracked elements, T = "
            f"{self.snapshots}): memory {format_bytes(self.memory_bytes)}, disk {format_bytes(self.disk_bytes)}, "
            f"{format_bytes(self.write_bytes_per_snapshot)} written per snapshot, each checkpoint adds "
            f"{format_bytes(self.checkpoint_bytes)}; expected fit about {self.fit_seconds:.1f}s on one CPU core "
            "(measured per-byte cost of benchmarks/bench_store.py; scale for your hardware)"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def preflight(numels: Sequence[int], config: RelexConfig, world_size: int = 1) -> Preflight:
    """The estimate for this process's tracked element counts ``numels`` under ``config`` (pure)."""
    numels = [int(n) for n in numels]
    elements = sum(numels)
    snapshots = config.buffer_capacity
    itemsize = DeltaBuffer.bytes_needed([1], 1, config.buffer_dtype) - 4
    stored = elements * snapshots * itemsize
    memory, disk = store_footprint(numels, snapshots, config.buffer_dtype, FIT_READ_BYTES, drops_rows=config.mode == "jump")
    checkpoint, written = 16 * 1024 + 16 * snapshots, elements * itemsize
    if config.buffer_device != "disk":  # the row file that checkpoints reference has the store's layout
        memory = DeltaBuffer.bytes_needed(numels, snapshots, config.buffer_dtype)
    fit = FIT_SECONDS_PER_STORED_BYTE * stored + FIT_SECONDS_PER_GRAM_MAC * snapshots**2 * elements
    return Preflight(elements=elements, world_size=world_size, snapshots=snapshots, buffer_device=config.buffer_device,
                     memory_bytes=memory, disk_bytes=disk, checkpoint_bytes=checkpoint,
                     write_bytes_per_snapshot=written, fit_seconds=fit)
