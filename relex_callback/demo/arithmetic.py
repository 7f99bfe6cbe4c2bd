"""An offline, verifiable arithmetic task: "What is {a} + {b}? Reply with just the number."

Prompts are in TRL's conversational format (a list of chat messages), the reward follows TRL's reward
function signature, and everything is generated from a seed: no downloads.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

PROMPT_TEMPLATE = "What is {a} + {b}? Reply with just the number."

_NUMBER = re.compile(r"(?<![\d.])-?\d+(?:\.\d+)?")
_PROMPT_PAIR = re.compile(r"What is (-?\d+) \+ (-?\d+)\?")


def addition_prompt(a: int, b: int) -> list[dict[str, str]]:
    """Return the conversational prompt (one user message) asking for ``a + b``."""
    return [{"role": "user", "content": PROMPT_TEMPLATE.format(a=a, b=b)}]


def prompt_pair(prompt: str | Sequence[dict[str, Any]]) -> tuple[int, int]:
    """Recover ``(a, b)`` from a prompt made by :func:`addition_prompt` (string or messages)."""
    text = prompt if isinstance(prompt, str) else _message_text(prompt[-1])
    match = _PROMPT_PAIR.search(text)
    if match is None:
        raise ValueError(f"not an addition prompt: {text!r}")
    return int(match.group(1)), int(match.group(2))


def _key(a: int, b: int) -> tuple[int, int]:
    """Unordered pair key: ``3 + 5`` and ``5 + 3`` count as the same problem."""
    return (a, b) if a <= b else (b, a)


def _all_keys(max_operand: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(max_operand + 1) for b in range(a, max_operand + 1)]


def _check(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _sample_pairs(
    n: int, rng: random.Random, max_operand: int, exclude: set[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Draw ``n`` distinct unordered pairs not in ``exclude``, each in a random order."""
    keys = [k for k in _all_keys(max_operand) if k not in exclude]
    if n > len(keys):
        raise ValueError(
            f"n={n} exceeds the {len(keys)} distinct unordered pairs {{a, b}} with 0 <= a, b <= "
            f"max_operand={max_operand} left after exclusions; raise max_operand"
        )
    chosen = rng.sample(keys, n)
    return [(a, b) if rng.random() < 0.5 else (b, a) for a, b in chosen]


def _to_dataset(pairs: Iterable[tuple[int, int]]) -> Dataset:
    from datasets import Dataset

    pairs = list(pairs)
    return Dataset.from_dict(
        {"prompt": [addition_prompt(a, b) for a, b in pairs], "answer": [str(a + b) for a, b in pairs]}
    )


def make_addition_dataset(
    n: int,
    seed: int,
    max_operand: int = 50,
    exclude_pairs: Iterable[tuple[int, int]] | None = None,
) -> Dataset:
    """Make ``n`` addition problems with operands in ``[0, max_operand]``.

    Each unordered pair ``{a, b}`` appears at most once, and pairs in ``exclude_pairs`` (in either order)
    never appear. Columns: ``prompt`` (a one-message conversation) and ``answer`` (``str(a + b)``).
    The result depends only on the arguments.
    """
    _check("n", n, 0)
    _check("max_operand", max_operand, 0)
    exclude = {_key(int(a), int(b)) for a, b in (exclude_pairs or ())}
    return _to_dataset(_sample_pairs(n, random.Random(seed), max_operand, exclude))


def split_train_heldout(
    n_train: int, n_heldout: int, seed: int, max_operand: int = 50
) -> tuple[Dataset, Dataset]:
    """Return ``(train, heldout)`` addition datasets with disjoint unordered pairs ``{a, b}``.

    The held-out set is drawn first, so for a given ``seed`` and ``max_operand`` it does not depend on
    ``n_train``.
    """
    _check("n_train", n_train, 0)
    _check("n_heldout", n_heldout, 0)
    _check("max_operand", max_operand, 0)
    total = len(_all_keys(max_operand))
    if n_train + n_heldout > total:
        raise ValueError(
            f"n_train + n_heldout = {n_train + n_heldout} exceeds the {total} distinct unordered pairs "
            f"with max_operand={max_operand}; raise max_operand"
        )
    rng = random.Random(seed)
    heldout = _sample_pairs(n_heldout, rng, max_operand, set())
    train = _sample_pairs(n_train, rng, max_operand, {_key(a, b) for a, b in heldout})
    return _to_dataset(train), _to_dataset(heldout)


def extract_answer(text: str) -> str | None:
    """Return the number after the last ``=`` if there is one, else the last number in ``text``.

    Numbers are integers with an optional sign and decimal part, returned as written (``"19"``,
    ``"-3"``, ``"19.0"``). Returns ``None`` when the text has no number.
    """
    if not isinstance(text, str):
        return None
    if "=" in text:
        match = _NUMBER.search(text.rsplit("=", 1)[1])
        if match is not None:
            return match.group(0)
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _message_text(message: Any) -> str:
    content = message.get("content", "") if isinstance(message, dict) else message
    if isinstance(content, list):  # content blocks: [{"type": "text", "text": ...}, ...]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def completion_text(completion: str | Sequence[dict[str, Any]]) -> str:
    """Text of a TRL completion: a string, or a conversation whose last message is the reply."""
    if isinstance(completion, str):
        return completion
    if not completion:
        return ""
    return _message_text(completion[-1])


def addition_reward(completions: Sequence[Any], answer: Sequence[Any], **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 when the extracted answer equals ``answer`` exactly, else 0.0.

    ``completions`` may be strings or conversational (``[{"role": "assistant", "content": text}]``);
    ``answer`` is the dataset column of the same name, which TRL passes as a keyword argument.
    """
    if len(completions) != len(answer):
        raise ValueError(f"got {len(completions)} completions but {len(answer)} answers")
    rewards = []
    for completion, expected in zip(completions, answer):
        got = extract_answer(completion_text(completion))
        rewards.append(1.0 if got is not None and got == str(expected).strip() else 0.0)
    return rewards


__all__ = [
    "PROMPT_TEMPLATE",
    "addition_prompt",
    "addition_reward",
    "completion_text",
    "extract_answer",
    "make_addition_dataset",
    "prompt_pair",
    "split_train_heldout",
]
