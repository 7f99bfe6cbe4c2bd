"""Streaming the checkpoints: chunks of (θ_0, Δ_1..Δ_R) read by threads into two reused buffer slots, the
Gram pass, the per-tensor weights and the combine-and-write pass (no delta files)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..checkpoints import RelexInputError, TensorReader
from ..math.core import combine, gram_matrix
from ..units import format_bytes
from .output import _OutputModel
from .plan import _itemsize, _Plan

logger = logging.getLogger("relex_callback.offline")

_MIN_CHUNK = 1024
_PARALLEL_MIN_ELEMENTS = 1 << 20  # smaller tensors (elements of M) run single-threaded


@dataclass(frozen=True)
class _Job:
    """One read of elements ``[start, stop)`` of a tensor for ``rows`` snapshots.

    ``kind``: ``"whole"`` (the tensor fits one chunk: Gram, fit and output from one read), ``"gram"``
    (pass 1 of a chunked tensor) or ``"emit"`` (pass 2: combine and write).
    """

    name: str
    kind: str
    start: int
    stop: int
    rows: int
    last: bool = False  # the last "gram" chunk of its tensor


class _Stream:
    """Reads chunks of (θ_0, Δ_1..Δ_R) into two reused fp32 buffer slots, in parallel threads.

    While the caller works on one job's chunk, the next job is read into the other slot (prefetch).
    Reader threads use numpy only (pread, widening, Δ = θ_t − θ_0), so they start no OpenMP teams that
    would compete with the main thread's torch work.
    """

    def __init__(self, plan: _Plan, rows: int, max_memory: int, out_bytes: int, num_workers: int | None) -> None:
        self.plan = plan
        self.rows = rows
        self.workers = num_workers or min(8, max(2, os.cpu_count() or 1))
        self.reader = TensorReader()
        entries = [plan.base.tensors[n] for n in plan.tracked]
        self.max_itemsize = max((e.itemsize for e in entries), default=4)
        staging = self.workers * self.max_itemsize if any(e.dtype != torch.float32 for e in entries) else 0
        per_element = 2 * (4 * rows + 4) + staging + out_bytes  # two slots of Δ and θ_0
        largest = max((e.numel for e in entries), default=0)
        self.cap = min(max_memory // per_element, largest)
        if largest and self.cap < min(_MIN_CHUNK, largest):
            raise RelexInputError(
                f"max_memory={format_bytes(max_memory)} is too small for {rows} snapshots: one chunk of "
                f"{_MIN_CHUNK} elements needs {format_bytes(per_element * _MIN_CHUNK)}"
            )
        self.per_element = per_element
        self._slots = [
            (torch.empty(rows * self.cap, dtype=torch.float32), torch.empty(self.cap, dtype=torch.float32))
            for _ in range(2)
        ]
        self._local = threading.local()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="relex-read")
        self._inflight: list[concurrent.futures.Future] = []
        self.read_seconds = 0.0  # time the caller waited for reads (the rest overlaps its work)
        logger.info(
            "memory budget %s: chunks of up to %s elements (%s of buffers), %d read threads",
            format_bytes(max_memory),
            f"{self.cap:,}",
            format_bytes(per_element * self.cap),
            self.workers,
        )

    def chunks(self, numel: int) -> list[tuple[int, int]]:
        return [(start, min(start + self.cap, numel)) for start in range(0, numel, self.cap)]

    def _read(self, entry: Any, start: int, stop: int, out: torch.Tensor) -> None:
        staging = getattr(self._local, "staging", None)
        if staging is None:
            staging = self._local.staging = torch.empty(self.cap * self.max_itemsize, dtype=torch.uint8)
        self.reader.read_float(entry, start, stop, out, staging)

    def _read_delta(
        self, entry: Any, start: int, stop: int, out: torch.Tensor, base: concurrent.futures.Future, theta0: torch.Tensor
    ) -> None:
        self._read(entry, start, stop, out)
        base.result()  # θ_0's read was queued first (FIFO), so this never waits on an unstarted task
        np.subtract(out.numpy(), theta0.numpy(), out=out.numpy())  # Δ_t = θ_t − θ_0, exact for bf16/fp16

    def _submit(self, slot: int, job: _Job) -> tuple[torch.Tensor, torch.Tensor, list[concurrent.futures.Future]]:
        count = job.stop - job.start
        deltas_buffer, theta_buffer = self._slots[slot]
        theta0 = theta_buffer[:count]
        deltas = deltas_buffer[: job.rows * count].view(job.rows, count)
        base = self._pool.submit(self._read, self.plan.base.tensors[job.name], job.start, job.stop, theta0)
        futures = [base]
        for i in range(job.rows):
            entry = self.plan.models[i].tensors[job.name]
            futures.append(self._pool.submit(self._read_delta, entry, job.start, job.stop, deltas[i], base, theta0))
        return theta0, deltas, futures

    def run(self, jobs: Sequence[_Job]) -> Iterator[tuple[_Job, torch.Tensor, torch.Tensor]]:
        """Yield ``(job, θ_0 [n], Δ [rows, n])`` per job; the views are valid until the next item is asked for."""
        if not jobs:
            return
        pending = self._submit(0, jobs[0])
        for index, job in enumerate(jobs):
            theta0, deltas, futures = pending
            self._inflight = futures
            began = time.perf_counter()
            concurrent.futures.wait(futures)
            self.read_seconds += time.perf_counter() - began
            for future in futures:
                future.result()
            if index + 1 < len(jobs):
                pending = self._submit((index + 1) % 2, jobs[index + 1])
                self._inflight = futures + pending[2]
            yield job, theta0, deltas

    def close(self) -> None:
        concurrent.futures.wait(self._inflight)  # never leave reads running into freed buffers
        self._pool.shutdown(wait=True)


@dataclass
class _Run:
    """What one streaming pass over the tensors produced."""

    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    read_seconds: float = 0.0
    gram_seconds: float = 0.0
    compute_seconds: float = 0.0
    write_seconds: float = 0.0
    bytes_read: int = 0
    chunked: int = 0


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Run small tensors single-threaded: an OpenMP region costs more than their work (and far more on a busy machine)."""
    previous = torch.get_num_threads()
    if count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _stream_tensors(
    plan: _Plan,
    rows: int,
    weights_fn: Callable[[str, torch.Tensor], tuple[torch.Tensor | None, dict[str, Any]]],
    outputs: Sequence[_OutputModel],
    max_memory: int,
    num_workers: int | None,
    progress: bool,
    desc: str,
    emit_rows: int | None = None,
    observe: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
) -> _Run:
    """For each tracked tensor: G (pass 1), ``weights_fn(name, G)`` → (w ``[n, num_fit]`` or None, stats), then
    θ_0 + w M chunk by chunk into ``outputs`` (pass 2; no second read when the tensor fitted in one chunk).

    ``observe(name, deltas, predicted_deltas)`` sees every chunk of pass 2 (``emit_rows`` rows of Δ).
    """
    from tqdm import tqdm

    out_itemsize = max((_itemsize(o.dtypes[n]) for o in outputs for n in plan.tracked), default=0)
    out_bytes = len(outputs) * (4 + out_itemsize)  # fp32 predictions and their cast
    stream = _Stream(plan, rows, max_memory, out_bytes, num_workers)
    emit_rows = plan.num_fit if emit_rows is None else emit_rows
    jobs: list[_Job] = []
    for name in plan.tracked:
        chunks = stream.chunks(plan.base.tensors[name].numel)
        if len(chunks) == 1:
            jobs.append(_Job(name, "whole", 0, chunks[0][1], rows))
        elif chunks:
            jobs += [_Job(name, "gram", a, b, rows, last=i == len(chunks) - 1) for i, (a, b) in enumerate(chunks)]
            if outputs:
                jobs += [_Job(name, "emit", a, b, emit_rows) for a, b in chunks]
    run = _Run()
    copies: dict[str, list[str]] = {}
    for target, source in plan.tied.items():
        copies.setdefault(source, []).append(target)
    # The reader threads prefetch the next chunk meanwhile: leave them a core (on 2 cores, OpenMP regions
    # competing with them cost more CPU than they save).
    threads = max(1, torch.get_num_threads() - 1)
    weights: dict[str, torch.Tensor | None] = {}
    partial: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(plan.tracked), desc=desc, unit="tensor", disable=not progress, leave=False)

    def fit(name: str, gram: torch.Tensor) -> None:
        entry = plan.base.tensors[name]
        began = time.perf_counter()
        weights[name], stats = weights_fn(name, gram)
        run.compute_seconds += time.perf_counter() - began
        chunks = len(stream.chunks(entry.numel))
        stats.update(shape=list(entry.shape), numel=entry.numel, dtype=str(entry.dtype).replace("torch.", ""), chunks=chunks)
        run.tensors[name] = stats
        run.grams[name] = gram
        run.chunked += chunks > 1
        if weights[name] is None or not outputs:
            bar.update()

    try:
        for job, theta0, deltas in stream.run(jobs):
            small = job.rows * (job.stop - job.start) < _PARALLEL_MIN_ELEMENTS
            with _torch_threads(1 if small else threads):
                began = time.perf_counter()
                if job.kind in ("whole", "gram"):
                    gram = gram_matrix(deltas)
                    run.gram_seconds += time.perf_counter() - began
                    if job.kind == "whole":
                        fit(job.name, gram)
                    else:
                        partial[job.name] = partial.get(job.name, 0) + gram
                        if job.last:
                            fit(job.name, partial.pop(job.name))
                if job.kind in ("whole", "emit") and outputs and weights[job.name] is not None:
                    _emit(run, job.name, job.start, theta0, deltas, weights[job.name], plan.num_fit, outputs,
                          copies.get(job.name, ()), observe)
                    if job.stop == plan.base.tensors[job.name].numel:
                        bar.update()
        for name in [n for n in plan.tracked if plan.base.tensors[n].numel == 0]:  # empty tensors: nothing to read
            fit(name, torch.zeros(rows, rows, dtype=torch.float64))
        began = time.perf_counter()
        for name, entry in plan.base.tensors.items():
            if entry.is_floating or not outputs:
                continue
            values = stream.reader.read_tensor(entry)  # non-floating tensors (e.g. index buffers): copied
            for output in outputs:
                output.write(name, 0, values)
        run.write_seconds += time.perf_counter() - began
    finally:
        bar.close()
        stream.close()
    run.read_seconds = stream.read_seconds
    run.bytes_read = stream.reader.bytes_read
    return run


