"""Checkpoints already on disk: discovery, step numbers, validation, streaming reads and writes.

A *model directory* holds the weights of one snapshot θ_t. It is found in any of the layouts RLVR
runs leave behind:

* a plain Hugging Face directory: ``model.safetensors``, or shards with ``model.safetensors.index.json``;
* transformers / TRL ``checkpoint-N/``;
* verl ``global_step_N/actor/huggingface/`` (also ``huggingface/`` and ``hf_model/``);
* ``global_step_N/``, ``step_N/`` or ``stepN/`` trees as the official RELEX scripts use.

The step t of a directory comes from its name or one of its parents (``checkpoint-N``,
``global_step_N``, ``step_N``, ``stepN``), or from an explicit list.

Reads never load a whole checkpoint: :class:`TensorReader` reads the byte range of a flat element
range ``[start, stop)`` of one tensor straight from the safetensors file with ``pread`` into a
reusable buffer, so that peak memory is set by the caller's chunk size and no file stays mapped.
Pickled ``.bin``/``.pt`` weights are refused unless ``allow_pickle`` is set; they are then loaded
with ``torch.load(weights_only=True)``. :class:`SafetensorsWriter` writes a safetensors file whose
header is known in advance, tensor chunk by tensor chunk, at their final offsets.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "RelexInputError",
    "TensorEntry",
    "ModelDir",
    "STEP_PATTERN",
    "parse_step",
    "find_weights_dir",
    "open_model_dir",
    "discover_checkpoints",
    "is_tied",
    "tied_output_embeddings",
    "validate_trajectory",
    "TensorReader",
    "SafetensorsWriter",
    "output_file_name",
]

logger = logging.getLogger(__name__)


class RelexInputError(ValueError):
    """A problem with the user's input (paths, checkpoints, options); the CLI prints it without a traceback."""


# safetensors dtype strings <-> torch dtypes (those this torch build has).
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)
_TORCH_TO_ST = {dtype: name for name, dtype in _ST_DTYPES.items()}
_FLOATING = {torch.float64, torch.float32, torch.float16, torch.bfloat16}
_FLOATING |= {d for d in _ST_DTYPES.values() if d.is_floating_point}

STEP_PATTERN = re.compile(r"^(?:checkpoint|global_step|step)[_-]?(\d+)$", re.IGNORECASE)
# Where the HF weights of a checkpoint directory may live (verl, OpenRLHF, replication scripts).
_WEIGHT_SUBDIRS = ("", "actor/huggingface", "huggingface", "hf_model", "actor/hf_model")
_PICKLE_PATTERNS = ("pytorch_model*.bin", "model*.bin", "model*.pt", "model*.pth", "consolidated*.pth")
_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_MAX_PROBLEMS_SHOWN = 40


@dataclass(frozen=True)
class TensorEntry:
    """One named tensor of a model directory: where its bytes are and what they hold."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int = -1  # absolute byte offset of the data in a safetensors file; -1 for a pickle
    fmt: str = "safetensors"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def is_floating(self) -> bool:
        return self.dtype in _FLOATING


@dataclass
class ModelDir:
    """The weights of one snapshot: a directory, its step, its weight files and their tensors."""

    path: Path
    fmt: str  # "safetensors" or "pickle"
    files: list[Path]
    tensors: dict[str, TensorEntry]
    index: dict[str, Any] | None = None
    file_metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    step: int | None = None

    @property
    def label(self) -> str:
        return f"step {self.step} ({self.path})" if self.step is not None else str(self.path)

    @property
    def config(self) -> dict[str, Any] | None:
        path = self.path / "config.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RelexInputError(f"cannot read {path}: {err}") from None


# -- discovery ------------------------------------------------------------------------------------------


def parse_step(path: str | os.PathLike, levels: int = 3) -> int | None:
    """Step number from ``path``'s name or one of its ``levels`` parents (``checkpoint-N``, ``global_step_N``, ...)."""
    current = Path(path)
    for _ in range(levels + 1):
        match = STEP_PATTERN.match(current.name)
        if match:
            return int(match.group(1))
        if current.parent == current:
            break
        current = current.parent
    return None


