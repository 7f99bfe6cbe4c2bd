"""Output model directories of the offline commands: the base's shard layout, files and dtypes; config,
generation config and tokenizer copied from the base (else the newest checkpoint having them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from ..checkpoints import ModelDir, RelexInputError, SafetensorsWriter, output_file_name
from ..export import check_output_dir, write_json
from .plan import _itemsize, _Plan

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


def _check_output(output: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty output, or one under a file, before any work (the CLI's wording of
    export.check_output_dir)."""
    blocking = next((p for p in (output, *output.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise RelexInputError(
            f"output directory {output} cannot be made: {blocking} is a file. Choose an output directory (--output) "
            "that is not a file and not under one")
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
