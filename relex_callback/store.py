"""`DiskDeltaStore`: the deltas Δ_t = θ_t − θ_0 in one file of fixed-size rows per process, streamed by the fit.

A store directory holds, per process (rank ``r`` of ``w``):

* ``base-rank{r:05d}-of-{w:05d}.safetensors``: θ_0 of every tracked tensor (slice) in float32, written
  once when θ_0 is captured. Checkpoints name it by its SHA-256 instead of copying it.
* ``deltas-rank{r:05d}-of-{w:05d}.bin``: a header (magic, header length, JSON with the run id, tensor
  names, element counts and dtype) followed by one record per snapshot, written once when it is recorded:
  a 40-byte row header (magic, physical row index, step, payload length, CRC-32 of the payload) and the
  payload, the delta of every tracked tensor in ``buffer_dtype``, concatenated in tracking order. Every
  record has the same size, so row i starts at a known offset. Checkpoints name the rows they cover (row
  indices and CRC-32s) instead of copying them, so the rows survive ``save_total_limit`` rotation. A row
  that left the window (jump mode's thinning or rolling ``window``) is reused by a later snapshot unless the
  last checkpoint covers it, so the file never holds more than twice the window's rows.

Recording computes the delta synchronously into one staging row with the in-memory buffer's own kernel
(:func:`~relex_callback.buffer.write_delta`, bit-identical), then a background thread appends it while the
next training step runs. The fit reads ``[T, E]`` blocks of consecutive elements (E from a fixed read
budget, whatever T and the model size) and serves :mod:`relex_callback.math.core`'s column chunks from
them: the same one-Gram-pass + one-combine-pass algorithm, in the same chunk order, so every result is
bit-identical to the in-memory buffer. The store is storage only; the math does not know it exists.

A half-written or corrupted row is detected (length and CRC-32) and refused when a checkpoint is resumed.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import struct
import uuid
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .buffer import DeltaBuffer, RowReads, TrackedTensor, byte_view, write_delta
from .units import DTYPES, format_bytes

__all__ = ["CheckpointRows", "DiskDeltaStore", "StoredStack", "StoreError", "ROWS_DIR_NAME", "STORE_FORMAT", "FIT_READ_BYTES", "store_file_names", "store_footprint"]

logger = logging.getLogger(__name__)

STORE_FORMAT = 1
STORE_STATE_FORMAT = 2
"""The RELEX state format of a checkpoint that references a disk store's rows (metadata ``"store"``)."""
FIT_READ_BYTES = 64 << 20
"""Bytes of deltas the fit reads per block (``[T, E]`` with E = FIT_READ_BYTES / (T · itemsize))."""

_FILE_MAGIC = b"RELEXDS1"
_ROW_MAGIC = b"RLXROW01"
_ROW_HEADER = struct.Struct("<8sQdQI4x")  # magic, physical row, step, payload bytes, CRC-32 of the payload
_FILE_PREFIX = struct.Struct("<8sQ")  # magic, JSON header length
_IO_BYTES = 1 << 28  # one pwrite/pread moves at most this much (Linux caps a single call near 2 GiB)


class StoreError(RuntimeError):
    """A delta store that is missing, truncated, corrupted or from another run (the message names the file and the fix)."""


def store_file_names(rank: int, world: int) -> tuple[str, str]:
    """``(base file, deltas file)`` names of process ``rank`` of ``world``."""
    tag = f"rank{rank:05d}-of-{world:05d}"
    return f"base-{tag}.safetensors", f"deltas-{tag}.bin"


