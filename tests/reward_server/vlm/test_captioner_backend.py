"""The digits captioner: accuracy on real held-out scans, its answers, its cache, its settings.

The captioner is built once per session (``captioner_folder`` in tests/reward_server/conftest.py);
the cache tests stand a fake trainer in for the minute of training.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from reward_server.settings import ServerSettings
from reward_server.vlm import build_vlm_backend
from reward_server.vlm import captioner as cap
from reward_server.vlm.captioner_backend import CaptionerBackend
from shared.digits import COLOR_NAMES, DIGIT_WORDS, DigitSpec, digit_scans, ink_mask, parse_prompt, render

ROOT = Path(__file__).resolve().parents[3]
CAPTIONER_FLAGS = ["--rewards", "llava_bertscore", "--vlm-backend", "captioner"]
SENTENCE = re.compile(r"^The image shows (a \w+ \w+ on a \w+ background)\.$")


@pytest.fixture(scope="module")
def backend(captioner_folder) -> CaptionerBackend:
    return CaptionerBackend(captioner_folder)


def read(answer: str) -> DigitSpec:
    """What an answer sentence says, parsed with the digits grammar (independent of the captioner)."""
    match = SENTENCE.match(answer)
    assert match, answer
    return parse_prompt(match.group(1))


def test_reads_real_held_out_scans(backend, captioner_folder):
    # Every test scan (never trained on) with every colour pair, through the backend's sentences.
    scans, labels = digit_scans("test")
    assert len(scans) == 360
    pairs = [(s, b) for s in COLOR_NAMES for b in COLOR_NAMES if s != b]
    images = [render(scan, s, b) for scan in scans for s, b in pairs]
    truth = [DigitSpec(int(label), s, b) for label in labels for s, b in pairs]
    seen = [read(a) for a in backend.caption_blocking(images)]
    n = len(truth)
    digit = sum(p.digit == t.digit for p, t in zip(seen, truth, strict=True)) / n
    stroke = sum(p.stroke == t.stroke for p, t in zip(seen, truth, strict=True)) / n
    background = sum(p.background == t.background for p, t in zip(seen, truth, strict=True)) / n
    all_three = sum(p == t for p, t in zip(seen, truth, strict=True)) / n
    assert digit >= 0.95
    assert stroke >= 0.99 and background >= 0.99
    # The figures stored at build time are these very numbers.
    stored = json.loads((captioner_folder / cap.META_FILE).read_text())["accuracy_on_test_scans"]["clean"]
    assert stored["images"] == n == 7200
    assert [stored["digit"], stored["stroke"], stored["background"], stored["all_three"]] == pytest.approx(
        [digit, stroke, background, all_three]
    )


def test_answers_one_sentence_whatever_the_question(backend):
    scans, labels = digit_scans("test")
    image = render(scans[0], "red", "blue")
    questions = ["what is going on in this image?", "how many cats?", ""]
    answers = asyncio.run(backend.answer([image] * 3, questions))
    assert len(set(answers)) == 1  # a captioner: the question is ignored
    assert read(answers[0]) == DigitSpec(int(labels[0]), "red", "blue")
    assert answers[0] == f"The image shows a red {DIGIT_WORDS[labels[0]]} on a blue background."
    # Other sizes are resized; an empty batch is empty; malformed input is the caller's error.
    big = image.repeat(2, axis=0).repeat(2, axis=1)
    assert read(asyncio.run(backend.answer([big], ["q"]))[0]).stroke == "red"
    assert asyncio.run(backend.answer([], [])) == []
    with pytest.raises(ValueError, match="2 questions"):
        asyncio.run(backend.answer([image], ["q", "q"]))
    with pytest.raises(ValueError, match="uint8"):
        asyncio.run(backend.answer([image.astype(np.float32)], ["q"]))


def test_built_by_name_from_settings(captioner_folder):
    settings = ServerSettings(vlm_backend="captioner", captioner_path=str(captioner_folder))
    backend = build_vlm_backend("captioner", settings)
    assert isinstance(backend, CaptionerBackend)
    # "builtin" resolves to the cached build of this session (nothing is trained again).
    settings = ServerSettings(vlm_backend="captioner", captioner_path="builtin")
    assert build_vlm_backend("captioner", settings).meta["recipe_key"] == cap.Recipe().key()


# --- training data ----------------------------------------------------------------------------------


def test_unaugmented_batch_is_shared_digits_render():
    scans, labels = digit_scans("test")
    index = torch.arange(0, 40)
    pairs = torch.arange(40) % len(cap.COLOR_PAIRS)
    x, digit, stroke, background = cap.make_batch(
        cap.clean_masks(scans), torch.from_numpy(labels), cap.Recipe(), torch.Generator(), False, index, pairs
    )
    for i in range(40):
        s, b = cap.COLOR_PAIRS[int(pairs[i])]
        expected = render(scans[i], s, b)
        np.testing.assert_array_equal((x[i] * 255).round().byte().permute(1, 2, 0).numpy(), expected)
        assert (int(digit[i]), COLOR_NAMES[int(stroke[i])], COLOR_NAMES[int(background[i])]) == (
            labels[i],
            s,
            b,
        )


def test_shifts_equal_ink_mask_shifts():
    scans, _ = digit_scans("train")
    masks = cap.clean_masks(scans[:49])
    shifts = torch.tensor([(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)])
    shifted = cap.shift_masks(masks, shifts)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        np.testing.assert_array_equal(shifted[i].numpy(), ink_mask(scans[i], shift=(dy, dx)))


def test_training_batches_are_seeded():
    scans, labels = digit_scans("train")
    masks, labels_t = cap.clean_masks(scans), torch.from_numpy(labels)
    recipe = cap.Recipe()
    a = cap.make_batch(masks, labels_t, recipe, torch.Generator().manual_seed(1))
    b = cap.make_batch(masks, labels_t, recipe, torch.Generator().manual_seed(1))
    c = cap.make_batch(masks, labels_t, recipe, torch.Generator().manual_seed(2))
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], c[0])
    # Held-out colour pairs are trained on too: the judge must know every pair.
    assert len(cap.COLOR_PAIRS) == 20 and ("red", "blue") in cap.COLOR_PAIRS


@pytest.mark.parametrize("only", ["max_shift", "color_jitter", "noise_std_max", "blur_max", None])
def test_each_augmentation_changes_the_pictures(only):
    off = {"max_shift": 0, "color_jitter": 0.0, "noise_std_max": 0.0, "blur_max": 0.0}
    recipe = cap.Recipe(**{**off, **({only: getattr(cap.Recipe(), only)} if only else {})})
    scans, labels = digit_scans("test")
    index, pairs = torch.arange(100), torch.arange(100) % len(cap.COLOR_PAIRS)
    generator = torch.Generator().manual_seed(0)
    x, *_ = cap.make_batch(
        cap.clean_masks(scans), torch.from_numpy(labels), recipe, generator, True, index, pairs
    )
    pictures = (x * 255).round().byte().permute(0, 2, 3, 1).numpy().astype(int)
    clean = np.stack([render(scans[i], *cap.COLOR_PAIRS[int(p)]) for i, p in zip(index, pairs, strict=True)])
    changed = [not np.array_equal(a, b) for a, b in zip(pictures, clean, strict=True)]
    if only is None:
        assert not any(changed)  # everything off: exactly the clean renders
        return
    assert sum(changed) > 50, only
    corners = pictures[:, [0, 0, -1, -1], [0, -1, 0, -1]]  # (B, 4, 3): background only
    if only == "color_jitter":  # the background colour moves, by at most the jitter, evenly
        assert (corners == corners[:, :1]).all()
        assert np.abs(corners[:, 0] - clean[:, 0, 0]).max() <= recipe.color_jitter + 0.5
    elif only == "noise_std_max":  # pixels of one colour differ from each other
        assert (corners != corners[:, :1]).any(axis=(1, 2)).mean() > 0.5
    else:  # shifts and blur move ink, not the background
        assert (corners == clean[:, :1, :1].reshape(-1, 1, 3)).all()


# --- the cache ----------------------------------------------------------------------------------------


@pytest.fixture
def fake_training(monkeypatch, captioner_folder):
    """Stand-ins for the minute of training and the measuring: the session's net, its stored figures."""
    calls = {"train": 0}
    net, meta = cap.load(captioner_folder)

    def train(recipe, progress=True):
        calls["train"] += 1
        return net

    monkeypatch.setattr(cap, "train", train)
    monkeypatch.setattr(cap, "measure", lambda net, recipe: meta["accuracy_on_test_scans"])
    return calls


