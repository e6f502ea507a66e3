"""The digits world: prompt grammar, vocabulary errors, held-out split, rendering."""

import numpy as np
import pytest

from shared import digits


def test_prompts_round_trip_and_split():
    train, heldout = digits.train_prompts(), digits.heldout_prompts()
    assert len(train) == 160 and len(heldout) == 40 and not set(train) & set(heldout)
    for prompt in train + heldout:
        assert digits.parse_prompt(prompt).prompt == prompt
    spec = digits.parse_prompt("a red seven on a blue background")
    assert spec == digits.DigitSpec(7, "red", "blue") and spec.heldout
    # Held out: one background per digit, with every stroke; each part is still seen in training:
    # every digit on the other four backgrounds, every colour pair with other digits.
    held = [digits.parse_prompt(p) for p in heldout]
    assert len({(s.digit, s.background) for s in held}) == 10 and {s.digit for s in held} == set(range(10))
    seen = [digits.parse_prompt(p) for p in train]
    assert not {(s.digit, s.background) for s in seen} & {(s.digit, s.background) for s in held}
    assert len({(s.stroke, s.background) for s in seen}) == 20
    assert all(len({s.background for s in seen if s.digit == d}) == 4 for d in range(10))


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ("a purple seven on a blue background", "unknown word 'purple'"),
        ("a red eleven on a blue background", "unknown word 'eleven'"),
        ("a seven red on a blue background", "expected colour, digit, colour"),
        ("a red seven on a red background", "must differ"),
        ("red seven", "not of the form"),
    ],
)
def test_bad_prompts_name_the_problem(prompt, match):
    with pytest.raises(digits.DigitsPromptError, match=match):
        digits.parse_prompt(prompt)


def test_real_digit_splits_are_disjoint_and_complete():
    train, test, everything = (digits.digit_scans(s) for s in ("train", "test", "all"))
    assert len(train[0]) + len(test[0]) == len(everything[0]) == 1797
    assert set(np.unique(test[1])) == set(range(10))


def test_render_blends_stroke_over_background():
    scans, _ = digits.digit_scans("train")
    image = digits.render(scans[0], "red", "blue")
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert tuple(image[0, 0]) == digits.COLORS["blue"]  # the margin is pure background
    # The most inked pixel is (close to) the stroke colour.
    ink = digits.ink_mask(scans[0])
    y, x = np.unravel_index(ink.argmax(), ink.shape)
    assert np.abs(image[y, x].astype(int) - digits.COLORS["red"]).max() <= 255 * (1 - ink.max()) + 1