def _emit(
    run: _Run,
    name: str,
    start: int,
    theta0: torch.Tensor,
    deltas: torch.Tensor,
    weights: torch.Tensor,
    num_fit: int,
    outputs: Sequence[_OutputModel],
    copies: Sequence[str],
    observe: Callable[[str, torch.Tensor, torch.Tensor], None] | None,
) -> None:
    """θ_0 + w M of one chunk, cast and written to every output (and to the tied copies)."""
    began = time.perf_counter()
    moving = bool(weights.abs().sum() > 0)
    predicted = None
    if moving:
        predicted = combine(deltas[:num_fit], weights)  # Δ̂ = w M, fp32
        if observe is not None:
            observe(name, deltas, predicted)
    run.compute_seconds += time.perf_counter() - began
    for j, output in enumerate(outputs):
        began = time.perf_counter()
        if moving:  # θ_0 + Δ̂ in fp32, rounded once to the output dtype (one fused pass)
            values = torch.add(predicted[j], theta0, out=torch.empty_like(theta0, dtype=output.dtypes[name]))
        else:  # nothing moved: θ_0 exactly
            values = theta0.to(output.dtypes[name])
        run.compute_seconds += time.perf_counter() - began
        began = time.perf_counter()
        output.write(name, start, values)
        for target in copies:
            output.write(target, start, values)
        run.write_seconds += time.perf_counter() - began