def test_the_folder_appears_complete_or_not_at_all(tmp_path, monkeypatch, fake_training):
    target = tmp_path / f"captioner-{cap.Recipe().key()}"
    saved_into = []
    original_save = cap.save

    def save(net, recipe, measured, folder, seconds):
        assert not target.exists()  # nothing at the target while files are being written
        saved_into.append(folder)
        original_save(net, recipe, measured, folder, seconds)

    monkeypatch.setattr(cap, "save", save)
    assert cap.ensure_captioner(tmp_path, progress=False) == target
    assert saved_into[0] != target and saved_into[0].parent == tmp_path  # a sibling, then renamed
    assert not saved_into[0].exists() and cap.captioner_problem(target) is None


def test_second_ensure_reuses_the_cache(tmp_path, fake_training):
    first = cap.ensure_captioner(tmp_path, progress=False)
    assert fake_training["train"] == 1
    mtime = (first / cap.WEIGHTS_FILE).stat().st_mtime_ns
    assert cap.ensure_captioner(tmp_path, progress=False) == first
    assert fake_training["train"] == 1
    assert (first / cap.WEIGHTS_FILE).stat().st_mtime_ns == mtime
    assert first.name == f"captioner-{cap.Recipe().key()}"
    # Another recipe is another folder.
    other = cap.ensure_captioner(tmp_path, recipe=cap.Recipe(seed=1), progress=False)
    assert other != first and fake_training["train"] == 2


