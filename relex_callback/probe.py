"""Score a model by the reward of its greedy generations on held-out prompts.

:class:`RewardProbe` reuses the reward functions of a TRL ``GRPOTrainer`` and calls them the way the
trainer does (``_calculate_rewards`` in TRL 1.16), so that "reward on held-out prompts" means the same
thing during training and during evaluation of an extrapolated model.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .distributed import all_reduce_max, check_can_generate, shards_parameters
from .options import check_int

logger = logging.getLogger(__name__)

RewardFunc = Callable[..., Any]

# Columns TRL does not forward to reward functions as keyword arguments.
_RESERVED_COLUMNS = ("prompt", "completion", "completion_ids")


def choose_candidate(current: float, scores: Sequence[float], targets: Sequence[float], allow_worse: bool = False) -> int | None:
    """Halt mode's selection rule: the index of the best-scoring candidate (ties: the nearest target), or
    ``None`` (keep the current weights) when it scores below ``current`` and not ``allow_worse``.

    Non-finite scores never win; a non-finite ``current`` accepts the best finite candidate."""
    if len(scores) != len(targets):
        raise ValueError(f"choose_candidate: {len(scores)} scores for {len(targets)} targets")
    ranked = sorted((i for i, v in enumerate(scores) if math.isfinite(v)), key=lambda i: (-scores[i], targets[i]))
    if not ranked:
        return None
    best = ranked[0]
    if math.isfinite(current) and scores[best] < current and not allow_worse:
        return None
    return best


def _is_conversation(value: Any) -> bool:
    """True for a list of chat messages (dicts with a ``role``), TRL's conversational format."""
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(m, Mapping) and "role" in m for m in value)
    )


def _func_name(func: Any) -> str:
    name = getattr(func, "__name__", None)
    if name is None and hasattr(func, "config"):
        name = getattr(func.config, "_name_or_path", None) or None
    return str(name or type(func).__name__)


def _run_awaitable(awaitable: Any) -> Any:
    """Run an awaitable to completion, also from inside a running event loop (e.g. a notebook)."""

    async def _wait() -> Any:
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_wait())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, _wait()).result()


def _module_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