def store_footprint(
    numels: Iterable[int], capacity: int, dtype: str, read_bytes: int = FIT_READ_BYTES, drops_rows: bool = False,
) -> tuple[int, int]:
    """``(memory bytes, disk bytes)`` of a disk store for one process: θ_0 (fp32) + one staging row + the fit's
    read block in memory; the θ_0 file and ``capacity`` records on disk, twice as many when rows leave the window
    (``drops_rows``: jump mode), since the last checkpoint's rows are kept until the next one."""
    numels = [int(n) for n in numels]
    total = sum(numels)
    itemsize = DTYPES[dtype].itemsize
    memory = total * (4 + itemsize) + read_bytes
    records = 2 * capacity if drops_rows else capacity
    disk = total * 4 + records * (_ROW_HEADER.size + total * itemsize) + 8192 + 256 * len(numels)  # + file headers
    return memory, disk


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    written = 0
    while written < len(data):
        count = os.pwrite(fd, data[written : written + _IO_BYTES], offset + written)
        if count <= 0:
            raise OSError(f"pwrite wrote {count} bytes")
        written += count


def _read_into(fd: int, data: memoryview, offset: int) -> int:
    """Fill ``data`` from ``offset``; returns the bytes read (short only at the end of the file)."""
    done = 0
    while done < len(data):
        count = os.preadv(fd, [data[done : done + _IO_BYTES]], offset + done)
        if count == 0:
            break
        done += count
    return done


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


