"""The digits captioner: a small CNN that plays the VLM of the alignment reward in the digits world.

It looks at a 32x32 RGB picture of shared/digits.py and names the digit, the stroke colour and the
background colour; ``captioner_backend.py`` turns that into an answer sentence. It is trained here,
in well under two minutes on two CPU cores, from the real scans of the ``train`` split rendered with
every colour pair (the held-out prompts' combinations included: the judge must know them), with augmentation
for what a small diffusion model and its VAE draw: shifts of up to 3 px, jittered colours, slight
blur and pixel noise. Its accuracy is measured on the 360 ``test`` scans (never trained on) rendered
with every colour pair, and stored next to the weights.

A built captioner is a folder: ``model.safetensors`` + ``captioner.json`` (format, recipe, class
names, measured accuracy). ``ensure_captioner()`` builds one into the cache
(``$DDPO_CACHE``, else ``~/.cache/ddpo-stack``) under a name keyed by a hash of the recipe, or
reuses it. Folders are built next to their target and renamed into place, so a half-written folder
is never used; a damaged cached folder is rebuilt.

    python -m reward_server.vlm.captioner build [--out DIR]     # or: ddpo-build-captioner
    python -m reward_server.vlm.captioner evaluate DIR
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.digits import COLOR_NAMES, COLORS, DIGIT_WORDS, IMAGE_SIZE, digit_scans, ink_mask, render

FORMAT = "ddpo-digits-captioner-v1"  # what the folder layout and the JSON keys mean
WEIGHTS_FILE = "model.safetensors"
META_FILE = "captioner.json"
MIN_DIGIT_ACCURACY = 0.95  # on the clean test renders; a build below it fails
# Every (stroke, background) pair of the digits world, held-out ones included.
COLOR_PAIRS = tuple((s, b) for s in COLOR_NAMES for b in COLOR_NAMES if s != b)


class CaptionerError(RuntimeError):
    """A folder that does not hold a usable captioner; the message names the folder."""


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights; its hash names the cache folder."""

    version: str = "digits-captioner-v1"  # bump when the code changes what a recipe trains
    seed: int = 0
    steps: int = 1200
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    channels: tuple[int, int, int] = (16, 32, 64)
    hidden: int = 128
    max_shift: int = 3  # pixels, each axis
    color_jitter: float = 20.0  # uniform +-, per channel, 0-255 units
    noise_std_max: float = 8.0  # Gaussian pixel noise, std uniform in [0, this], 0-255 units
    blur_max: float = 1.0  # blur strength uniform in [0, this] (see blur())
    threads: int = 1  # torch threads while training: CPU results depend on it; 1 is also fastest here
    augmented_eval_seed: int = 12345

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Recipe:
        return cls(**{**values, "channels": tuple(values["channels"])})


def default_cache_dir() -> Path:
    """The project's cache folder (the same rule as trainer.tiny, which reward_server must not import)."""
    return Path(os.environ.get("DDPO_CACHE", Path.home() / ".cache" / "ddpo-stack"))


# --- the network ----------------------------------------------------------------------------------


