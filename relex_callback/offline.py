"""RELEX over checkpoints already on disk: extrapolate, reconstruct and report, with no delta files.

For every named tensor the snapshots' deltas Δ_t = θ_t − θ_0 are streamed from the checkpoints into
an fp32 buffer ``M`` ``[T, d]`` (chunked over d when the tensor does not fit the memory budget);
the Gram matrix ``G = M Mᵀ`` gives the subspace and the coefficients c_t (:mod:`relex_callback.core`),
a trend ĉ(x) is fitted on the real step numbers, and the output ``θ_0 + Σ_t w_t Δ_t`` is combined
chunk by chunk and written straight into the output shards. ``V`` is never materialised and nothing
but the output directory is written.

Memory model: a chunk of ``c`` elements costs ``2·(4·T + 4)`` (two buffer slots of deltas and θ_0:
the next chunk is read while the current one is processed) + ``workers·itemsize`` (read staging) +
``n·(4 + out_itemsize)`` (n predictions and their cast) bytes per element; ``c`` is the largest size
within ``max_memory``. A tensor that fits is read once; a larger one is read twice (pass 1 sums the
chunk Gram matrices, pass 2 combines the chunks).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .checkpoints import (
    ModelDir,
    RelexInputError,
    SafetensorsWriter,
    TensorReader,
    discover_checkpoints,
    is_tied,
    open_model_dir,
    output_file_name,
    tied_output_embeddings,
    validate_trajectory,
)
from .math.core import (
    gram_matrix,
    Subspace,
    Trend,
    backtest,
    combine,
    fit_trend,
    prediction_weights,
    r_squared,
    reconstruction_weights,
    subspace_from_gram,
)
from .engine.report import write_model_card
from .export import REPORT_NAME, atomic_directory, check_output_dir, summarize_explained_variance, write_json

__all__ = [
    "FIT_KINDS",
    "OUTPUT_DTYPES",
    "DEFAULT_MAX_MEMORY",
    "parse_size",
    "extrapolate_checkpoints",
    "reconstruct_checkpoints",
    "report_checkpoints",
]

logger = logging.getLogger(__name__)

FIT_KINDS = ("linear", "poly2")
OUTPUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_MAX_MEMORY = 1 << 30
REPORT_FORMAT = "relex-offline/1"
_MIN_CHUNK = 1024
_PARALLEL_MIN_ELEMENTS = 1 << 20
_PREFETCH = os.environ.get("RELEX_PREFETCH", "1") != "0"  # smaller tensors (elements of M) run single-threaded
_AUX_FILES: dict[str, tuple[str, ...]] = {
    "config": ("config.json",),
    "generation_config": ("generation_config.json",),
    "tokenizer": (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "chat_template.jinja",
        "chat_template.json",
        "*.tiktoken",
    ),
}
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
               "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(value: int | str) -> int:
    """Bytes from ``2GiB``, ``1.5G``, ``512MB`` or a plain integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise RelexInputError(f"cannot read the size {value!r}; write e.g. 2GiB, 512MB or 1000000000")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _format_bytes(num: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num) < 1024:
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    return f"{num:.1f} TiB"


# -- the trajectory ---------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """The validated input: θ_0, the snapshot rows (fit rows first), the streamed tensors."""

    base: ModelDir
    models: list[ModelDir]  # every checkpoint, sorted by step
    num_fit: int  # the first num_fit models span the subspace and the fit (step <= fit_steps)
    tracked: list[str]  # floating tensors streamed, in the base's order
    tied: dict[str, str]  # output embedding -> its (predicted) input embedding, when saved in the base
    config: dict[str, Any] | None
    tie_word_embeddings: bool = False

    @property
    def steps(self) -> list[int]:
        return [int(m.step) for m in self.models]  # type: ignore[arg-type]

    @property
    def fit_steps(self) -> list[int]:
        return self.steps[: self.num_fit]


def _as_model_list(checkpoints: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str | os.PathLike]:
    if isinstance(checkpoints, (str, os.PathLike)):
        return [checkpoints]
    return list(checkpoints)