class RewardProbe:
    """Callable ``probe(model) -> float``: mean weighted reward of greedy completions on fixed prompts.

    Prompts are generated with greedy decoding in batches (left padding), completions are cut after the
    first end-of-sequence token and decoded as TRL does, and every reward function is called once over
    all prompts as ``reward_func(prompts=..., completions=..., completion_ids=..., **kwargs)``. The
    keyword arguments are the prompt set's extra columns (one list per column, everything except
    ``prompt``, ``completion`` and ``completion_ids``) plus ``trainer_state`` (what the probe's caller
    passes, else ``None``), ``log_extra`` and ``log_metric`` (recorders; see :attr:`last_extra` and
    :attr:`last_metrics`). Completions are strings for plain-text prompts and
    ``[{"role": "assistant", "content": text}]`` for conversational ones.

    Per prompt, the rewards are combined as TRL does: the weighted sum over reward functions ignoring
    ``None`` (NaN) values; a prompt for which every function returned ``None`` is unscorable (NaN in
    :attr:`last_scores`) and left out of the mean.

    Args:
        prompts: a ``datasets.Dataset`` or a list of dicts, each with a ``prompt`` key (a string, or a
            list of chat messages) and optional extra columns for the reward functions.
        reward_funcs: one reward function or a list of them, as given to ``GRPOTrainer``. Plain and
            ``async`` callables and ``torch.nn.Module`` reward models (sequence classifiers returning
            ``.logits``, with ``reward_processing_classes``) are supported; model ids (strings) are not.
        processing_class: the policy's tokenizer (or a processor with a ``tokenizer`` attribute).
        max_new_tokens: completion length limit.
        batch_size: prompts per ``generate`` call.
        reward_weights: one weight per reward function (default: all 1.0).
        reward_processing_classes: tokenizers of ``nn.Module`` reward models, aligned with
            ``reward_funcs`` (entries for plain functions are ignored).
        chat_template_kwargs: extra keyword arguments for ``apply_chat_template``.
        generation_kwargs: overrides for the ``GenerationConfig`` (default: greedy, one beam).

    Attributes:
        last_scores: per-prompt weighted rewards of the latest call.
        last_rewards_per_func: per-prompt rewards of each function (rows: prompts), latest call.
        last_completions: decoded completion texts of the latest call.
        last_extra: columns reward functions logged with ``log_extra`` in the latest call.
        last_metrics: values reward functions logged with ``log_metric`` in the latest call.

    The model is put in eval mode (each submodule's mode is restored afterwards), run under
    ``torch.no_grad()`` on whatever device it is on. Left padding is done by the probe itself, so the
    tokenizer (its ``padding_side`` included) is never modified.

    On a model whose weights are sharded between processes (FSDP, DeepSpeed ZeRO-3) every process must call the
    probe (RELEX does); each may have its own prompts, batch size and ``max_new_tokens``: the processes run the
    same number of ``generate`` calls and steps (``synced_gpus``), and RELEX averages their scores.
    """

    def __init__(
        self,
        prompts: Any,
        reward_funcs: RewardFunc | Sequence[RewardFunc],
        processing_class: Any,
        max_new_tokens: int = 16,
        batch_size: int = 32,
        reward_weights: Sequence[float] | None = None,
        *,
        reward_processing_classes: Any | Sequence[Any] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        generation_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.reward_funcs = self._check_reward_funcs(reward_funcs)
        self.reward_weights = self._check_weights(reward_weights, len(self.reward_funcs))
        self.reward_processing_classes = self._check_reward_processing_classes(reward_processing_classes)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.generation_kwargs = dict(generation_kwargs or {})

        if processing_class is None:
            raise TypeError("processing_class must be the policy's tokenizer, got None")
        self.processing_class = processing_class
        self._tokenizer = getattr(processing_class, "tokenizer", processing_class)
        for method in ("batch_decode", "decode"):
            if not callable(getattr(self._tokenizer, method, None)):
                raise TypeError(
                    f"processing_class must be a tokenizer with a {method}() method, "
                    f"got {type(processing_class).__name__}"
                )
        self.pad_token_id = self._tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self._tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("processing_class has neither a pad token nor an eos token; set one")

        self.prompts, self.reward_kwargs = self._read_prompts(prompts)
        self.conversational = _is_conversation(self.prompts[0])
        if self.conversational and self._tokenizer_chat_template() is None:
            raise ValueError(
                "prompts are conversational but processing_class has no chat_template; set "
                "processing_class.chat_template or pass chat_template_kwargs={'chat_template': ...}"
            )
        self.prompt_ids = self._tokenize_prompts(self.prompts)

        self.last_scores: list[float] = []
        self.last_rewards_per_func: list[list[float]] = []
        self.last_completions: list[str] = []
        self.last_extra: dict[str, list[Any]] = {}
        self.last_metrics: dict[str, list[float]] = {}

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _check_reward_funcs(reward_funcs: Any) -> list[RewardFunc]:
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs:
            raise ValueError("reward_funcs is empty; pass at least one reward function")
        for i, func in enumerate(funcs):
            if isinstance(func, str):
                raise TypeError(
                    f"reward_funcs[{i}] is the string {func!r}: reward models given by id are not supported "
                    "(nothing is downloaded); pass a callable, e.g. a loaded reward model"
                )
            if not callable(func):
                raise TypeError(f"reward_funcs[{i}] must be callable, got {type(func).__name__}")
        return funcs

    @staticmethod
    def _check_weights(weights: Sequence[float] | None, n_funcs: int) -> torch.Tensor:
        if weights is None:
            return torch.ones(n_funcs, dtype=torch.float64)
        try:
            values = [float(w) for w in weights]
        except (TypeError, ValueError) as exc:
            raise TypeError(f"reward_weights must be a sequence of numbers, got {weights!r}") from exc
        if len(values) != n_funcs:
            raise ValueError(
                f"reward_weights has {len(values)} entries but there are {n_funcs} reward functions"
            )
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"reward_weights must be finite, got {values}")
        return torch.tensor(values, dtype=torch.float64)

    def _check_reward_processing_classes(self, classes: Any) -> list[Any]:
        n = len(self.reward_funcs)
        if classes is None:
            classes = [None] * n
        elif not isinstance(classes, (list, tuple)):
            classes = [classes]
        classes = list(classes)
        if len(classes) != n:
            raise ValueError(
                f"reward_processing_classes has {len(classes)} entries but there are {n} reward functions"
            )
        for i, (func, cls) in enumerate(zip(self.reward_funcs, classes)):
            if isinstance(func, torch.nn.Module):
                if cls is None:
                    raise TypeError(
                        f"reward_funcs[{i}] is a reward model; pass its tokenizer in "
                        "reward_processing_classes (it cannot be downloaded)"
                    )
                if cls.pad_token_id is None:  # as GRPOTrainer does
                    cls.pad_token = cls.eos_token
                    if hasattr(func, "config"):
                        func.config.pad_token_id = cls.pad_token_id
        return classes

    @staticmethod
    def _read_prompts(prompts: Any) -> tuple[list[Any], dict[str, list[Any]]]:
        if prompts is None or isinstance(prompts, (str, bytes, Mapping)):
            raise TypeError(
                "prompts must be a datasets.Dataset or a list of dicts with a 'prompt' key, "
                f"got {type(prompts).__name__}"
            )
        try:
            rows = prompts.to_list() if hasattr(prompts, "to_list") else [prompts[i] for i in range(len(prompts))]
        except TypeError as exc:
            raise TypeError(
                "prompts must be a datasets.Dataset or a list of dicts with a 'prompt' key, "
                f"got {type(prompts).__name__}"
            ) from exc
        if not rows:
            raise ValueError("prompts is empty; the probe needs at least one prompt")
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping) or "prompt" not in row:
                raise ValueError(f"prompts[{i}] must be a dict with a 'prompt' key, got {row!r:.200}")
        texts = [row["prompt"] for row in rows]
        kinds = {_is_conversation(p) for p in texts}
        if len(kinds) > 1:
            raise ValueError("prompts mixes conversational (list of messages) and plain-string prompts")
        if kinds == {False} and not all(isinstance(p, str) for p in texts):
            bad = next(p for p in texts if not isinstance(p, str))
            raise ValueError(
                f"each prompt must be a string or a list of chat messages, got {type(bad).__name__}: {bad!r:.200}"
            )
        keys = [k for k in rows[0] if k not in _RESERVED_COLUMNS]
        kwargs = {k: [row.get(k) for row in rows] for k in keys}
        return texts, kwargs

    def _tokenizer_chat_template(self) -> Any:
        return self.chat_template_kwargs.get("chat_template") or getattr(self.processing_class, "chat_template", None)

    # ------------------------------------------------------------------ generation
    def _tokenize_prompts(self, prompts: list[Any]) -> list[list[int]]:
        ids: list[list[int]] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            if self.conversational:
                out = self.processing_class.apply_chat_template(
                    conversation=batch,
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=True,
                    **self.chat_template_kwargs,
                )
                ids.extend(list(map(int, x)) for x in out["input_ids"])
            else:
                out = self.processing_class(text=batch)
                ids.extend(list(map(int, x)) for x in out["input_ids"])
        return ids

    def _eos_token_ids(self, model: Any) -> list[int]:
        """Every eos id the model's generation config declares, plus the tokenizer's (as TRL does)."""
        gen_config = getattr(model, "generation_config", None)
        eos = getattr(gen_config, "eos_token_id", None)
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        tok_eos = self._tokenizer.eos_token_id
        if tok_eos is not None and tok_eos not in eos_ids:
            eos_ids = [tok_eos, *eos_ids]
        return eos_ids

    def _generation_config(self, eos_ids: list[int]) -> Any:
        from transformers import GenerationConfig

        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": False,
            "num_beams": 1,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": eos_ids or None,
            "use_cache": True,
            "disable_compile": True,
        }
        kwargs.update(self.generation_kwargs)
        return GenerationConfig(**kwargs)

    def _generate(self, model: Any) -> list[list[int]]:
        device = _module_device(model)
        eos_ids = self._eos_token_ids(model)
        gen_config = self._generation_config(eos_ids)
        completion_ids: list[list[int]] = []
        batches = [self.prompt_ids[s : s + self.batch_size] for s in range(0, len(self.prompt_ids), self.batch_size)]
        # on sharded weights every generation step is a collective: each process runs as many generate calls as
        # the busiest one (repeating its last batch, discarded) and keeps stepping until every process is done
        sharded = shards_parameters(model)
        rounds = all_reduce_max(len(batches)) if sharded else len(batches)
        for round_ in range(rounds):
            batch = batches[min(round_, len(batches) - 1)]
            width = max(len(x) for x in batch)
            input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):  # left padding
                if ids:
                    input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[row, width - len(ids) :] = 1
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=gen_config,
                synced_gpus=sharded or None,
            )
            if round_ >= len(batches):
                continue
            for seq in out[:, width:].tolist():
                cut = next((i + 1 for i, t in enumerate(seq) if t in eos_ids), len(seq))
                completion_ids.append(seq[:cut])  # up to and including the first eos, as TRL keeps it
        return completion_ids

    def _decode(self, completion_ids: list[list[int]]) -> tuple[list[Any], list[str]]:
        texts = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        if not self.conversational:
            return list(texts), list(texts)
        tok = self._tokenizer
        if getattr(tok, "response_template", None) is not None or getattr(tok, "response_schema", None) is not None:
            try:
                from trl.chat_template_utils import parse_response
            except ImportError:  # pragma: no cover - trl is optional here
                logger.warning("tokenizer has a response schema but trl is missing; using plain decoding")
            else:
                completions = [
                    [parse_response(tok, ids, prefix=self.prompt_ids[i])] for i, ids in enumerate(completion_ids)
                ]
                return completions, list(texts)
        return [[{"role": "assistant", "content": t}] for t in texts], list(texts)

    # ------------------------------------------------------------------ rewards
    def _reward_model_scores(self, func: Any, cls: Any, completions: list[Any]) -> list[float]:
        if self.conversational:
            texts = [
                cls.apply_chat_template(list(p) + list(c), tokenize=False, **self.chat_template_kwargs)
                for p, c in zip(self.prompts, completions)
            ]
        else:
            texts = [p + c for p, c in zip(self.prompts, completions)]
        device = _module_device(func)
        was_training = func.training
        func.eval()
        scores: list[float] = []
        try:
            for start in range(0, len(texts), self.batch_size):
                enc = cls(
                    text=texts[start : start + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    padding_side="right",
                    add_special_tokens=False,
                )
                enc = {k: v.to(device) for k, v in enc.items()}
                with torch.inference_mode():
                    scores.extend(func(**enc).logits[:, 0].float().cpu().tolist())
        finally:
            func.train(was_training)
        return scores

    def _rewards(self, completions: list[Any], completion_ids: list[list[int]], trainer_state: Any) -> torch.Tensor:
        extra: dict[str, list[Any]] = defaultdict(list)
        metrics: dict[str, list[float]] = defaultdict(list)

        def log_extra(column: str, values: list[Any]) -> None:
            extra[column].extend(values)

        def log_metric(name: str, value: float) -> None:
            metrics[name].append(value)

        kwargs = {k: list(v) for k, v in self.reward_kwargs.items()}
        kwargs.update(trainer_state=trainer_state, log_extra=log_extra, log_metric=log_metric)
        n = len(self.prompts)
        rewards = torch.full((n, len(self.reward_funcs)), math.nan, dtype=torch.float64)
        for j, (func, cls) in enumerate(zip(self.reward_funcs, self.reward_processing_classes)):
            name = _func_name(func)
            if isinstance(func, torch.nn.Module):
                values: list[Any] = self._reward_model_scores(func, cls, completions)
            else:
                result = func(
                    prompts=list(self.prompts), completions=completions, completion_ids=completion_ids, **kwargs
                )
                if inspect.isawaitable(result):
                    result = _run_awaitable(result)
                values = list(result)
            if len(values) != n:
                raise ValueError(
                    f"The reward function '{name}' returned {len(values)} rewards, but {n} were expected "
                    "(one per prompt-completion pair)."
                )
            rewards[:, j] = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float64)
        self.last_extra = dict(extra)
        self.last_metrics = dict(metrics)
        return rewards

    # ------------------------------------------------------------------ call
    def __len__(self) -> int:
        return len(self.prompts)

    def __call__(self, model: Any, trainer_state: Any = None) -> float:
        """Generate greedily for every prompt and return the mean weighted reward (higher is better).

        Args:
            model: a causal LM with ``generate`` (a ``PreTrainedModel`` or PEFT model; a DDP-style
                wrapper is unwrapped through ``.module``).
            trainer_state: passed to reward functions as ``trainer_state`` (e.g. a ``TrainerState``).
        """
        check_can_generate(model)
        if not hasattr(model, "generate") and hasattr(model, "module"):
            model = model.module
        if not callable(getattr(model, "generate", None)):
            raise TypeError(f"model must have a generate() method, got {type(model).__name__}")
        modes = [(m, m.training) for m in model.modules()]
        try:
            model.eval()
            with torch.no_grad():
                completion_ids = self._generate(model)
        finally:
            for module, training in modes:  # restore each submodule's own mode
                module.training = training
        completions, texts = self._decode(completion_ids)
        rewards = self._rewards(completions, completion_ids, trainer_state)
        unscorable = torch.isnan(rewards).all(dim=1)
        scores = (torch.nan_to_num(rewards, nan=0.0) * self.reward_weights.unsqueeze(0)).sum(dim=1)
        scores[unscorable] = math.nan
        self.last_rewards_per_func = rewards.tolist()
        self.last_scores = scores.tolist()
        self.last_completions = texts
        n_bad = int(unscorable.sum())
        if n_bad == len(scores):
            logger.warning("Every reward function returned None for all %d prompts; score is NaN", n_bad)
            return math.nan
        if n_bad:
            logger.warning(
                "%d of %d prompts were unscorable (all rewards None); left out of the mean", n_bad, len(scores)
            )
        score = float(scores[~unscorable].mean())
        logger.debug("RewardProbe: %.4f over %d prompts", score, len(scores) - n_bad)
        return score


__all__ = ["RewardProbe"]