class StoredStack:
    """``M`` ``[T, numel]`` of one tracked tensor in a :class:`DiskDeltaStore`: what the math's passes use of a
    delta stack (``shape``, ``dtype``, ``device``, ``dim()``, ``[:, a:b]`` column slices), read from disk."""

    def __init__(self, store: "DiskDeltaStore", index: int, rows: Sequence[int]) -> None:
        self.store = store
        self.index = index
        self.rows = tuple(rows)
        self.shape = torch.Size((len(self.rows), store.numels[index]))
        self.dtype = store.dtype
        self.device = torch.device("cpu")

    def dim(self) -> int:
        return 2

    def __getitem__(self, key: Any) -> torch.Tensor:
        if not (isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None) and isinstance(key[1], slice)
                and key[1].step in (None, 1)):
            raise IndexError(f"a stored delta stack serves whole-row column slices [:, a:b], got {key!r}")
        start, stop, _ = key[1].indices(self.shape[1])
        return self.store._columns(self.rows, self.index, start, max(start, stop))

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The whole stack read into memory (``T · numel`` elements), then ``Tensor.to``."""
        return self[:, 0 : self.shape[1]].clone().to(*args, **kwargs)


class DiskDeltaStore(RowReads):
    """θ_0 in memory (float32, exact) plus the delta rows in a file of fixed-size rows (see the module docstring); a
    :class:`~relex_callback.buffer.DeltaStorage` whose checkpoints reference its own rows.

    Args:
        tracked: the tracked tensors (slices) of this process.
        capacity: snapshots the fit window holds (the file holds at most twice as many rows: the window's and
            those of the last checkpoint).
        dtype: stored delta dtype.
        directory: the store directory (created when θ_0 is captured).
        rank, world: this process and the world size (one file pair per process).
        read_bytes: the fit's read block in bytes.
    """

    def __init__(
        self, tracked: Iterable[TrackedTensor], capacity: int, dtype: str, directory: str | os.PathLike,
        rank: int = 0, world: int = 1, read_bytes: int = FIT_READ_BYTES,
    ) -> None:
        self.tracked = list(tracked)
        self.capacity = int(capacity)
        self.dtype = DTYPES[dtype]
        self.steps: list[float] = []
        self.theta0: dict[str, torch.Tensor] = {}
        self.directory = Path(directory)
        self.dtype_name = dtype
        self.rank, self.world = rank, world
        self.read_bytes = int(read_bytes)
        self.names = [item.name for item in self.tracked]
        self.numels = [item.numel for item in self.tracked]
        self.offsets = [0]
        for numel in self.numels:
            self.offsets.append(self.offsets[-1] + numel)
        self.row_elements = self.offsets[-1]
        self.payload_bytes = self.row_elements * self.dtype.itemsize
        self.record_bytes = _ROW_HEADER.size + self.payload_bytes
        base_name, deltas_name = store_file_names(rank, world)
        self.base_path = self.directory / base_name
        self.deltas_path = self.directory / deltas_name
        self.rows: list[int] = []  # physical row of each logical snapshot (parallel to ``steps``)
        self.row_crc32: dict[int, int] = {}
        self.run_id: str | None = None
        self.base_sha256: str | None = None
        self.data_start = 0
        self.next_row = 0  # rows the file holds
        self._checkpointed: set[int] = set()  # rows the last checkpoint references: never reused
        self._fd: int | None = None
        self._staging: torch.Tensor | None = None
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="relex-store")
        self._pending: tuple[int, concurrent.futures.Future] | None = None
        self._stage: torch.Tensor | None = None
        self._stage_key: tuple[tuple[int, ...], int, int] | None = None  # rows, first element, elements per row

    location = "disk"

    # -- sizing ---------------------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Host memory of this process: θ_0, the staging row and the fit's read block."""
        return store_footprint(self.numels, self.capacity, self.dtype_name, self.read_bytes)[0]

    @property
    def disk_nbytes(self) -> int:
        """Bytes on disk now: the θ_0 file and every record written so far."""
        return sum(p.stat().st_size for p in (self.base_path, self.deltas_path) if p.is_file())

    # -- files ----------------------------------------------------------------------------------------------

    def _header(self) -> bytes:
        body = json.dumps({
            "format": STORE_FORMAT, "run_id": self.run_id, "dtype": self.dtype_name, "names": self.names,
            "numels": self.numels, "rank": self.rank, "world_size": self.world, "base_sha256": self.base_sha256,
        }).encode()
        prefix_len = _FILE_PREFIX.size + len(body)
        padded = -(-prefix_len // 4096) * 4096  # rows start 4 KiB-aligned
        return _FILE_PREFIX.pack(_FILE_MAGIC, len(body)) + body + b"\0" * (padded - prefix_len)

    def _row_offset(self, row: int) -> int:
        return self.data_start + row * self.record_bytes

    def _open(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.deltas_path, os.O_RDWR)

    def close(self) -> None:
        """Finish the pending write and close the file (the store stays on disk)."""
        if self._fd is None:
            return
        self.flush()
        os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            if self._fd is not None:
                os.close(self._fd)
            self._writer.shutdown(wait=False)
        except Exception:
            pass

    # -- recording ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def capture_base(self) -> None:
        """θ_0 ← the current weights; writes the θ_0 file and a new, empty deltas file (each tmp + rename)."""
        self.flush()
        self.steps, self.rows, self.row_crc32, self.next_row = [], [], {}, 0
        self._checkpointed = set()
        self._stage_key = None
        pin = torch.cuda.is_available()
        for item in self.tracked:
            base = torch.empty(item.numel, dtype=torch.float32, pin_memory=pin)
            base.copy_(item.view())
            self.theta0[item.name] = base
        self._create_files()
        if self._staging is None:
            self._staging = torch.empty(self.row_elements, dtype=self.dtype, pin_memory=pin)

    def _create_files(self) -> None:
        """Write ``self.theta0`` as the θ_0 file and a new, empty deltas file under a new run id (each tmp + rename)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.deltas_path.exists():
            logger.warning("RELEX: replacing the delta rows of an earlier run in %s; checkpoints of that run can no "
                           "longer resume RELEX", self.directory)
        self.run_id = uuid.uuid4().hex
        tmp = self.base_path.with_name(self.base_path.name + ".tmp")
        save_file({name: self.theta0[name] for name in self.names}, str(tmp),
                  metadata={"relex_store_run_id": self.run_id, "rank": str(self.rank), "world_size": str(self.world)})
        self.base_sha256 = _sha256(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        tmp.replace(self.base_path)
        header = self._header()
        tmp = self.deltas_path.with_name(self.deltas_path.name + ".tmp")
        with open(tmp, "wb") as handle:
            handle.write(header)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self.deltas_path)
        self.data_start = len(header)
        self._open()

    @torch.no_grad()
    def record(self, step: float) -> None:
        """Δ_step = θ_step − θ_0 into the staging row (bit-identical to the in-memory buffer), appended by the writer
        thread; waits for the previous append first."""
        if not self.theta0 or self._fd is None:
            raise RuntimeError("capture_base() must run before record()")
        if len(self.steps) >= self.capacity:
            raise RuntimeError(f"delta buffer is full ({self.capacity} snapshots)")
        self.flush()
        scratch: list[torch.Tensor] = []
        for index, item in enumerate(self.tracked):
            base = self.theta0[item.name]
            current = item.view()
            if current.device != base.device:
                current = current.to(base.device)
            write_delta(current, base, self._staging[self.offsets[index] : self.offsets[index + 1]], scratch)
        row = self._free_row()
        self._stage_key = None  # the row may be a reused one that the read stage holds
        self._pending = (row, self._writer.submit(self._append, row, float(step)))
        self.rows.append(row)
        self.steps.append(float(step))

    def _free_row(self) -> int:
        """The lowest row that neither the window nor the last checkpoint uses, else a new row at the end."""
        used = set(self.rows) | self._checkpointed
        for row in range(self.next_row):
            if row not in used:
                return row
        self.next_row += 1
        return self.next_row - 1

    def _append(self, row: int, step: float) -> int:
        payload = byte_view(self._staging)
        crc = zlib.crc32(payload)
        offset = self._row_offset(row)
        _write_all(self._fd, memoryview(_ROW_HEADER.pack(_ROW_MAGIC, row, step, self.payload_bytes, crc)), offset)
        _write_all(self._fd, payload, offset + _ROW_HEADER.size)
        return crc

    def flush(self, durable: bool = False) -> None:
        """Wait for the pending append (re-raising its error); ``durable``: also fsync the file."""
        if self._pending is not None:
            row, future = self._pending
            self._pending = None
            self.row_crc32[row] = future.result()
            self._stage_key = None
        if durable and self._fd is not None:
            os.fsync(self._fd)

    def drop_oldest(self, keep: int) -> None:
        excess = len(self.steps) - keep
        if excess > 0:
            self.steps, self.rows = self.steps[excess:], self.rows[excess:]

    def keep_rows(self, rows: Iterable[int]) -> None:
        rows = sorted(set(int(r) for r in rows))
        if rows and not 0 <= rows[0] <= rows[-1] < len(self.steps):
            raise IndexError(f"rows {rows} out of range for {len(self.steps)} snapshots")
        self.steps = [self.steps[r] for r in rows]
        self.rows = [self.rows[r] for r in rows]

    # -- reading --------------------------------------------------------------------------------------------

    def stack(self, name: str, window: int | None = None) -> StoredStack:
        """``M`` ``[T, numel]`` of one tensor (optionally its last ``window`` rows), read from disk on demand."""
        self.flush()
        count = len(self.steps)
        first = 0 if window is None else max(0, count - window)
        return StoredStack(self, self.names.index(name), self.rows[first:count])

    def _columns(self, rows: tuple[int, ...], index: int, start: int, stop: int) -> torch.Tensor:
        """Columns ``[start, stop)`` of tensor ``index`` for physical ``rows``, ``[len(rows), stop − start]``."""
        first, last = self.offsets[index] + start, self.offsets[index] + stop
        key = self._stage_key
        if key is None or key[0] != rows or not key[1] <= first or last > key[1] + key[2]:
            self._fill_stage(rows, first, last)
            key = self._stage_key
        stage = self._stage[: len(rows) * key[2]].view(len(rows), key[2])
        return stage[:, first - key[1] : last - key[1]]

    def _fill_stage(self, rows: tuple[int, ...], first: int, last: int) -> None:
        """Read elements ``[first, first + E)`` of every row in ``rows`` (E from ``read_bytes``, at least ``last − first``)."""
        if self._fd is None:  # read after close(): e.g. a fit called once training has ended
            self._open()
        itemsize = self.dtype.itemsize
        per_row = max(last - first, self.read_bytes // max(len(rows) * itemsize, 1))
        per_row = min(per_row, self.row_elements - first)
        needed = len(rows) * per_row
        if self._stage is None or self._stage.numel() < needed:
            self._stage = torch.empty(needed, dtype=self.dtype)
        stage = self._stage[:needed].view(len(rows), per_row)
        for i, row in enumerate(rows):
            target = byte_view(stage[i])
            offset = self._row_offset(row) + _ROW_HEADER.size + first * itemsize
            if _read_into(self._fd, target, offset) != len(target):
                raise StoreError(
                    f"{self.deltas_path} ends inside row {row}: the delta store was truncated while this run was using "
                    "it. Do not move or edit the store directory during training.")
        self._stage_key = (rows, first, per_row)

    # -- checkpoints ----------------------------------------------------------------------------------------

    def reference(self) -> dict[str, Any]:
        """What a checkpoint records instead of the deltas: the store's files, θ_0's SHA-256, and the rows it
        covers with their CRC-32s (the file is fsynced first)."""
        self.flush(durable=True)
        self._checkpointed = set(self.rows)
        return {
            "format": STORE_FORMAT, "directory": str(self.directory.resolve()), "run_id": self.run_id,
            "base_file": self.base_path.name, "base_sha256": self.base_sha256, "deltas_file": self.deltas_path.name,
            "dtype": self.dtype_name, "payload_bytes": self.payload_bytes, "rows": list(self.rows),
            "row_crc32": [self.row_crc32[r] for r in self.rows], "steps": list(self.steps),
        }

    def checkpoint_metadata(self, state_path: Path, rows_dir: Path, rank: int, world: int) -> dict[str, str]:
        """The rows are on disk already: the state (format 2) references them and copies nothing."""
        return {"format_version": str(STORE_STATE_FORMAT), "store": json.dumps(self.reference())}

    def restore(self, metadata: dict[str, str], keep: int, state_path: Path, rank: int, world: int) -> str:
        self.load_reference(json.loads(metadata["store"]), keep, state_path)
        return f"the delta store {self.directory}"

    @torch.no_grad()
    def load_reference(self, reference: dict[str, Any], keep: int, checkpoint: Path, *, truncate: bool = True,
                       fix: str | None = None, relocate: str = "point store_dir at where it is now") -> None:
        """Restore θ_0 and the first ``keep`` rows a checkpoint references, after checking θ_0's SHA-256 and every
        row's header and CRC-32; ``truncate``: the file is cut after the last kept row, so recording continues from
        there (else new rows go after the file's last whole record). ``fix``/``relocate``: the advice of the errors.

        Raises:
            StoreError: a file is missing, truncated, corrupted or from another run (names the file and the fix).
        """
        self.flush()
        found = [d for d in (self.directory, Path(reference["directory"])) if (d / reference["deltas_file"]).is_file()]
        if not found:
            raise StoreError(
                f"{checkpoint} refers to the RELEX delta store file {reference['deltas_file']} in "
                f"{reference['directory']}, which does not exist (nor in {self.directory}). Restore that directory, or "
                f"{relocate}.")
        if found[0] != self.directory:
            logger.info("RELEX: using the delta store %s named by %s", found[0], checkpoint)
            self.directory = found[0]
            self.base_path, self.deltas_path = found[0] / self.base_path.name, found[0] / self.deltas_path.name
        fix = fix or (f"Resume from a checkpoint whose store is intact, or restart the run without resume_from_checkpoint "
                      f"(the store in {self.directory} is then rebuilt).")
        if not self.base_path.is_file() or _sha256(self.base_path) != reference["base_sha256"]:
            raise StoreError(f"{self.base_path} (θ_0) is missing or its SHA-256 differs from the one {checkpoint} recorded: "
                             f"the base weights changed since the checkpoint was written. {fix}")
        with safe_open(str(self.base_path), framework="pt") as handle:
            for item in self.tracked:
                if item.name not in handle.keys():
                    raise StoreError(f"{self.base_path} lacks θ_0 of {item.name}: the model or the selection changed. {fix}")
                base = handle.get_tensor(item.name)
                if base.numel() != item.numel:
                    raise StoreError(f"{self.base_path} holds {base.numel()} elements of {item.name}, expected "
                                     f"{item.numel}: the model or the selection changed. {fix}")
                target = torch.empty(item.numel, dtype=torch.float32, pin_memory=torch.cuda.is_available())
                self.theta0[item.name] = target.copy_(base)
        self._open()
        header = self._read_header(fix)
        if header.get("run_id") != reference["run_id"] or header.get("dtype") != self.dtype_name or \
                header.get("names") != self.names or header.get("numels") != self.numels:
            raise StoreError(f"{self.deltas_path} belongs to another run or selection (run {header.get('run_id')}, "
                             f"checkpoint {checkpoint} expects run {reference['run_id']}). {fix}")
        self.run_id, self.base_sha256 = reference["run_id"], reference["base_sha256"]
        rows, crcs, steps = reference["rows"][:keep], reference["row_crc32"][:keep], reference["steps"][:keep]
        size = os.fstat(self._fd).st_size
        for row, crc, step in zip(rows, crcs, steps, strict=True):
            self._check_row(row, crc, step, size, fix)
        if truncate:
            self.next_row = (max(rows) + 1) if rows else 0
            os.ftruncate(self._fd, self._row_offset(self.next_row))
            os.fsync(self._fd)
        else:
            self.next_row = max(0, size - self.data_start) // self.record_bytes
        self.rows, self.steps = list(rows), [float(s) for s in steps]
        self.row_crc32 = dict(zip(rows, crcs, strict=True))
        self._checkpointed = set(rows)
        self._stage_key = None
        if self._staging is None:
            self._staging = torch.empty(self.row_elements, dtype=self.dtype, pin_memory=torch.cuda.is_available())

    def _read_header(self, fix: str) -> dict[str, Any]:
        prefix = bytearray(_FILE_PREFIX.size)
        if _read_into(self._fd, memoryview(prefix), 0) != len(prefix):
            raise StoreError(f"{self.deltas_path} is shorter than its header: it was truncated. {fix}")
        magic, length = _FILE_PREFIX.unpack(prefix)
        body = bytearray(length)
        if magic != _FILE_MAGIC or _read_into(self._fd, memoryview(body), _FILE_PREFIX.size) != length:
            raise StoreError(f"{self.deltas_path} is not a RELEX delta store file (bad magic or header). {fix}")
        header = json.loads(bytes(body))
        if header.get("format") != STORE_FORMAT:
            raise StoreError(f"{self.deltas_path} has store format {header.get('format')}; this version reads {STORE_FORMAT}.")
        self.data_start = -(-(_FILE_PREFIX.size + length) // 4096) * 4096
        return header

    def _check_row(self, row: int, crc: int, step: float, size: int, fix: str) -> None:
        offset = self._row_offset(row)
        if offset + self.record_bytes > size:
            raise StoreError(
                f"{self.deltas_path} ends inside row {row} (file {format_bytes(size)}, the row needs bytes up to "
                f"{offset + self.record_bytes}): the row was only half written. {fix}")
        raw = bytearray(_ROW_HEADER.size)
        _read_into(self._fd, memoryview(raw), offset)
        magic, stored_row, stored_step, length, stored_crc = _ROW_HEADER.unpack(raw)
        if magic == _ROW_MAGIC and stored_row == row and length == self.payload_bytes and stored_step != float(step):
            raise StoreError(
                f"{self.deltas_path} row {row} now holds step {stored_step:g}, not step {step:g}: that snapshot left the "
                "window after this checkpoint was written and a later one reused its row (the store keeps the rows of "
                "the window and of the last checkpoint only). Resume from the latest checkpoint.")
        if magic != _ROW_MAGIC or stored_row != row or length != self.payload_bytes or stored_step != float(step):
            raise StoreError(f"{self.deltas_path} row {row} has a damaged header (magic {magic!r}, row {stored_row}, "
                             f"step {stored_step}, {length} bytes). {fix}")
        running, position, chunk = 0, offset + _ROW_HEADER.size, bytearray(min(self.payload_bytes, 1 << 24) or 1)
        remaining = self.payload_bytes
        while remaining:
            view = memoryview(chunk)[: min(len(chunk), remaining)]
            _read_into(self._fd, view, position)
            running = zlib.crc32(view, running)
            position += len(view)
            remaining -= len(view)
        if running != crc or stored_crc != crc:
            raise StoreError(f"{self.deltas_path} row {row} (step {step:g}) fails its CRC-32 check (stored {stored_crc:#010x}, "
                             f"payload {running:#010x}, checkpoint {crc:#010x}): the file is corrupted. {fix}")


ROWS_DIR_NAME = "relex-rows"
"""The run-level row file of an in-memory buffer, beside the checkpoints (``{output_dir}/relex-rows``)."""
ROWS_FORMAT = 1
_ROWS_FIX = ("Resume from a checkpoint whose RELEX rows are intact, or set start_step to this checkpoint's step to "
             "restart the observation from its weights.")


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


class CheckpointRows:
    """The rows of an in-memory :class:`~relex_callback.buffer.DeltaBuffer` written once per run, for checkpoints.

    In ``directory`` (per process, the disk store's file layout): θ_0 in fp32 (``base-…safetensors``, written at
    the first save after θ_0 is captured) and one fixed-size record per snapshot Δ_t (``deltas-…bin``), written at
    the first checkpoint save that holds it. A checkpoint's state (format 3) then names θ_0's SHA-256 and the
    records of its rows (slot, step, CRC-32) instead of copying them: the RELEX state of all checkpoints of a
    halt-mode run costs one copy of θ_0 and the T deltas. A slot is rewritten only when neither the buffer nor a
    checkpoint state listed in ``index-…json`` that still exists references it (rows that jump mode's thinning or
    rolling ``window`` dropped, checkpoints rotated away by ``save_total_limit``).
    """

    def __init__(self, buffer: DeltaBuffer, directory: str | os.PathLike, rank: int = 0, world: int = 1) -> None:
        self.buffer = buffer
        dtype = str(buffer.dtype).removeprefix("torch.")
        self.file = DiskDeltaStore(buffer.tracked, buffer.capacity, dtype, Path(directory).resolve(), rank, world)
        self.slots: dict[float, tuple[int, int]] = {}  # step -> (slot, CRC-32) of the buffer's rows in the file
        self.index_path = self.file.directory / f"index-rank{rank:05d}-of-{world:05d}.json"
        self.checkpoints: list[str] = []  # state files of this run that reference the file

    @property
    def directory(self) -> Path:
        return self.file.directory

    def _referenced(self) -> set[int]:
        """Slots that a checkpoint state of this run on disk references (rotated-away checkpoints drop out)."""
        used, alive = set(), []
        for name in self.checkpoints:
            try:
                with safe_open(name, framework="pt") as handle:
                    reference = json.loads((handle.metadata() or {}).get("rows", "null"))
            except Exception:  # gone or replaced by a non-RELEX file: it references nothing
                continue
            if isinstance(reference, dict) and reference.get("run_id") == self.file.run_id:
                used.update(reference["rows"])
                alive.append(name)
        self.checkpoints = alive
        return used

    @torch.no_grad()
    def save(self, state_path: Path) -> dict[str, Any]:
        """Write the buffer's rows not yet in the file (θ_0 too, the first time), fsync, list ``state_path`` in the
        index; returns the reference that ``state_path`` records (the caller writes it after this returns)."""
        buffer, store = self.buffer, self.file
        if store.run_id is None:
            store.theta0 = {item.name: buffer.theta0[item.name].detach().cpu() for item in buffer.tracked}
            store._create_files()
            store.theta0 = {}
            self.slots, self.checkpoints = {}, []
        self.slots = {step: self.slots[step] for step in buffer.steps if step in self.slots}
        used = self._referenced() | {slot for slot, _ in self.slots.values()}
        if store._staging is None and len(self.slots) < len(buffer.steps):
            store._staging = torch.empty(store.row_elements, dtype=store.dtype)
        for row, step in enumerate(buffer.steps):
            if step in self.slots:
                continue
            slot = next((s for s in range(store.next_row) if s not in used), store.next_row)
            store.next_row = max(store.next_row, slot + 1)
            for index, item in enumerate(buffer.tracked):
                store._staging[store.offsets[index] : store.offsets[index + 1]].copy_(buffer.deltas[item.name][row])
            self.slots[step] = (slot, store._append(slot, float(step)))
            used.add(slot)
        os.fsync(store._fd)
        name = str(Path(state_path).resolve())
        self.checkpoints = [c for c in self.checkpoints if c != name] + [name]
        tmp = self.index_path.with_name(self.index_path.name + ".tmp")
        with open(tmp, "w") as handle:  # before the state that it lists: a crash leaves a harmless extra entry
            handle.write(json.dumps({"run_id": store.run_id, "checkpoints": self.checkpoints}))
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self.index_path)
        return {
            "format": ROWS_FORMAT, "directory": str(store.directory), "relative_directory":
                os.path.relpath(store.directory, Path(state_path).resolve().parent),
            "run_id": store.run_id, "base_file": store.base_path.name, "base_sha256": store.base_sha256,
            "deltas_file": store.deltas_path.name, "dtype": store.dtype_name, "payload_bytes": store.payload_bytes,
            "rows": [self.slots[s][0] for s in buffer.steps], "row_crc32": [self.slots[s][1] for s in buffer.steps],
            "steps": list(buffer.steps),
        }

    @classmethod
    @torch.no_grad()
    def load(cls, buffer: DeltaBuffer, reference: dict[str, Any], keep: int, state_path: Path, rank: int = 0,
             world: int = 1) -> "CheckpointRows":
        """θ_0 and the first ``keep`` rows that ``state_path`` references, checked (θ_0's SHA-256, each row's header
        and CRC-32) and copied into ``buffer``; the row file is found beside the checkpoint first (a moved run),
        else where it was written.

        Raises:
            StoreError: the file is missing, truncated, from another run, or a row it references was reused or
                damaged (names the file and the fix).
        """
        state_path = Path(state_path)
        beside = (state_path.resolve().parent / reference.get("relative_directory", ROWS_DIR_NAME)).resolve()
        index_name = f"index-rank{rank:05d}-of-{world:05d}.json"
        if _read_json(beside / index_name, {}).get("run_id") != reference["run_id"] and \
                _read_json(Path(reference["directory"]) / index_name, {}).get("run_id") == reference["run_id"]:
            beside = Path(reference["directory"])  # a checkpoint copied next to another run's rows
        rows = cls(buffer, beside, rank, world)
        store = rows.file
        store.load_reference(reference, keep, state_path, truncate=False, fix=_ROWS_FIX,
                             relocate="set start_step to this checkpoint's step to restart the observation from its weights")
        tensors = {}
        for item in buffer.tracked:
            tensors[f"theta0/{item.name}"] = store.theta0[item.name]
            tensors[f"deltas/{item.name}"] = store.stack(item.name).to(store.dtype)
        steps = [float(s) for s in reference["steps"][:keep]]
        buffer.load_state_tensors(tensors, steps)
        store.theta0 = {}
        store._stage = None
        rows.slots = {step: (slot, crc) for step, slot, crc in
                      zip(steps, reference["rows"][:keep], reference["row_crc32"][:keep], strict=True)}
        rows.index_path = store.directory / rows.index_path.name
        index = _read_json(rows.index_path, {})
        rows.checkpoints = list(index.get("checkpoints", [])) if index.get("run_id") == store.run_id else []
        return rows