def _prepare(
    base: str | os.PathLike,
    checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
    steps: Sequence[int] | None,
    fit_steps: int | None,
    allow_pickle: bool,
) -> _Plan:
    base_model = open_model_dir(base, allow_pickle=allow_pickle, step=0)
    models = discover_checkpoints(_as_model_list(checkpoints), steps=steps, allow_pickle=allow_pickle)
    base_path = base_model.path.resolve()
    if any(m.path.resolve() == base_path for m in models):
        raise RelexInputError(f"the base model {base_model.path} is also listed among the checkpoints")
    config = base_model.config
    if config is None:
        config = next((m.config for m in reversed(models) if m.config is not None), None)
    tied_flag = is_tied(config)
    if config is None:
        logger.warning("no config.json in the base or the checkpoints: every tensor is tracked as untied")
    shapes = {n: e.shape for n, e in base_model.tensors.items()}
    tied = tied_output_embeddings(base_model.tensors, shapes) if tied_flag else {}
    skip = set(tied)
    if tied_flag:  # a tied output embedding saved in some checkpoints only is a copy: ignore it
        for model in models:
            skip.update(tied_output_embeddings(list(model.tensors) + list(base_model.tensors)))
    if fit_steps is not None:
        num_fit = sum(1 for m in models if m.step <= fit_steps)  # type: ignore[operator]
        if num_fit == 0:
            raise RelexInputError(f"no checkpoint has a step <= --fit-steps {fit_steps} (steps: {_steps_text(models)})")
    else:
        num_fit = len(models)
    validate_trajectory(base_model, models, skip=skip)
    tracked = [n for n, e in base_model.tensors.items() if n not in skip and e.is_floating]
    if any(m.step == 0 for m in models):
        logger.warning("a checkpoint has step 0, the base's step: it is used as an ordinary snapshot")
    logger.info(
        "base %s; %d checkpoint(s) at steps %s (%d in the fit); %d tensors tracked%s",
        base_model.path,
        len(models),
        _steps_text(models),
        num_fit,
        len(tracked),
        f"; tied: {', '.join(f'{k} = {v}' for k, v in tied.items())}" if tied else "",
    )
    return _Plan(base=base_model, models=models, num_fit=num_fit, tracked=tracked, tied=tied, config=config,
                 tie_word_embeddings=tied_flag)


def _steps_text(models: Sequence[ModelDir]) -> str:
    steps = [str(m.step) for m in models]
    return ", ".join(steps) if len(steps) <= 12 else ", ".join(steps[:5] + ["..."] + steps[-3:])


def _needed_snapshots(rank: int, fit: str) -> int:
    return rank + 1 if fit != "poly2" else max(rank + 1, 3)


def _check_common(rank: int, fit: str, window: int | None, num_workers: int | None) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise RelexInputError(f"rank={rank!r} must be an int >= 1")
    if fit not in FIT_KINDS:
        raise RelexInputError(f"fit={fit!r} is not supported; use one of {', '.join(FIT_KINDS)}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 2):
        raise RelexInputError(f"window={window!r} must be an int >= 2 (the last W snapshots of the fit)")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 1):
        raise RelexInputError(f"num_workers={num_workers!r} must be an int >= 1")


def _check_counts(plan: _Plan, rank: int, fit: str, window: int | None) -> int:
    """The number of snapshots W the trend is fitted on; raises when there are too few."""
    if len(plan.models) < 2 or plan.num_fit < 2:
        raise RelexInputError(
            f"need at least 2 checkpoints to fit a trend, got {plan.num_fit}"
            + (f" (of {len(plan.models)} found; see --fit-steps)" if plan.num_fit != len(plan.models) else "")
            + f": {_steps_text(plan.models[: max(plan.num_fit, 1)])}"
        )
    used = plan.num_fit if window is None else min(window, plan.num_fit)
    needed = _needed_snapshots(rank, fit)
    if used < needed:
        raise RelexInputError(
            f"{used} snapshot(s) to fit" + (f" (window={window})" if window is not None else "")
            + f" are too few for rank={rank} and fit={fit!r}: need at least {needed}. "
            "Give more checkpoints, widen the window or lower the rank."
        )
    return used


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in OUTPUT_DTYPES.values():
            raise RelexInputError(f"dtype={dtype} is not supported; use one of {', '.join(OUTPUT_DTYPES)}")
        return dtype
    if dtype not in OUTPUT_DTYPES:
        raise RelexInputError(f"dtype={dtype!r} is not supported; use one of {', '.join(OUTPUT_DTYPES)} or auto")
    return OUTPUT_DTYPES[dtype]


def _check_targets(target_steps: Sequence[int] | int, what: str = "target step") -> list[int]:
    targets = [target_steps] if isinstance(target_steps, int) else list(target_steps)
    if not targets:
        raise RelexInputError(f"give at least one {what}")
    for target in targets:
        if isinstance(target, bool) or not isinstance(target, int):
            raise RelexInputError(f"{what} {target!r} must be an int")
    if len(set(targets)) != len(targets):
        raise RelexInputError(f"duplicate {what}s: {targets}")
    return targets


# -- streaming -------------------------------------------------------------------------------------------


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
                f"max_memory={_format_bytes(max_memory)} is too small for {rows} snapshots: one chunk of "
                f"{_MIN_CHUNK} elements needs {_format_bytes(per_element * _MIN_CHUNK)}"
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
            _format_bytes(max_memory),
            f"{self.cap:,}",
            _format_bytes(per_element * self.cap),
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


# -- output ---------------------------------------------------------------------------------------------