class CaptionerNet(nn.Module):
    """Three conv blocks (32 -> 16 -> 8 -> 4 px) and three heads: digit, stroke, background."""

    def __init__(self, channels: Sequence[int] = (16, 32, 64), hidden: int = 128):
        super().__init__()
        c1, c2, c3 = channels
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c3 * (IMAGE_SIZE // 8) ** 2, hidden), nn.ReLU(),
        )  # fmt: skip
        self.digit = nn.Linear(hidden, len(DIGIT_WORDS))
        self.stroke = nn.Linear(hidden, len(COLOR_NAMES))
        self.background = nn.Linear(hidden, len(COLOR_NAMES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, 3, 32, 32) in [0, 1]; logits of digit, stroke colour, background colour."""
        h = self.features(x)
        return self.digit(h), self.stroke(h), self.background(h)


def images_to_tensor(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 pictures -> (B, 3, 32, 32) float in [0, 1]; other sizes are resized (antialiased)."""
    from PIL import Image

    arrays = []
    for img in images:
        if img.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
            img = np.asarray(Image.fromarray(img).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
        arrays.append(img)
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch.float() / 255.0


@dataclass
class Prediction:
    digit: int
    stroke: str
    background: str


def decode(logits: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> list[Prediction]:
    """Most likely digit, and most likely (stroke, background) pair with different colours.

    Pictures of this world never share the two colours, so the pair is chosen jointly.
    """
    digit, stroke, background = (t.log_softmax(-1) for t in logits)
    pair = stroke[:, :, None] + background[:, None, :]  # (B, stroke, background)
    pair = pair.masked_fill(torch.eye(len(COLOR_NAMES), dtype=torch.bool), float("-inf"))
    best = pair.flatten(1).argmax(1)
    n = len(COLOR_NAMES)
    return [
        Prediction(int(d), COLOR_NAMES[int(b) // n], COLOR_NAMES[int(b) % n])
        for d, b in zip(digit.argmax(1), best, strict=True)
    ]


# --- training data --------------------------------------------------------------------------------


def clean_masks(scans: np.ndarray) -> torch.Tensor:
    """(N, 32, 32) ink coverage of each scan, unshifted (shared.digits.ink_mask)."""
    return torch.from_numpy(np.stack([ink_mask(s) for s in scans]))


def shift_masks(masks: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Move each mask by (dy, dx) pixels; equal to ink_mask(scan, shift=...) (the margin is empty ink)."""
    return torch.stack(
        [torch.roll(m, (int(dy), int(dx)), dims=(0, 1)) for m, (dy, dx) in zip(masks, shifts, strict=True)]
    )


def blur(x: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """Per-sample slight blur of (B, 3, H, W): a mix of the picture and its 3x3 Gaussian (sigma 1)
    blur, ``strength`` in [0, 1] each (one cheap depthwise convolution for the whole batch)."""
    k1 = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / 2)
    kernel = (k1[:, None] * k1[None, :]) / k1.sum() ** 2
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    blurred = F.conv2d(padded, kernel.expand(3, 1, 3, 3), groups=3)
    t = strength[:, None, None, None]
    return x * (1 - t) + blurred * t


COLOR_RGB = torch.tensor([COLORS[name] for name in COLOR_NAMES], dtype=torch.float32)
# Stroke and background class of each entry of COLOR_PAIRS.
PAIR_STROKE = torch.tensor([COLOR_NAMES.index(s) for s, _ in COLOR_PAIRS])
PAIR_BACKGROUND = torch.tensor([COLOR_NAMES.index(b) for _, b in COLOR_PAIRS])


def make_batch(
    masks: torch.Tensor,
    labels: torch.Tensor,
    recipe: Recipe,
    generator: torch.Generator,
    augment: bool = True,
    index: torch.Tensor | None = None,
    pairs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render a batch: (images (B, 3, 32, 32) in [0, 1], digit, stroke, background labels).

    Random scans and colour pairs unless ``index``/``pairs`` (indices into COLOR_PAIRS) are given.
    Without ``augment`` the pictures equal shared.digits.render exactly.
    """
    n = recipe.batch_size if index is None else len(index)
    if index is None:
        index = torch.randint(len(masks), (n,), generator=generator)
    if pairs is None:
        pairs = torch.randint(len(COLOR_PAIRS), (n,), generator=generator)
    stroke, background = PAIR_STROKE[pairs], PAIR_BACKGROUND[pairs]
    alpha = masks[index]
    fg, bg = COLOR_RGB[stroke], COLOR_RGB[background]
    if augment:
        s = recipe.max_shift
        alpha = shift_masks(alpha, torch.randint(-s, s + 1, (n, 2), generator=generator))
        j = recipe.color_jitter
        fg = fg + (torch.rand(n, 3, generator=generator) * 2 - 1) * j
        bg = bg + (torch.rand(n, 3, generator=generator) * 2 - 1) * j
    alpha = alpha[:, None]  # (B, 1, H, W)
    x = bg[:, :, None, None] * (1 - alpha) + fg[:, :, None, None] * alpha  # 0-255
    if augment:
        x = blur(x, torch.rand(n, generator=generator) * recipe.blur_max)
        std = torch.rand(n, generator=generator) * recipe.noise_std_max
        x = x + torch.randn(x.shape, generator=generator) * std[:, None, None, None]
    # What the judge receives is uint8: quantize like the pictures it will see.
    x = x.round().clamp(0, 255) / 255.0
    return x, labels[index], stroke, background


# --- training and measuring ------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(recipe: Recipe, progress: bool = True) -> CaptionerNet:
    """Train a captioner on the train scans; deterministic for a given recipe."""
    with _torch_threads(recipe.threads):
        return _train(recipe, progress)


def _train(recipe: Recipe, progress: bool) -> CaptionerNet:
    from tqdm import tqdm

    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    scans, labels = digit_scans("train")
    masks, labels_t = clean_masks(scans), torch.from_numpy(labels)
    net = CaptionerNet(recipe.channels, recipe.hidden)
    optimizer = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=recipe.steps)
    net.train()
    bar = tqdm(range(recipe.steps), desc="training the digits captioner", disable=not progress, mininterval=1)
    for step in bar:
        x, digit, stroke, background = make_batch(masks, labels_t, recipe, generator)
        out = net(x)
        loss = (
            F.cross_entropy(out[0], digit)
            + F.cross_entropy(out[1], stroke)
            + F.cross_entropy(out[2], background)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    net.eval()
    return net


@torch.inference_mode()
def predict(net: CaptionerNet, x: torch.Tensor, batch_size: int = 512) -> list[Prediction]:
    out: list[Prediction] = []
    for start in range(0, len(x), batch_size):
        out += decode(net(x[start : start + batch_size]))
    return out


def accuracy(predictions: Sequence[Prediction], truth: Sequence[Prediction]) -> dict[str, float]:
    pairs = list(zip(predictions, truth, strict=True))
    n = len(pairs)
    return {
        "digit": sum(p.digit == t.digit for p, t in pairs) / n,
        "stroke": sum(p.stroke == t.stroke for p, t in pairs) / n,
        "background": sum(p.background == t.background for p, t in pairs) / n,
        "all_three": sum(p == t for p, t in pairs) / n,
        "images": n,
    }


def heldout_test_images() -> tuple[np.ndarray, list[Prediction]]:
    """Every test scan (never trained on) rendered with every colour pair by shared.digits.render."""
    scans, labels = digit_scans("test")
    images, truth = [], []
    for scan, label in zip(scans, labels, strict=True):
        for stroke, background in COLOR_PAIRS:
            images.append(render(scan, stroke, background))
            truth.append(Prediction(int(label), stroke, background))
    return np.stack(images), truth


def measure(net: CaptionerNet, recipe: Recipe) -> dict[str, dict[str, float]]:
    """Accuracy on the clean test renders, and on the same scans with the training augmentation."""
    images, truth = heldout_test_images()
    clean = accuracy(predict(net, images_to_tensor(images)), truth)
    scans, labels = digit_scans("test")
    n = len(scans)
    index = torch.arange(n).repeat_interleave(len(COLOR_PAIRS))
    pairs = torch.arange(len(COLOR_PAIRS)).repeat(n)
    generator = torch.Generator().manual_seed(recipe.augmented_eval_seed)
    x, digit, stroke, background = make_batch(
        clean_masks(scans), torch.from_numpy(labels), recipe, generator, index=index, pairs=pairs
    )
    aug_truth = [
        Prediction(int(d), COLOR_NAMES[int(s)], COLOR_NAMES[int(b)])
        for d, s, b in zip(digit, stroke, background, strict=True)
    ]
    return {"clean": clean, "augmented": accuracy(predict(net, x), aug_truth)}


# --- folders: save, load, build, cache ------------------------------------------------------------


def save(net: CaptionerNet, recipe: Recipe, measured: dict[str, Any], folder: Path, seconds: float) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / WEIGHTS_FILE))
    meta = {
        "format": FORMAT,
        "recipe": asdict(recipe),
        "recipe_key": recipe.key(),
        "digits": list(DIGIT_WORDS),
        "colors": list(COLOR_NAMES),
        "accuracy_on_test_scans": measured,
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load(folder: str | Path) -> tuple[CaptionerNet, dict[str, Any]]:
    """The network and metadata of a built folder, or CaptionerError naming the folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise CaptionerError(f"{folder} is not a folder (build one: ddpo-build-captioner --out {folder})")
    try:
        meta = json.loads((folder / META_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
        if meta["colors"] != list(COLOR_NAMES) or meta["digits"] != list(DIGIT_WORDS):
            raise ValueError("its class names differ from shared.digits")
        recipe = Recipe.from_dict(meta["recipe"])
        net = CaptionerNet(recipe.channels, recipe.hidden)
        net.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    except Exception as err:  # missing, truncated, foreign: all mean "not a captioner"
        raise CaptionerError(
            f"{folder} does not hold a usable digits captioner ({type(err).__name__}: {err})"
        ) from err
    net.eval()
    return net, meta


def captioner_problem(folder: str | Path) -> str | None:
    """Why ``folder`` cannot be used as a captioner, or None if it can."""
    try:
        load(folder)
    except CaptionerError as err:
        return str(err)
    return None


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """One builder at a time per target (several server workers may start together)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_captioner(folder: Path, recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """Train, measure and save into ``folder`` (must not exist) via a temporary sibling + rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.building-", dir=folder.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the built folder is an ordinary one
    try:
        started = time.perf_counter()
        net = train(recipe, progress=progress)
        seconds = time.perf_counter() - started
        measured = measure(net, recipe)
        digit_accuracy = measured["clean"]["digit"]
        if digit_accuracy < MIN_DIGIT_ACCURACY:  # a judge that cannot read digits must not be used
            raise CaptionerError(
                f"the trained captioner reads only {digit_accuracy:.1%} of the test digits "
                f"(at least {MIN_DIGIT_ACCURACY:.0%} required); nothing saved to {folder}"
            )
        save(net, recipe, measured, tmp, seconds)
        os.replace(tmp, folder)  # atomic: the folder appears complete or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return json.loads((folder / META_FILE).read_text())


def ensure_captioner(
    cache_dir: str | Path | None = None, recipe: Recipe | None = None, progress: bool = True
) -> Path:
    """The cached captioner of ``recipe`` (built on first use); a damaged cached folder is rebuilt."""
    recipe = recipe or Recipe()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / f"captioner-{recipe.key()}"
    with _locked(root / f".captioner-{recipe.key()}.lock"):
        for leftover in root.glob(f".{folder.name}.building-*"):  # a build killed mid-way (we hold the lock)
            shutil.rmtree(leftover, ignore_errors=True)
        problem = captioner_problem(folder) if folder.exists() else "missing"
        if problem is None and json.loads((folder / META_FILE).read_text()).get("recipe_key") != recipe.key():
            problem = f"{folder} holds a captioner of another recipe"
        if problem is not None:
            if folder.exists():
                print(f"rebuilding the captioner: {problem}", file=sys.stderr)
                shutil.rmtree(folder)
            build_captioner(folder, recipe, progress=progress)
    return folder


def build_into(out: Path, recipe: Recipe | None = None, progress: bool = True) -> Path:
    """Build into an exact folder, reusing it if it holds this recipe's captioner; never deletes.

    No lock: two builders racing for one folder cannot both rename into it (the loser fails).
    """
    recipe = recipe or Recipe()
    if out.exists() and any(out.iterdir()):
        problem = captioner_problem(out)
        if problem is not None:
            raise CaptionerError(f"refusing to overwrite {out}: {problem}")
        key = json.loads((out / META_FILE).read_text()).get("recipe_key")
        if key != recipe.key():
            raise CaptionerError(f"{out} holds a captioner of another recipe ({key}); choose another --out")
        return out
    if out.exists():
        out.rmdir()  # empty: the rename needs the name free
    build_captioner(out, recipe, progress=progress)
    return out


# --- command line ---------------------------------------------------------------------------------


def format_accuracy(meta: dict[str, Any]) -> str:
    lines = []
    for name, acc in meta["accuracy_on_test_scans"].items():
        lines.append(
            f"  {name:9s} ({acc['images']} images): digit {acc['digit']:.2%}  stroke {acc['stroke']:.2%}  "
            f"background {acc['background']:.2%}  all three {acc['all_three']:.2%}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m reward_server.vlm.captioner",
        description="Build (or reuse) the digits captioner and print its folder; or re-measure one.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build or reuse a captioner; prints its folder")
    build.add_argument(
        "--out",
        type=Path,
        default=None,
        help="exact folder to build into (default: the cache, $DDPO_CACHE or ~/.cache/ddpo-stack)",
    )
    evaluate = commands.add_parser("evaluate", help="measure a built captioner on the test scans")
    evaluate.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            folder = ensure_captioner() if args.out is None else build_into(args.out)
            meta = json.loads((folder / META_FILE).read_text())
            print(
                f"accuracy on the 360 held-out test scans x {len(COLOR_PAIRS)} colour pairs:", file=sys.stderr
            )
            print(format_accuracy(meta), file=sys.stderr)
            print(folder)
        else:
            net, meta = load(args.folder)
            measured = measure(net, Recipe.from_dict(meta["recipe"]))
            print(format_accuracy({"accuracy_on_test_scans": measured}))
    except CaptionerError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def build_main() -> None:
    """``ddpo-build-captioner [--out DIR]``."""
    main(["build", *sys.argv[1:]])


if __name__ == "__main__":
    main()