def test_the_session_build_was_reused(captioner_folder):
    assert cap.ensure_captioner(progress=False) == captioner_folder


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: (f / cap.WEIGHTS_FILE).unlink(),
        lambda f: _truncate(f / cap.WEIGHTS_FILE),
        lambda f: (f / cap.META_FILE).unlink(),
        lambda f: (f / cap.META_FILE).write_text("{not json"),
        lambda f: [p.unlink() for p in f.iterdir()],
    ],
    ids=["weights-missing", "weights-truncated", "json-missing", "json-corrupt", "empty"],
)
def test_damaged_cache_folder_is_rebuilt(tmp_path, fake_training, damage):
    folder = cap.ensure_captioner(tmp_path, progress=False)
    damage(folder)
    assert cap.captioner_problem(folder) is not None
    assert cap.ensure_captioner(tmp_path, progress=False) == folder
    assert fake_training["train"] == 2
    assert cap.captioner_problem(folder) is None


def test_failed_build_leaves_nothing(tmp_path, monkeypatch, fake_training):
    leftover = tmp_path / f".captioner-{cap.Recipe().key()}.building-old"  # a build killed earlier
    leftover.mkdir()

    def broken(recipe, progress=True):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(cap, "train", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        cap.ensure_captioner(tmp_path, progress=False)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # neither the target nor a temp folder


def test_a_captioner_that_cannot_read_digits_is_refused(tmp_path, monkeypatch, fake_training):
    poor = {"clean": {"digit": 0.6, "stroke": 1.0, "background": 1.0, "all_three": 0.6, "images": 7200}}
    monkeypatch.setattr(cap, "measure", lambda net, recipe: poor)
    with pytest.raises(cap.CaptionerError, match=r"60\.0% of the test digits"):
        cap.ensure_captioner(tmp_path, progress=False)
    assert not (tmp_path / f"captioner-{cap.Recipe().key()}").exists()


def test_build_into_an_exact_folder_never_overwrites(tmp_path, fake_training):
    out = tmp_path / "mine"
    assert cap.build_into(out, progress=False) == out and fake_training["train"] == 1
    assert cap.build_into(out, progress=False) == out and fake_training["train"] == 1  # reused
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(cap.CaptionerError, match=f"refusing to overwrite {foreign}"):
        cap.build_into(foreign, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(cap.CaptionerError, match="another recipe"):
        cap.build_into(out, recipe=cap.Recipe(seed=3), progress=False)


def test_build_command_prints_the_folder_and_accuracy(captioner_folder):
    # The session's cache already holds the captioner: the command reuses it (seconds, not a minute).
    result = subprocess.run(
        [sys.executable, "-m", "reward_server.vlm.captioner", "build"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(captioner_folder)
    assert re.search(r"clean +\(7200 images\): digit 9\d\.\d\d%", result.stderr)


# --- settings: the server refuses to start without a captioner ----------------------------------------


def test_settings_require_a_captioner_path(tmp_path, captioner_folder):
    with pytest.raises(ValidationError, match="captioner_path"):
        ServerSettings(vlm_backend="captioner", rewards=["llava_bertscore"])
    empty = tmp_path / "empty"
    empty.mkdir()
    for path in (empty, tmp_path / "missing"):
        with pytest.raises(ValidationError, match=rf"captioner_path: {re.escape(str(path))}"):
            ServerSettings(vlm_backend="captioner", captioner_path=str(path))
    broken = tmp_path / "broken"
    shutil.copytree(captioner_folder, broken)
    _truncate(broken / cap.WEIGHTS_FILE)
    with pytest.raises(ValidationError, match="does not hold a usable digits captioner"):
        ServerSettings(vlm_backend="captioner", captioner_path=str(broken))
    ServerSettings(vlm_backend="captioner", captioner_path=str(captioner_folder))
    ServerSettings(vlm_backend="captioner", captioner_path="builtin")
    ServerSettings()  # other backends do not need it


@pytest.mark.parametrize("path", [None, "missing-folder"])
def test_reward_server_cli_fails_at_start_up_naming_captioner_path(tmp_path, path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DDPO_REWARD_CAPTIONER_PATH", None)
    if path is not None:
        env["DDPO_REWARD_CAPTIONER_PATH"] = str(tmp_path / path)
    result = subprocess.run(
        [sys.executable, "-m", "reward_server.cli", "--port", str(port), *CAPTIONER_FLAGS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "invalid settings" in result.stderr and "captioner_path" in result.stderr
    if path is not None:
        assert str(tmp_path / path) in result.stderr