class _OutputModel:
    """One output model directory: the base's shard files, names and order; dtypes as asked."""

    def __init__(self, directory: Path, base: ModelDir, dtype: torch.dtype | None) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.base = base
        self.dtypes = {n: (dtype if dtype is not None and e.is_floating else e.dtype) for n, e in base.tensors.items()}
        by_file: dict[Path, list[str]] = {}
        for name, entry in base.tensors.items():
            by_file.setdefault(entry.file, []).append(name)
        self.writers: list[SafetensorsWriter] = []
        self._where: dict[str, SafetensorsWriter] = {}
        self.file_names: dict[str, str] = {}
        for file, names in by_file.items():
            metadata = dict(base.file_metadata.get(file.name, {}))
            metadata["format"] = "pt"
            out_name = output_file_name(file.name)
            writer = SafetensorsWriter(
                directory / out_name, [(n, self.dtypes[n], base.tensors[n].shape) for n in names], metadata
            )
            self.writers.append(writer)
            for name in names:
                self._where[name] = writer
                self.file_names[name] = out_name

    @property
    def nbytes(self) -> int:
        return sum(w.size for w in self.writers)

    def write(self, name: str, start: int, values: torch.Tensor) -> None:
        self._where[name].write(name, start, values.to(self.dtypes[name]))

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        index = self.base.index
        if index is not None or len(self.writers) > 1:
            metadata = dict((index or {}).get("metadata") or {})
            metadata["total_size"] = sum(self.base.tensors[n].numel * _itemsize(d) for n, d in self.dtypes.items())
            write_json(self.directory / "model.safetensors.index.json", {"metadata": metadata, "weight_map": dict(self.file_names)})

    def abort(self) -> None:
        for writer in self.writers:
            writer.abort()


def _aux_sources(plan: _Plan) -> dict[str, Path]:
    """Config, generation config and tokenizer files: from the base, else the newest checkpoint having them."""
    chosen: dict[str, Path] = {}
    candidates = [plan.base.path] + [m.path for m in reversed(plan.models)]
    for patterns in _AUX_FILES.values():
        for directory in candidates:
            files = sorted({p for pattern in patterns for p in directory.glob(pattern) if p.is_file()})
            if files:
                for file in files:
                    chosen[file.name] = file
                break
    return chosen


