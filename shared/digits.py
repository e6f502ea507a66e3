"""The digits world: a compositional text-to-image task small enough to learn on two CPU cores.

Images are scikit-learn's handwritten digits (1,797 8x8 scans, shipped inside the package),
rendered as 32x32 RGB pictures with a stroke colour and a background colour. Prompts name the
three factors: "a red seven on a blue background". Both sides import this module: the trainer
pretrains its base model on these pictures, the reward server trains its captioner on them.

Generalization test (the paper's unseen prompts, in miniature): the (digit, background)
combinations in ``HELDOUT_DIGIT_BACKGROUNDS`` are never shown in pretraining, never trained on by
RL, and only evaluated. Every digit is still drawn on the other four backgrounds, and every
(stroke, background) colour pair with the other digits: only these combinations are new.

Real-digit split: scans with index % 5 == 0 (360 of 1,797) are ``test`` (never seen by the base
model or the captioner's training); the rest are ``train``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Five colours far apart in RGB, so every stroke/background pair has contrast.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOR_NAMES = tuple(COLORS)
# (digit, background) combinations never used for pretraining or RL: the held-out prompts (with
# every stroke colour). Each digit is held out on one background and each background on two digits.
# (Holding out colour *pairs* instead was measured: the base never paints an unseen pair, 0 % all
# three right, before or after RL: nothing for RL to transfer to. docs/learning.md.)
HELDOUT_DIGIT_BACKGROUNDS = tuple((d, COLOR_NAMES[d % len(COLOR_NAMES)]) for d in range(10))
IMAGE_SIZE = 32
PROMPT_PATTERN = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")
VOCABULARY = ("a", "on", "background", *DIGIT_WORDS, *COLOR_NAMES)


@dataclass(frozen=True)
class DigitSpec:
    """What a prompt asks for (or what a captioner sees)."""

    digit: int
    stroke: str
    background: str

    @property
    def prompt(self) -> str:
        return f"a {self.stroke} {DIGIT_WORDS[self.digit]} on a {self.background} background"

    @property
    def heldout(self) -> bool:
        return (self.digit, self.background) in HELDOUT_DIGIT_BACKGROUNDS


class DigitsPromptError(ValueError):
    """A prompt outside the digits vocabulary or grammar; the message names the offending word."""


def parse_prompt(prompt: str) -> DigitSpec:
    """ "a red seven on a blue background" -> DigitSpec(7, "red", "blue"), or DigitsPromptError."""
    words = prompt.strip().lower().split()
    unknown = [w for w in words if w not in VOCABULARY]
    if unknown:
        raise DigitsPromptError(
            f"unknown word {unknown[0]!r} in prompt {prompt!r}; digits vocabulary: {', '.join(VOCABULARY)}"
        )
    match = PROMPT_PATTERN.match(" ".join(words))
    if match is None:
        raise DigitsPromptError(
            f"prompt {prompt!r} is not of the form 'a <colour> <digit> on a <colour> background'"
        )
    stroke, digit, background = match.groups()
    if digit not in DIGIT_WORDS or stroke not in COLORS or background not in COLORS:
        raise DigitsPromptError(f"prompt {prompt!r}: expected colour, digit, colour in that order")
    if stroke == background:
        raise DigitsPromptError(f"prompt {prompt!r}: stroke and background colours must differ")
    return DigitSpec(DIGIT_WORDS.index(digit), stroke, background)


def all_specs() -> list[DigitSpec]:
    """Every (digit, stroke, background) with stroke != background: 10 x 20 = 200."""
    return [DigitSpec(d, s, b) for d in range(10) for s in COLOR_NAMES for b in COLOR_NAMES if s != b]


def train_prompts() -> list[str]:
    """The 160 prompts of pretraining and RL."""
    return [spec.prompt for spec in all_specs() if not spec.heldout]


def heldout_prompts() -> list[str]:
    """The 40 prompts never trained on (the held-out (digit, background) combinations, every stroke)."""
    return [spec.prompt for spec in all_specs() if spec.heldout]


@cache
def _load_scans() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32) / 16.0, data.target.astype(np.int64)


def digit_scans(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 8, 8) float ink in [0, 1] and (N,) labels of one split: 'train', 'test' or 'all'."""
    scans, labels = _load_scans()
    index = np.arange(len(labels))
    if split == "train":
        keep = index % 5 != 0
    elif split == "test":
        keep = index % 5 == 0
    elif split == "all":
        keep = np.ones_like(index, dtype=bool)
    else:
        raise ValueError(f"split must be 'train', 'test' or 'all', not {split!r}")
    return scans[keep], labels[keep]


def ink_mask(scan: np.ndarray, size: int = IMAGE_SIZE, shift: tuple[int, int] = (0, 0)) -> np.ndarray:
    """An 8x8 scan as a smooth (size, size) ink coverage in [0, 1], optionally shifted by pixels."""
    from PIL import Image

    # The 8x8 scan fills the middle 24x24 of the 32x32 canvas (a margin, as in the scans' source).
    inner = size * 3 // 4
    up = Image.fromarray((scan * 255).astype(np.uint8)).resize((inner, inner), Image.BICUBIC)
    canvas = np.zeros((size, size), np.float32)
    top = (size - inner) // 2 + shift[0]
    left = (size - inner) // 2 + shift[1]
    canvas[top : top + inner, left : left + inner] = np.asarray(up, np.float32) / 255.0
    return canvas


def render(scan: np.ndarray, stroke: str, background: str, shift: tuple[int, int] = (0, 0)) -> np.ndarray:
    """One (32, 32, 3) uint8 picture: ``background`` blended towards ``stroke`` by the ink."""
    alpha = ink_mask(scan, shift=shift)[..., None]
    fg = np.array(COLORS[stroke], np.float32)
    bg = np.array(COLORS[background], np.float32)
    return np.round(bg * (1 - alpha) + fg * alpha).astype(np.uint8)
