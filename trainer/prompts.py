"""The paper's prompt sets (data files in trainer/data/) and user prompt files.

- ``common_animals``: the 45 common animals.
- ``imagenet_animals``: the 398 animal classes of ImageNet-1k (classes 0-397).
- ``animal_activities``: "a(n) [animal] [activity]" for the common animals x three activities.
- ``digits``: the digits world's training prompts, "a red seven on a blue background"
  (``shared/digits.py``; its held-out (digit, background) combinations are the held-out prompts).
- ``file``: one prompt per line from a user file (blank lines and ``#`` comments skipped).
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

PROMPT_SETS = ("common_animals", "imagenet_animals", "animal_activities", "digits", "file")


def _read_lines(text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@cache
def _data_file(name: str) -> tuple[str, ...]:
    return tuple(_read_lines(resources.files("trainer").joinpath("data", name).read_text("utf-8")))


def with_article(noun: str) -> str:
    return f"{'an' if noun[0].lower() in 'aeiou' else 'a'} {noun}"


def load_prompts(prompt_set: str, path: str | Path | None = None) -> list[str]:
    """Return the prompt list of a named set (``path`` is required for ``file``)."""
    if prompt_set == "common_animals":
        return list(_data_file("common_animals.txt"))
    if prompt_set == "imagenet_animals":
        return list(_data_file("imagenet_animals.txt"))
    if prompt_set == "animal_activities":
        return [
            f"{with_article(animal)} {activity}"
            for animal in _data_file("common_animals.txt")
            for activity in _data_file("activities.txt")
        ]
    if prompt_set == "digits":
        from shared.digits import train_prompts

        return train_prompts()
    if prompt_set == "file":
        if path is None:
            raise ValueError("prompts.path: a prompt file is required when prompts.set is 'file'")
        file = Path(path)
        if not file.is_file():
            raise ValueError(f"prompts.path: no such file: {file}")
        prompts = _read_lines(file.read_text("utf-8"))
        if not prompts:
            raise ValueError(f"prompts.path: {file} holds no prompts (one per line expected)")
        return prompts
    raise ValueError(f"prompts.set: unknown prompt set {prompt_set!r}; valid: {', '.join(PROMPT_SETS)}")


def load_heldout_prompts(prompt_set: str, heldout: list[str] | None = None) -> list[str]:
    """Prompts never trained on, evaluated for generalization: ``heldout`` if given, else the set's own."""
    if heldout is not None:
        return list(heldout)
    if prompt_set == "digits":
        from shared.digits import heldout_prompts

        return heldout_prompts()
    return []


def all_prompt_words() -> list[str]:
    """Every lower-cased word of the built-in sets (the tiny tokenizer's vocabulary)."""
    words: set[str] = {"a", "an", "the", "image", "contains", "of"}
    for prompt_set in ("imagenet_animals", "animal_activities"):
        for prompt in load_prompts(prompt_set):
            words.update(prompt.lower().split())
    return sorted(words)