def _copy_aux(sources: dict[str, Path], directory: Path, dtype: torch.dtype | None) -> None:
    for name, source in sources.items():
        if name == "config.json" and dtype is not None:
            config = json.loads(source.read_text())
            dtype_name = str(dtype).replace("torch.", "")
            for key in ("dtype", "torch_dtype"):
                if key in config:
                    config[key] = dtype_name
            if "dtype" not in config and "torch_dtype" not in config:
                config["dtype"] = dtype_name
            (directory / name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(source, directory / name)


# -- per-tensor math on G (all from core) -------------------------------------------------------------------


def _project(gram_cross: torch.Tensor, subspace: Subspace) -> torch.Tensor:
    """Coefficients Δ_h · v_i = (G[h, fit] u_i) / σ_i of snapshots outside the fit, ``[H, r]``."""
    sigma = subspace.singular_values
    inverse = torch.where(sigma > 0, 1.0 / sigma.clamp_min(1e-300), torch.zeros_like(sigma))
    return (gram_cross.to(torch.float64) @ subspace.left) * inverse


def _squared_errors(gram: torch.Tensor, weights: torch.Tensor, num_fit: int, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """||Σ_t w_t Δ_t − Δ_row||² and ||Δ_row||² from ``G`` (weights ``[n, num_fit]``, one row each)."""
    g_fit = gram[:num_fit, :num_fit]
    rows_t = torch.as_tensor(list(rows), dtype=torch.long)
    cross = (weights * gram[rows_t, :num_fit]).sum(1)
    predicted = torch.einsum("ni,ij,nj->n", weights, g_fit, weights)
    norm = gram[rows_t, rows_t]
    return (predicted - 2.0 * cross + norm).clamp_min(0.0), norm


def _singular_values(subspace: Subspace) -> list[float]:
    return subspace.eigenvalues.clamp_min(0.0).sqrt().tolist()


def _floats(values: torch.Tensor) -> list[float]:
    return [float(v) for v in values.reshape(-1)]


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


# -- commands -------------------------------------------------------------------------------------------


def _check_output(output: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty output before any work (the CLI's wording of export.check_output_dir)."""
    try:
        check_output_dir(output, overwrite)
    except FileExistsError:
        raise FileExistsError(
            f"output directory {output} already exists and is not empty; pass --overwrite (overwrite=True) "
            "to replace it, or choose another output directory"
        ) from None


def _settings(**values: Any) -> dict[str, Any]:
    return {k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v) for k, v in values.items()}


def _checkpoint_list(plan: _Plan) -> list[dict[str, Any]]:
    return [{"step": m.step, "path": str(m.path)} for m in plan.models]


def _open_outputs(staging: Path, labels: Sequence[int], base: ModelDir, dtype: torch.dtype | None) -> list[_OutputModel]:
    if len(labels) == 1:
        return [_OutputModel(staging, base, dtype)]
    return [_OutputModel(staging / f"step{label}", base, dtype) for label in labels]


def extrapolate_checkpoints(
    base: str | os.PathLike,
    checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
    target_steps: int | Sequence[int],
    output_dir: str | os.PathLike,
    *,
    steps: Sequence[int] | None = None,
    rank: int = 1,
    fit: str = "linear",
    window: int | None = None,
    fit_steps: int | None = None,
    time_scale: float = 1.0,
    shrink: float = 1.0,
    dtype: str | torch.dtype | None = None,
    max_memory: int | str = DEFAULT_MAX_MEMORY,
    num_workers: int | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    backtest_tolerance: float = 0.75,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Write θ̂(K) = θ_0 + Σ_i ĉ_i(S·K) v_i for each target step K (the paper's RELEX), from checkpoints on disk.

    Per tensor the rank-``rank`` subspace comes from every snapshot with step ≤ ``fit_steps`` (all by
    default); the trend ĉ (``fit``) is fitted on the real step numbers of the last ``window`` of them
    and evaluated at S·K, S = ``time_scale``. ``shrink`` λ keeps θ_N + λ(θ̂ − θ_N). One model directory
    is written per target (``output_dir`` itself for one target, ``output_dir/step{K}`` for several),
    each with ``relex_report.json`` and a model card. Returns the reports.
    """
    began = time.perf_counter()
    targets = _check_targets(target_steps)
    _check_common(rank, fit, window, num_workers)
    if isinstance(time_scale, bool) or not isinstance(time_scale, (int, float)) or not time_scale > 0:
        raise RelexInputError(f"time_scale={time_scale!r} must be a number > 0")
    if isinstance(shrink, bool) or not isinstance(shrink, (int, float)) or not 0 < shrink <= 1:
        raise RelexInputError(f"shrink={shrink!r} must be in (0, 1]; 1.0 keeps the full prediction")
    out_dtype = _resolve_dtype(dtype)
    budget = parse_size(max_memory)
    plan = _prepare(base, checkpoints, steps, fit_steps, allow_pickle)
    used = _check_counts(plan, rank, fit, window)
    output = Path(output_dir)
    _check_output(output, overwrite)
    if plan.num_fit < len(plan.models):
        logger.info("ignoring %d checkpoint(s) after --fit-steps %s", len(plan.models) - plan.num_fit, fit_steps)
    x_fit = torch.tensor(plan.fit_steps, dtype=torch.float64)
    x_window = x_fit[-used:]
    effective = [float(k) * float(time_scale) for k in targets]
    last = plan.fit_steps[-1]
    warnings = [
        f"target step {k} (effective {e:g}) is not after the last observed step {last}: this interpolates"
        for k, e in zip(targets, effective)
        if e <= last
    ]
    x_targets = torch.tensor(effective, dtype=torch.float64)

    def weights_fn(name: str, gram: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        subspace = subspace_from_gram(gram, rank)
        coefficients = subspace.coefficients
        trend = fit_trend(x_window, coefficients[-used:], kind=fit)
        predicted = trend(x_targets)  # ĉ(S·K), [n, r]
        weights = prediction_weights(subspace, predicted)  # Δ̂ = w M, [n, T]
        if shrink != 1.0:
            weights = shrink * weights
            weights[:, -1] += 1.0 - shrink
        return weights, {
            "explained_variance": subspace.explained_variance,
            "singular_values": _singular_values(subspace),
            "r_squared": _floats(r_squared(x_window, coefficients[-used:], trend)),
            "predicted_coefficients": [_floats(row) for row in predicted],
        }

    with atomic_directory(output, overwrite) as staging:
        outputs = _open_outputs(staging, targets, plan.base, out_dtype)
        try:
            run = _stream_tensors(plan, plan.num_fit, weights_fn, outputs, budget, num_workers, progress, "extrapolate")
            for out in outputs:
                out.close()
        except BaseException:
            for out in outputs:
                out.abort()
            raise
        sources = _aux_sources(plan)
        for out in outputs:
            _copy_aux(sources, out.directory, out_dtype)
        bt = backtest([run.grams[n] for n in plan.tracked], x_fit, rank=rank, kind=fit)
        backtest_info = None
        if bt is not None:
            backtest_info = {"num_fit": bt.num_fit, "ratio": bt.ratio, "distance": bt.distance,
                             "supported_ratio": bt.supported_ratio(backtest_tolerance)}
        ev_values = [run.tensors[n]["explained_variance"] for n in plan.tracked]
        reports = []
        for j, (target, eff, out) in enumerate(zip(targets, effective, outputs)):
            horizon = eff / last if last > 0 else math.inf
            target_warnings = list(warnings)
            if backtest_info is not None and horizon > backtest_info["supported_ratio"]:
                target_warnings.append(
                    f"the horizon {horizon:.2f}x is beyond the {backtest_info['supported_ratio']:.2f}x that the backtest "
                    f"supports at tolerance {backtest_tolerance} (distance {bt.distance:.3f} at {bt.ratio:.2f}x); evaluate "
                    "this model before use"
                )
            report = {
                "format": REPORT_FORMAT,
                "command": "extrapolate",
                "target_step": target,
                "effective_target_step": eff,
                "observed_steps": plan.fit_steps,
                "window_steps": plan.fit_steps[-used:],
                "horizon_ratio": horizon,
                "settings": _settings(
                    rank=rank, fit=fit, window=window, fit_steps=fit_steps, time_scale=float(time_scale),
                    shrink=float(shrink), dtype=out_dtype or "auto", max_memory=budget,
                    num_workers=num_workers, backtest_tolerance=backtest_tolerance, target_steps=targets,
                ),
                "base": str(plan.base.path),
                "checkpoints": _checkpoint_list(plan)[: plan.num_fit],
                "tie_word_embeddings": plan.tie_word_embeddings,
                "tied": plan.tied,
                "explained_variance": summarize_explained_variance(ev_values),
                "backtest": backtest_info,
                "warnings": target_warnings,
                "copied_files": {k: str(v) for k, v in sources.items()},
                "timings": {
                    "read_wait_s": run.read_seconds,
                    "gram_s": run.gram_seconds,
                    "compute_s": run.compute_seconds,
                    "write_s": run.write_seconds,
                    "total_s": time.perf_counter() - began,
                },
                "bytes": {"read": run.bytes_read, "written": out.nbytes, "intermediate": 0},
                "tensors": {
                    n: {**{k: v for k, v in run.tensors[n].items() if k != "predicted_coefficients"},
                        "predicted_coefficients": run.tensors[n]["predicted_coefficients"][j]}
                    for n in plan.tracked
                },
            }
            write_json(out.directory / REPORT_NAME, report)
            write_model_card(out.directory, report)
            for warning in target_warnings:
                logger.warning("%s", warning)
            reports.append(report)
    logger.info(
        "extrapolated %d tensors to step(s) %s in %.1f s (waited %.1f s for reads of %s; %d tensor(s) chunked)",
        len(plan.tracked), ", ".join(map(str, targets)), time.perf_counter() - began, run.read_seconds,
        _format_bytes(run.bytes_read), run.chunked,
    )
    return reports


def reconstruct_checkpoints(
    base: str | os.PathLike,
    checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    target_steps: int | Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    rank: int = 1,
    fit_steps: int | None = None,
    dtype: str | torch.dtype | None = None,
    max_memory: int | str = DEFAULT_MAX_MEMORY,
    num_workers: int | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Write θ_0 + V_r V_rᵀ Δ_t for observed steps t (the paper's Finding-1 check), V_r from the fit snapshots.

    ``target_steps`` must be steps of the given checkpoints (default: the last fit step); a step
    after ``fit_steps`` is projected onto the subspace of the earlier ones.
    """
    began = time.perf_counter()
    _check_common(rank, "linear", None, num_workers)
    out_dtype = _resolve_dtype(dtype)
    budget = parse_size(max_memory)
    plan = _prepare(base, checkpoints, steps, fit_steps, allow_pickle)
    if len(plan.models) < 1 or plan.num_fit < 1:
        raise RelexInputError("need at least one checkpoint to reconstruct")
    if plan.num_fit < 2:
        raise RelexInputError(f"need at least 2 checkpoints to span a subspace worth checking, got {plan.num_fit}")
    targets = _check_targets(target_steps if target_steps is not None else [plan.fit_steps[-1]], "reconstruction step")
    position = {s: i for i, s in enumerate(plan.steps)}
    unknown = [t for t in targets if t not in position]
    if unknown:
        raise RelexInputError(
            f"reconstruct needs observed steps; {', '.join(map(str, unknown))} not among the checkpoints ({_steps_text(plan.models)})"
        )
    output = Path(output_dir)
    _check_output(output, overwrite)
    # Rows read: the fit snapshots, then the held-out targets (their G row gives their projection).
    held = [position[t] for t in targets if position[t] >= plan.num_fit]
    order = list(range(plan.num_fit)) + sorted(set(held))
    rows_plan = _Plan(base=plan.base, models=[plan.models[i] for i in order], num_fit=plan.num_fit,
                      tracked=plan.tracked, tied=plan.tied, config=plan.config,
                      tie_word_embeddings=plan.tie_word_embeddings)
    row_of = {plan.steps[i]: r for r, i in enumerate(order)}
    target_rows = [row_of[t] for t in targets]
    norms = torch.zeros(len(targets), dtype=torch.float64)
    tensor_errors: dict[str, torch.Tensor] = {}

    def weights_fn(name: str, gram: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        subspace = subspace_from_gram(gram[: plan.num_fit, : plan.num_fit], rank)
        projector = reconstruction_weights(subspace)  # U_r U_rᵀ
        rows = []
        for row in target_rows:
            if row < plan.num_fit:
                rows.append(projector[row])
            else:
                rows.append(prediction_weights(subspace, _project(gram[row : row + 1, : plan.num_fit], subspace))[0])
        weights = torch.stack(rows)
        sq_norm = torch.diagonal(gram)[target_rows]
        norms.add_(sq_norm)
        tensor_errors[name] = torch.zeros(len(target_rows), dtype=torch.float64)
        return weights, {
            "explained_variance": subspace.explained_variance,
            "singular_values": _singular_values(subspace),
            "squared_norm": _floats(sq_norm),
        }

    def observe(name: str, deltas: torch.Tensor, predicted: torch.Tensor) -> None:
        # ||Δ̂_t − Δ_t||² summed exactly over the chunks (more accurate than from G when it is small)
        for j, row in enumerate(target_rows):
            tensor_errors[name][j] += float((predicted[j] - deltas[row]).double().pow(2).sum())

    with atomic_directory(output, overwrite) as staging:
        outputs = _open_outputs(staging, targets, plan.base, out_dtype)
        try:
            run = _stream_tensors(rows_plan, len(order), weights_fn, outputs, budget, num_workers, progress,
                                  "reconstruct", emit_rows=len(order), observe=observe)
            for out in outputs:
                out.close()
        except BaseException:
            for out in outputs:
                out.abort()
            raise
        sources = _aux_sources(plan)
        ev_values = [run.tensors[n]["explained_variance"] for n in plan.tracked]
        errors = sum(tensor_errors.values(), torch.zeros(len(targets), dtype=torch.float64))
        for name in plan.tracked:
            stats = run.tensors[name]
            squared_norm = stats.pop("squared_norm")
            stats["relative_error"] = [
                math.sqrt(float(e) / n) if n > 0 else 0.0 for e, n in zip(tensor_errors[name], squared_norm)
            ]
        reports = []
        for j, (target, out) in enumerate(zip(targets, outputs)):
            _copy_aux(sources, out.directory, out_dtype)
            distance = float((errors[j] / norms[j]).sqrt()) if norms[j] > 0 else 0.0
            report = {
                "format": REPORT_FORMAT,
                "command": "reconstruct",
                "target_step": target,
                "in_fit": position[target] < plan.num_fit,
                "observed_steps": plan.fit_steps,
                "relative_distance": distance,
                "settings": _settings(rank=rank, fit_steps=fit_steps, dtype=out_dtype or "auto", max_memory=budget,
                                      num_workers=num_workers),
                "base": str(plan.base.path),
                "checkpoints": _checkpoint_list(plan),
                "tie_word_embeddings": plan.tie_word_embeddings,
                "tied": plan.tied,
                "explained_variance": summarize_explained_variance(ev_values),
                "copied_files": {k: str(v) for k, v in sources.items()},
                "timings": {"read_wait_s": run.read_seconds, "gram_s": run.gram_seconds, "compute_s": run.compute_seconds,
                            "write_s": run.write_seconds, "total_s": time.perf_counter() - began},
                "bytes": {"read": run.bytes_read, "written": out.nbytes, "intermediate": 0},
                "tensors": {n: {**{k: v for k, v in run.tensors[n].items() if k != "relative_error"},
                                "relative_error": run.tensors[n]["relative_error"][j]} for n in plan.tracked},
            }
            write_json(out.directory / REPORT_NAME, report)
            _write_reconstruction_card(out.directory, report)
            reports.append(report)
    logger.info("reconstructed step(s) %s at rank %d in %.1f s", ", ".join(map(str, targets)), rank, time.perf_counter() - began)
    return reports


def _write_reconstruction_card(directory: Path, report: dict[str, Any]) -> None:
    ev = report["explained_variance"]
    lines = [
        "---",
        "tags: [relex, rlvr, reconstruction]",
        "---",
        f"# RELEX rank-{report['settings']['rank']} reconstruction of step {report['target_step']}",
        "",
        f"The observed step-{report['target_step']} weights projected onto the rank-{report['settings']['rank']} "
        f"trajectory subspace of steps {report['observed_steps'][0]}–{report['observed_steps'][-1]}, per tensor: "
        "θ_0 + V_r V_rᵀ (θ_t − θ_0) (the paper's Finding-1 check; arXiv 2605.21468), made with relex-callback.",
        "",
        f"- Relative distance to the real weights ||θ̂ − θ|| / ||θ − θ_0||: {report['relative_distance']:.4f}.",
        f"- Explained variance: mean {ev.get('mean', float('nan')):.3f}, min {ev.get('min', float('nan')):.3f} "
        f"over {ev.get('tensors', 0)} tensors.",
        "",
        "Details: `relex_report.json`.",
        "",
    ]
    (directory / "README.md").write_text("\n".join(lines))


def report_checkpoints(
    base: str | os.PathLike,
    checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    steps: Sequence[int] | None = None,
    rank: int = 1,
    fit: str = "linear",
    window: int | None = None,
    fit_steps: int | None = None,
    target_steps: int | Sequence[int] | None = None,
    time_scale: float = 1.0,
    max_memory: int | str = DEFAULT_MAX_MEMORY,
    num_workers: int | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    backtest_tolerance: float = 0.75,
    plots: bool = True,
    top: int = 6,
    progress: bool = True,
) -> dict[str, Any]:
    """Diagnostics only (one read of every checkpoint, no weights written): ``relex_report.json`` and PNG plots.

    Per tensor: explained variance of the rank-r subspace of the fit snapshots (step ≤ ``fit_steps``),
    singular values, R² of the trend in the window and — for the later, held-out snapshots — R² of
    their coefficients c_t = Δ_t · v against the extended trend, and the whole-model relative distance
    ||θ̂_t − θ_t|| / ||θ_t − θ_0|| of the prediction at each held-out step.
    """
    began = time.perf_counter()
    _check_common(rank, fit, window, num_workers)
    if not isinstance(top, int) or top < 0:
        raise RelexInputError(f"top={top!r} must be an int >= 0")
    if isinstance(time_scale, bool) or not isinstance(time_scale, (int, float)) or not time_scale > 0:
        raise RelexInputError(f"time_scale={time_scale!r} must be a number > 0")
    targets = _check_targets(target_steps) if target_steps is not None else []
    budget = parse_size(max_memory)
    plan = _prepare(base, checkpoints, steps, fit_steps, allow_pickle)
    used = _check_counts(plan, rank, fit, window)
    output = Path(output_dir)
    _check_output(output, overwrite)
    fit_count = plan.num_fit
    x_all = torch.tensor(plan.steps, dtype=torch.float64)
    x_fit = x_all[:fit_count]
    x_window = x_fit[-used:]
    x_held = x_all[fit_count:]
    held_rows = list(range(fit_count, len(plan.models)))
    largest = sorted(plan.tracked, key=lambda n: -plan.base.tensors[n].numel)[:top]
    errors = torch.zeros(len(held_rows), dtype=torch.float64)
    norms = torch.zeros(len(held_rows), dtype=torch.float64)
    trajectories: dict[str, dict[str, Any]] = {}

    def weights_fn(name: str, gram: torch.Tensor) -> tuple[None, dict[str, Any]]:
        subspace = subspace_from_gram(gram[:fit_count, :fit_count], rank)
        coefficients = subspace.coefficients
        trend = fit_trend(x_window, coefficients[-used:], kind=fit)
        stats: dict[str, Any] = {
            "explained_variance": subspace.explained_variance,
            "singular_values": _singular_values(subspace),
            "r_squared_in_window": _floats(r_squared(x_window, coefficients[-used:], trend)),
            "r_squared_out_of_window": None,
        }
        held = _project(gram[fit_count:, :fit_count], subspace) if held_rows else coefficients[:0]
        if held_rows:
            if len(held_rows) >= 2:
                spread = (held - held.mean(0)).pow(2).sum(0)
                r2 = r_squared(x_held, held, trend)
                stats["r_squared_out_of_window"] = [float(v) if s > 0 else None for v, s in zip(r2, spread)]
            weights = prediction_weights(subspace, trend(x_held))
            sq_err, sq_norm = _squared_errors(gram, weights, fit_count, held_rows)
            errors.add_(sq_err)
            norms.add_(sq_norm)
            stats["relative_error_out_of_window"] = [float((e / n).sqrt()) if n > 0 else 0.0 for e, n in zip(sq_err, sq_norm)]
        if name in largest:
            every = torch.cat([coefficients, held])
            sign = torch.where(coefficients[-1] < 0, -1.0, 1.0).to(torch.float64)  # display: c grows positive
            trajectories[name] = {
                "steps": plan.steps,
                "coefficients": [_floats(col) for col in (every * sign).T],
                "trend": {"kind": trend.kind, "params": [_floats(col) for col in (trend.params * sign).T],
                          "center": trend.center, "scale": trend.scale},
                "explained_variance": subspace.explained_variance,
                "r_squared_in_window": stats["r_squared_in_window"],
                "r_squared_out_of_window": stats["r_squared_out_of_window"],
            }
        return None, stats

    with atomic_directory(output, overwrite) as staging:
        run = _stream_tensors(plan, len(plan.models), weights_fn, [], budget, num_workers, progress, "report")
        bt = backtest([run.grams[n][:fit_count, :fit_count] for n in plan.tracked], x_fit, rank=rank, kind=fit)
        backtest_info = None
        if bt is not None:
            backtest_info = {"num_fit": bt.num_fit, "ratio": bt.ratio, "distance": bt.distance,
                             "supported_ratio": bt.supported_ratio(backtest_tolerance)}
        tensors = run.tensors
        ev_values = [tensors[n]["explained_variance"] for n in plan.tracked]
        r2_in = [tensors[n]["r_squared_in_window"][0] for n in plan.tracked]
        r2_out = [tensors[n]["r_squared_out_of_window"][0] for n in plan.tracked
                  if tensors[n]["r_squared_out_of_window"] and tensors[n]["r_squared_out_of_window"][0] is not None]
        numel = [tensors[n]["numel"] for n in plan.tracked]
        out_of_window = None
        if held_rows:
            out_of_window = {
                "steps": plan.steps[fit_count:],
                "relative_distance": [float((e / n).sqrt()) if n > 0 else 0.0 for e, n in zip(errors, norms)],
                "r_squared": summarize_explained_variance(r2_out) if r2_out else None,
            }
        horizon_end = max([float(t) * time_scale for t in targets] + plan.steps + [2.0 * plan.fit_steps[-1]])
        report = {
            "format": REPORT_FORMAT,
            "command": "report",
            "steps": plan.steps,
            "fit_steps": plan.fit_steps,
            "window_steps": plan.fit_steps[-used:],
            "heldout_steps": plan.steps[fit_count:],
            "target_steps": targets,
            "settings": _settings(rank=rank, fit=fit, window=window, fit_steps=fit_steps, time_scale=float(time_scale),
                                  max_memory=budget, num_workers=num_workers, backtest_tolerance=backtest_tolerance, top=top),
            "base": str(plan.base.path),
            "checkpoints": _checkpoint_list(plan),
            "tie_word_embeddings": plan.tie_word_embeddings,
            "tied": plan.tied,
            "explained_variance": {
                **summarize_explained_variance(ev_values),
                "numel_weighted_mean": sum(e * n for e, n in zip(ev_values, numel)) / max(sum(numel), 1),
            },
            "r_squared_in_window": summarize_explained_variance(r2_in),
            "out_of_window": out_of_window,
            "backtest": backtest_info,
            "horizon_ratios": {str(t): float(t) * time_scale / plan.fit_steps[-1] for t in targets} if plan.fit_steps[-1] > 0 else {},
            "trajectories": trajectories,
            "tensors": tensors,
            "plots": [],
        }
        if plots:
            report["plots"] = _write_plots(staging, report, plan, rank, horizon_end)
        report["timings"] = {"read_wait_s": run.read_seconds, "gram_s": run.gram_seconds, "compute_s": run.compute_seconds,
                             "total_s": time.perf_counter() - began}
        report["bytes"] = {"read": run.bytes_read, "intermediate": 0}
        write_json(staging / REPORT_NAME, report)
    logger.info("report of %d tensors over %d checkpoints in %.1f s", len(plan.tracked), len(plan.models), time.perf_counter() - began)
    return report


# -- plots ----------------------------------------------------------------------------------------------


def _write_plots(directory: Path, report: dict[str, Any], plan: _Plan, rank: int, horizon_end: float) -> list[str]:
    """explained_variance.png, coefficients.png and r_squared.png (matplotlib, Agg, imported lazily)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'relex-callback[plot]'): no plots written")
        return []
    written = []
    tensors = report["tensors"]

    fig, ax = plt.subplots(figsize=(7, 4))
    values = [tensors[n]["explained_variance"] for n in plan.tracked]
    ax.hist(values, bins=40, range=(0.0, 1.0), color="steelblue", edgecolor="white")
    ax.set_xlabel(f"rank-{rank} explained variance σ₁²/Σσ² per tensor" if rank == 1 else f"rank-{rank} explained variance per tensor")
    ax.set_ylabel("tensors")
    ev = report["explained_variance"]
    ax.set_title(f"{len(values)} tensors: mean {ev.get('mean', 0):.3f}, median {ev.get('median', 0):.3f}")
    fig.tight_layout()
    fig.savefig(directory / "explained_variance.png", dpi=110)
    plt.close(fig)
    written.append("explained_variance.png")

    trajectories = report["trajectories"]
    if trajectories:
        names = list(trajectories)
        cols = 2 if len(names) > 1 else 1
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.2 * rows), squeeze=False)
        fit_steps, held_steps = report["fit_steps"], report["heldout_steps"]
        window_start = report["window_steps"][0]
        for ax, name in zip(axes.flat, names):
            data = trajectories[name]
            c = data["coefficients"][0]
            n_fit = len(fit_steps)
            ax.scatter(fit_steps, c[:n_fit], s=12, color="steelblue", label="fit snapshots", zorder=3)
            if held_steps:
                ax.scatter(held_steps, c[n_fit:], s=12, color="darkorange", label="held out", zorder=3)
            params = torch.tensor(data["trend"]["params"], dtype=torch.float64).T  # [basis, r]
            trend_x = torch.linspace(float(window_start), float(fit_steps[-1]), 50, dtype=torch.float64)
            ext_x = torch.linspace(float(fit_steps[-1]), float(horizon_end), 50, dtype=torch.float64)
            for xs, style, label in ((trend_x, "-", "fitted trend"), (ext_x, "--", "extension")):
                line = _evaluate_trend(data["trend"], params, xs)
                ax.plot(xs.tolist(), line[:, 0].tolist(), style, color="crimson", linewidth=1.2, label=label)
            ax.axvline(float(fit_steps[-1]), color="gray", linestyle=":", linewidth=1)
            r2_out = data["r_squared_out_of_window"]
            subtitle = f"EV {data['explained_variance']:.3f}, R² {data['r_squared_in_window'][0]:.3f}"
            if r2_out and r2_out[0] is not None:
                subtitle += f", out-of-window R² {r2_out[0]:.3f}"
            ax.set_title(f"{name}\n{subtitle}", fontsize=8)
            ax.set_xlabel("step")
            ax.set_ylabel("c₁ = Δ·v₁")
            ax.grid(True, alpha=0.3)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(directory / "coefficients.png", dpi=110)
        plt.close(fig)
        written.append("coefficients.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    r2_in = [tensors[n]["r_squared_in_window"][0] for n in plan.tracked]
    ax.hist(_clip(r2_in), bins=40, range=(-1.0, 1.0), color="steelblue", alpha=0.7, label="in window")
    r2_out = [tensors[n]["r_squared_out_of_window"][0] for n in plan.tracked
              if tensors[n]["r_squared_out_of_window"] and tensors[n]["r_squared_out_of_window"][0] is not None]
    if r2_out:
        ax.hist(_clip(r2_out), bins=40, range=(-1.0, 1.0), color="darkorange", alpha=0.7, label="out of window")
    ax.set_xlabel("R² of the trend of c₁ per tensor (clipped at −1)")
    ax.set_ylabel("tensors")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "r_squared.png", dpi=110)
    plt.close(fig)
    written.append("r_squared.png")
    return written


def _clip(values: Sequence[float]) -> list[float]:
    return [max(-1.0, min(1.0, v)) for v in values]


def _evaluate_trend(trend: dict[str, Any], params: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    return Trend(kind=trend["kind"], params=params, center=trend["center"], scale=trend["scale"])(xs)