def _safetensors_files(directory: Path) -> list[Path]:
    if (directory / _INDEX_NAMES[0]).is_file():
        return [directory / _INDEX_NAMES[0]]
    files = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    model_files = [p for p in files if p.name.startswith("model")]
    if model_files:
        return model_files
    return [p for p in files if not p.name.startswith(("adapter_", "optimizer", "scheduler"))]


def _pickle_files(directory: Path) -> list[Path]:
    if (directory / _INDEX_NAMES[1]).is_file():
        return [directory / _INDEX_NAMES[1]]
    found: set[Path] = set()
    for pattern in _PICKLE_PATTERNS:
        found.update(p for p in directory.glob(pattern) if p.is_file())
    return sorted(found)


def _has_weights(directory: Path) -> bool:
    return directory.is_dir() and bool(_safetensors_files(directory) or _pickle_files(directory))


def find_weights_dir(path: str | os.PathLike) -> Path | None:
    """The directory holding the weights of checkpoint ``path``: itself, ``actor/huggingface``, ``huggingface``, ..."""
    path = Path(path)
    for sub in _WEIGHT_SUBDIRS:
        candidate = path / sub if sub else path
        if _has_weights(candidate):
            return candidate
    return None


_DAMAGED_FILE_FIX = ("Re-save or re-copy this checkpoint from its source (a copy or a save may have been cut short), or "
                     "leave it out of the checkpoints given.")


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """``(data_start, header)`` of a safetensors file (the format: u64 header length, JSON, data).

    Raises:
        RelexInputError: the file is unreadable, truncated or corrupt (names the file and the fix).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise RelexInputError(f"{path} is not a safetensors file (shorter than 8 bytes). {_DAMAGED_FILE_FIX}")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(size - 8, 1 << 30):
                raise RelexInputError(f"{path} is not a valid safetensors file (header length {length}). {_DAMAGED_FILE_FIX}")
            header = json.loads(handle.read(length))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RelexInputError(f"cannot read the safetensors header of {path}: {err}. {_DAMAGED_FILE_FIX}") from None
    if not isinstance(header, dict):
        raise RelexInputError(f"{path} is not a valid safetensors file (header is not a JSON object). {_DAMAGED_FILE_FIX}")
    data_start = 8 + length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info.get("data_offsets", (0, -1))
        if info.get("dtype") not in _ST_DTYPES:
            raise RelexInputError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        if not 0 <= begin <= end or data_start + end > size:
            raise RelexInputError(f"{path} is truncated or corrupt: tensor {name!r} lies outside the file. {_DAMAGED_FILE_FIX}")
    return data_start, header


def _open_safetensors(directory: Path, listed: list[Path]) -> ModelDir:
    index = None
    if listed and listed[0].name == _INDEX_NAMES[0]:
        try:
            index = json.loads(listed[0].read_text())
            weight_map = index["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise RelexInputError(f"cannot read the shard index {listed[0]}: {err}") from None
        files = sorted({directory / name for name in weight_map.values()})
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise RelexInputError(f"{directory}: shard(s) listed in {listed[0].name} are missing: {', '.join(missing)}")
    else:
        files = listed
    tensors: dict[str, TensorEntry] = {}
    file_metadata: dict[str, dict[str, str]] = {}
    for file in files:
        data_start, header = read_safetensors_header(file)
        file_metadata[file.name] = dict(header.get("__metadata__") or {})
        items = [(n, i) for n, i in header.items() if n != "__metadata__"]
        items.sort(key=lambda item: item[1]["data_offsets"][0])
        for name, info in items:
            if name in tensors:
                raise RelexInputError(f"{directory}: tensor {name!r} appears in two shards")
            entry = TensorEntry(
                name=name,
                dtype=_ST_DTYPES[info["dtype"]],
                shape=tuple(int(s) for s in info["shape"]),
                file=file,
                offset=data_start + int(info["data_offsets"][0]),
            )
            if entry.nbytes != info["data_offsets"][1] - info["data_offsets"][0]:
                raise RelexInputError(f"{file}: tensor {name!r} has {entry.nbytes} bytes of data declared wrongly")
            tensors[name] = entry
    return ModelDir(path=directory, fmt="safetensors", files=files, tensors=tensors, index=index, file_metadata=file_metadata)


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be memory-mapped
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure is an input problem
            raise RelexInputError(f"cannot load {path} with torch.load(weights_only=True): {err}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise RelexInputError(f"{path} does not hold a state dict")
    return state


def _open_pickles(directory: Path, listed: list[Path]) -> ModelDir:
    index = None
    if listed and listed[0].name == _INDEX_NAMES[1]:
        try:
            index = json.loads(listed[0].read_text())
            files = sorted({directory / name for name in index["weight_map"].values()})
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise RelexInputError(f"cannot read the shard index {listed[0]}: {err}") from None
    else:
        files = listed
    tensors: dict[str, TensorEntry] = {}
    for file in files:
        for name, value in _torch_load(file).items():
            if not isinstance(value, torch.Tensor):
                continue
            tensors[name] = TensorEntry(name=name, dtype=value.dtype, shape=tuple(value.shape), file=file, fmt="pickle")
    return ModelDir(path=directory, fmt="pickle", files=files, tensors=tensors, index=index)


def open_model_dir(path: str | os.PathLike, allow_pickle: bool = False, step: int | None = None) -> ModelDir:
    """Open the weights of one snapshot (headers only; no tensor data is read)."""
    path = Path(path)
    if not path.exists():
        raise RelexInputError(
            f"{path} does not exist: RELEX reads a local model directory and downloads nothing. For a Hugging Face Hub "
            f"model, download it first (e.g. `hf download {path} --local-dir DIR`) and pass DIR"
        )
    directory = find_weights_dir(path)
    if directory is None:
        fsdp = sorted(path.rglob("model_world_size_*_rank_*.pt"))[:1]
        hint = ""
        if fsdp:
            hint = (f" It holds FSDP shards ({fsdp[0].name}); merge them to a Hugging Face directory first "
                    "(verl: `python -m verl.model_merger merge`).")
        elif (path / "adapter_model.safetensors").is_file():
            hint = " It holds a PEFT adapter (adapter_model.safetensors); merge it into the base model first."
        raise RelexInputError(
            f"no model weights found in {path}: expected *.safetensors (or model.safetensors.index.json) in it "
            f"or in one of its subdirectories {', '.join(s + '/' for s in _WEIGHT_SUBDIRS if s)}.{hint}"
        )
    listed = _safetensors_files(directory)
    if listed:
        model = _open_safetensors(directory, listed)
    else:
        pickles = _pickle_files(directory)
        if not allow_pickle:
            raise RelexInputError(
                f"{directory} holds only pickled weights ({', '.join(p.name for p in pickles[:3])}). Unpickling "
                "can run arbitrary code, so it is refused by default: convert them to safetensors, or pass "
                "--allow-pickle (allow_pickle=True) to load them with torch.load(weights_only=True)."
            )
        model = _open_pickles(directory, pickles)
    if not model.tensors:
        raise RelexInputError(f"{directory} holds no tensors")
    model.step = step if step is not None else parse_step(directory)
    return model


def _expand(argument: str | os.PathLike) -> list[Path]:
    text = str(argument)
    if not Path(text).exists() and any(ch in text for ch in "*?["):
        return [Path(p) for p in sorted(glob.glob(text))]
    return [Path(text)]


def discover_checkpoints(
    paths: Sequence[str | os.PathLike],
    steps: Sequence[int] | None = None,
    allow_pickle: bool = False,
) -> list[ModelDir]:
    """Resolve ``paths`` (model directories or folders of step-named ones) to model directories sorted by step.

    ``steps``, when given, are the steps of the resolved directories in the order they were found
    (each path in turn; a folder's step-named subdirectories in step order).
    """
    found: list[Path] = []
    for argument in paths:
        expanded = _expand(argument)
        if not expanded:
            raise RelexInputError(f"no checkpoints match {str(argument)!r}")
        for path in expanded:
            if not path.exists():
                raise RelexInputError(f"checkpoint path {path} does not exist")
            if not path.is_dir():
                raise RelexInputError(f"checkpoint path {path} is not a directory")
            if find_weights_dir(path) is not None:
                found.append(path)
                continue
            if STEP_PATTERN.match(path.name):  # a checkpoint directory without weights: say so
                open_model_dir(path, allow_pickle=allow_pickle)
            children = [c for c in path.iterdir() if c.is_dir() and STEP_PATTERN.match(c.name)]
            if not children:
                raise RelexInputError(
                    f"no checkpoints found in {path}: expected model weights (*.safetensors) in it or in "
                    "actor/huggingface/, or subdirectories named checkpoint-N, global_step_N, step_N or stepN"
                )
            children.sort(key=lambda c: int(STEP_PATTERN.match(c.name).group(1)))  # type: ignore[union-attr]
            found.extend(children)
    if not found:
        raise RelexInputError("no checkpoints given")
    if steps is not None and len(steps) != len(found):
        raise RelexInputError(
            f"--steps lists {len(steps)} step(s) but {len(found)} checkpoint(s) were found: "
            + ", ".join(str(p) for p in found[:10])
            + (" ..." if len(found) > 10 else "")
        )
    models = []
    for i, path in enumerate(found):
        models.append(open_model_dir(path, allow_pickle=allow_pickle, step=None if steps is None else int(steps[i])))
    unnamed = [str(m.path) for m in models if m.step is None]
    if unnamed:
        raise RelexInputError(
            "cannot tell the step of " + ", ".join(unnamed[:5]) + (" ..." if len(unnamed) > 5 else "")
            + ": name the directories checkpoint-N, global_step_N, step_N or stepN, or pass --steps"
        )
    models.sort(key=lambda m: m.step)  # type: ignore[arg-type, return-value]
    seen: dict[int, Path] = {}
    for model in models:
        if model.step in seen:
            raise RelexInputError(f"step {model.step} appears twice: {seen[model.step]} and {model.path}")
        seen[model.step] = model.path  # type: ignore[index]
    return models


# -- tied embeddings and validation ---------------------------------------------------------------------

_OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight")
_INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight", "embed_in.weight")


def is_tied(config: dict[str, Any] | None) -> bool:
    """``tie_word_embeddings`` of a config.json (nested ``text_config`` too; transformers' default is True)."""
    if config is None:
        return False
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    text = config.get("text_config")
    if isinstance(text, dict) and "tie_word_embeddings" in text:
        return bool(text["tie_word_embeddings"])
    return True


def tied_output_embeddings(names: Iterable[str], shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, str]:
    """``{output embedding name: input embedding name}`` for a tied model (e.g. lm_head → embed_tokens)."""
    names = list(names)
    inputs = [n for n in names if n.endswith(_INPUT_EMBEDDINGS)]
    pairs = {}
    for name in names:
        if not name.endswith(_OUTPUT_EMBEDDINGS):
            continue
        candidates = [n for n in inputs if shapes is None or n not in shapes or name not in shapes or shapes[n] == shapes[name]]
        if candidates:
            pairs[name] = candidates[0]
    return pairs


def validate_trajectory(base: ModelDir, checkpoints: Sequence[ModelDir], skip: Iterable[str] = ()) -> None:
    """Raise one :class:`RelexInputError` listing every name, shape or dtype mismatch across the snapshots.

    Every checkpoint must hold exactly the base's tensors (``skip`` aside) with the base's shapes;
    floating dtypes must agree across checkpoints (the base may differ: deltas are taken in fp32),
    other dtypes must equal the base's.
    """
    skip = set(skip)
    expected = {n: e for n, e in base.tensors.items() if n not in skip}
    problems: list[str] = []
    reference: dict[str, tuple[torch.dtype, str]] = {}
    for model in checkpoints:
        names = {n for n in model.tensors if n not in skip}
        for name in sorted(expected.keys() - names):
            problems.append(f"{model.label}: missing tensor {name}")
        for name in sorted(names - expected.keys()):
            problems.append(f"{model.label}: tensor {name} is not in the base model")
        for name in [n for n in expected if n in names]:
            want, got = expected[name], model.tensors[name]
            if got.shape != want.shape:
                problems.append(f"{model.label}: {name} has shape {list(got.shape)}, the base has {list(want.shape)}")
                continue
            if want.is_floating != got.is_floating or (not want.is_floating and got.dtype != want.dtype):
                problems.append(f"{model.label}: {name} is {_dtype_name(got.dtype)}, the base has {_dtype_name(want.dtype)}")
                continue
            if got.is_floating:
                first = reference.setdefault(name, (got.dtype, model.label))
                if first[0] != got.dtype:
                    problems.append(
                        f"{model.label}: {name} is {_dtype_name(got.dtype)}, {first[1]} has {_dtype_name(first[0])}"
                    )
    if problems:
        shown = problems[:_MAX_PROBLEMS_SHOWN]
        more = len(problems) - len(shown)
        raise RelexInputError(
            f"the checkpoints do not match the base model ({len(problems)} problem(s)); nothing was read:\n  - "
            + "\n  - ".join(shown)
            + (f"\n  ... and {more} more" if more else "")
        )
    differing = sorted({n for n, (dtype, _) in reference.items() if dtype != expected[n].dtype})
    if differing:
        logger.info(
            "%d tensor(s) have a different dtype in the base than in the checkpoints (e.g. %s: %s vs %s); "
            "deltas are taken in float32.",
            len(differing),
            differing[0],
            _dtype_name(expected[differing[0]].dtype),
            _dtype_name(reference[differing[0]][0]),
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- reading ------------------------------------------------------------------------------------------


class TensorReader:
    """Reads flat element ranges of tensors into caller-owned float32 buffers; counts the bytes read.

    Safetensors data is read with ``pread`` from the exact byte range (no mapping stays alive, so the
    resident memory is the caller's buffers); pickles (only when allowed) go through
    ``torch.load(weights_only=True, mmap=True)``. Thread-safe: each call opens its own descriptor.
    """

    def __init__(self) -> None:
        self.bytes_read = 0
        self._lock = threading.Lock()

    def read_float(self, entry: TensorEntry, start: int, stop: int, out: torch.Tensor, staging: torch.Tensor | None) -> None:
        """Fill ``out`` (float32, ``stop − start`` elements) with elements ``[start, stop)`` of ``entry`` flattened.

        ``staging`` is a uint8 scratch buffer of at least ``(stop − start)·itemsize`` bytes, needed
        when the stored dtype is not float32.
        """
        count = stop - start
        if entry.fmt == "pickle":
            out.copy_(_torch_load(entry.file)[entry.name].reshape(-1)[start:stop])
            self._count(count * entry.itemsize)
            return
        if entry.dtype == torch.float32:
            self._pread(entry, start, stop, out.view(torch.uint8))
            return
        if staging is None:
            raise ValueError(f"reading {entry.name} ({entry.dtype}) needs a staging buffer")
        raw = staging[: count * entry.itemsize]
        self._pread(entry, start, stop, raw)
        _widen(raw, entry.dtype, out)

    def read_tensor(self, entry: TensorEntry) -> torch.Tensor:
        """The whole tensor in its stored dtype and shape (for small non-floating tensors)."""
        if entry.fmt == "pickle":
            self._count(entry.nbytes)
            return _torch_load(entry.file)[entry.name].detach().clone().contiguous()
        raw = torch.empty(entry.nbytes, dtype=torch.uint8)
        self._pread(entry, 0, entry.numel, raw)
        return raw.view(entry.dtype).reshape(entry.shape)

    def _pread(self, entry: TensorEntry, start: int, stop: int, buffer: torch.Tensor) -> None:
        nbytes = (stop - start) * entry.itemsize
        view = memoryview(buffer[:nbytes].numpy()).cast("B")
        offset = entry.offset + start * entry.itemsize
        done = 0
        fd = os.open(entry.file, os.O_RDONLY)
        try:
            while done < nbytes:
                if hasattr(os, "preadv"):
                    got = os.preadv(fd, [view[done:]], offset + done)
                else:  # pragma: no cover - platforms without preadv
                    os.lseek(fd, offset + done, os.SEEK_SET)
                    got = os.readv(fd, [view[done:]])
                if got <= 0:
                    raise OSError(f"unexpected end of file while reading {entry.name} from {entry.file}")
                done += got
        finally:
            os.close(fd)
        self._count(nbytes)

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes


def _widen(raw: torch.Tensor, dtype: torch.dtype, out: torch.Tensor) -> None:
    """``out`` (fp32) ← ``raw`` bytes of ``dtype``, with numpy for bf16/fp16.

    numpy runs single-threaded with the GIL released, so reader threads start no OpenMP teams of their
    own that would spin against the main thread's (oversubscription made reads several times slower).
    """
    if dtype == torch.bfloat16:  # bf16 is the top half of an fp32: widen the bits and shift, in one pass
        np.left_shift(raw.numpy().view(np.uint16), 16, out=out.numpy().view(np.uint32), dtype=np.uint32)
    elif dtype == torch.float16:
        np.copyto(out.numpy(), raw.numpy().view(np.float16))
    else:
        out.copy_(raw.view(dtype))


# -- writing ------------------------------------------------------------------------------------------


def output_file_name(name: str) -> str:
    """The safetensors name of an output shard for a base weight file (pickle names are converted)."""
    if name.endswith(".safetensors"):
        return name
    stem = re.sub(r"\.(bin|pt|pth)$", "", name)
    stem = stem.replace("pytorch_model", "model", 1) if stem.startswith("pytorch_model") else stem
    return stem + ".safetensors"


class SafetensorsWriter:
    """A safetensors file written chunk by chunk at known offsets.

    The header (names, dtypes, shapes, offsets) is written first and the file is sized up front;
    :meth:`write` then places any flat element range of any tensor, in any order. :meth:`close`
    refuses to finish a file in which some tensor was not written completely.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._layout: dict[str, tuple[int, int, int]] = {}  # name -> (begin, nbytes, itemsize)
        self._dtypes: dict[str, torch.dtype] = {}
        offset = 0
        for name, dtype, shape in entries:
            if dtype not in _TORCH_TO_ST:
                raise ValueError(f"cannot write {name}: dtype {dtype} has no safetensors code")
            itemsize = torch.empty((), dtype=dtype).element_size()
            nbytes = math.prod(shape) * itemsize
            header[name] = {"dtype": _TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._layout[name] = (offset, nbytes, itemsize)
            self._dtypes[name] = dtype
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        self._data_start = 8 + len(encoded)
        self.size = self._data_start + offset
        self._remaining = {name: nbytes for name, (_, nbytes, _) in self._layout.items()}
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self._fd, struct.pack("<Q", len(encoded)) + encoded)
        os.ftruncate(self._fd, self.size)

    def write(self, name: str, start: int, values: torch.Tensor) -> None:
        """Write ``values`` (already in the tensor's dtype) as flat elements ``[start, start + n)`` of ``name``."""
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        begin, nbytes, itemsize = self._layout[name]
        if values.dtype != self._dtypes[name]:
            raise ValueError(f"{name} is declared {self._dtypes[name]} in {self.path}, got {values.dtype}")
        data = values.detach().contiguous().reshape(-1).view(torch.uint8)
        position = begin + start * itemsize
        if position + data.numel() > begin + nbytes:
            raise ValueError(f"write past the end of {name} in {self.path}")
        view = memoryview(data.numpy()).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], self._data_start + position + done)
        self._remaining[name] -= len(view)

    def close(self) -> None:
        """Finish the file; raise if any tensor is incomplete."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.close(fd)
        incomplete = [n for n, left in self._remaining.items() if left != 0]
        if incomplete:
            raise RuntimeError(f"{self.path}: tensor(s) not completely written: {', '.join(incomplete[:5])}")

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
