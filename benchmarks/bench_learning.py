"""The learning benchmark: does RL make the digits base follow its prompts, and which algorithm best?

Every algorithm the trainer has (``trainer.config.algorithms()``: a new one joins with no edit
here) trains the same pretrained digits base (``model.pretrained digits``) with the
``digits-alignment`` preset, for several seeds and the same number of reward queries (samples
scored for training; eval samples are not counted). At every eval the fixed eval prompts (training
prompts, and held-out prompts never trained on), several seeds each, are sampled and scored by
the digits captioner + BERTScore; caption accuracy = all of digit, stroke and background right.

Prints a table (base vs final, mean ± std over seeds) and writes, under ``--out``:
``bench_learning.png`` (caption accuracy and reward against reward queries, one curve per
algorithm, seed spread shaded) and ``bench_learning.json`` (every curve).

Usage:  python benchmarks/bench_learning.py [--seeds 0 1 2] [--epochs 80] [--algorithms ddpo_is rwr]
        [--set train.learning_rate=1e-3 ...] [--jobs 2] [--out docs/bench_learning]
Each finished run is kept as ``<out>/runs/<algorithm>-seed<k>.json``; a rerun skips those
(``--fresh`` discards them), and ``--report`` only rebuilds the table and plot from them.
A variant (``--set`` overrides) gets its own rows and files with ``--label NAME``, e.g.
``--algorithms ddpo_is --label staleness1 --set train.max_staleness=1``. Runs that log ``kl_ref``
(``train.kl_beta > 0`` or ``train.log_kl_ref=true``) add a reward-vs-KL panel to the plot.
``--jobs N`` runs N trainings at once, each on cores / N torch threads.
Rewards are scored in process (transport local: the same scorer code the reward server runs) so
the runs measure learning, not transport; ``--transport http`` runs each through its own embedded
reward server instead.
A slow reward service: ``--reward-latency L`` delivers each batch's reward L seconds after it was
sampled (batches in flight at once); with ``--time-budget T`` every run gets T seconds of training
(sampling + reward wait + update; evals excluded) instead of a number of epochs, and
``--x-axis seconds`` plots against that time, e.g. on-policy vs ``train.max_staleness=1`` at the
same wall clock.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import tempfile
import threading
import time
import warnings
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from trainer.reward_api import RewardClient

warnings.filterwarnings("ignore")

TIME_BUDGET_EPOCHS = 100_000  # with --time-budget, only the budget ends a run

CURVES = {
    "train": "eval_caption_accuracy",
    "heldout": "eval_heldout_caption_accuracy",
    "reward": "eval_reward_mean",
    "heldout_reward": "eval_heldout_reward_mean",
    "diversity": "eval_diversity",
    "kl_ref": "kl_ref",  # per epoch: nonzero with train.kl_beta > 0 or train.log_kl_ref
}


def run_one(
    algorithm: str, seed: int, args: argparse.Namespace, out_dir: str, threads: int
) -> dict[str, Any]:
    """Train one (algorithm, seed); its eval curves against reward queries."""
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    from trainer.cli import quiet_libraries
    from trainer.config import build_config, parse_overrides, with_algorithm
    from trainer.train import Trainer

    quiet_libraries()

    overrides = parse_overrides([f"--{item}" for item in args.set])
    overrides = {
        **overrides,
        "reward": {**overrides.get("reward", {}), "transport": args.transport},
        "run": {
            **overrides.get("run", {}),
            "seed": seed,
            "num_epochs": TIME_BUDGET_EPOCHS if args.time_budget else args.epochs,
            "eval_every": args.eval_every,
            "eval_num_images": args.eval_prompts,
            "eval_images_per_prompt": args.eval_seeds,
            "save_every": 10_000,
            "output_dir": out_dir,
            "name": f"{algorithm}-seed{seed}",
            "progress": False,
            "num_threads": threads,
        },
    }
    cfg = with_algorithm(build_config("digits-alignment", overrides), algorithm)
    started = time.perf_counter()
    client = None
    if args.reward_latency:
        from trainer.reward_client import make_reward_client

        client = LatentRewardClient(make_reward_client(cfg.reward), args.reward_latency)
    trainer = Trainer(cfg, reward_client=client)
    try:
        if args.time_budget:
            train_for(trainer, args.time_budget)
        else:
            trainer.run()
    finally:
        if client is not None:
            client.close()
    seconds = time.perf_counter() - started
    samples_per_epoch = cfg.sample.batch_size * cfg.sample.num_batches_per_epoch
    curves: dict[str, list[list[float]]] = {name: [] for name in CURVES}
    curves["seconds"] = [[0, 0.0]]  # training wall-clock (sampling + reward wait + update, no evals)
    curves["update_seconds"] = [[0, 0.0]]  # the updates' share of it
    curves["sampling_seconds"] = [[0, 0.0]]  # and sampling's (S per batch = its rate / batches)
    for m in trainer.run_folder.read_metrics():
        queries = (m["epoch"] + 1) * samples_per_epoch  # epoch -1 (the base model): 0 queries
        for name, key in CURVES.items():
            if key in m:
                curves[name].append([queries, m[key]])
        if "time_epoch_s" in m:
            curves["seconds"].append([queries, curves["seconds"][-1][1] + m["time_epoch_s"]])
            curves["update_seconds"].append([queries, curves["update_seconds"][-1][1] + m["time_training_s"]])
            curves["sampling_seconds"].append(
                [queries, curves["sampling_seconds"][-1][1] + m["time_sampling_s"]]
            )
    return {
        "algorithm": algorithm,
        "label": args.label,
        "seed": seed,
        "seconds": seconds,
        "curves": curves,
        "overrides": args.set,
        "settings": run_settings(args),
    }


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a kept run was measured with: a rerun with other settings must not reuse it."""
    keys = [
        "epochs",
        "eval_every",
        "eval_prompts",
        "eval_seeds",
        "transport",
        "reward_latency",
        "time_budget",
    ]
    return {"overrides": list(args.set), **{key: getattr(args, key) for key in keys}}


class LatentRewardClient(RewardClient):
    """A reward service with latency ``latency_s``: each batch's result arrives that long after it
    was submitted (or when scored, if later), batches in flight at once (a VLM service with
    capacity to spare: latency, not throughput, is what is slow)."""

    def __init__(self, inner: RewardClient, latency_s: float):
        self.inner, self.latency_s = inner, latency_s

    def submit(self, images, prompts, metadata=None, request_id=None) -> Future:
        due = time.monotonic() + self.latency_s
        delayed: Future = Future()

        def deliver(done: Future) -> None:
            if done.cancelled():
                delayed.cancel()
            elif done.exception() is not None:
                delayed.set_exception(done.exception())
            else:
                delayed.set_result(done.result())

        def when_scored(done: Future) -> None:
            wait = due - time.monotonic()
            if wait > 0:
                threading.Timer(wait, deliver, [done]).start()
            else:
                deliver(done)

        self.inner.submit(images, prompts, metadata, request_id).add_done_callback(when_scored)
        return delayed

    def close(self) -> None:
        self.inner.close()


def train_for(trainer: Any, budget_s: float) -> None:
    """``trainer.run()`` that stops after the epoch whose training time (sampling + reward wait +
    update, evals excluded) reaches ``budget_s``; the last epoch is evaluated."""
    folder = trainer.run_folder
    try:
        folder.append_metrics({"epoch": -1, "global_step": 0, **trainer.evaluate("base")})
        spent, epoch, last = 0.0, 0, {}
        while spent < budget_s:
            if epoch == trainer.cfg.run.num_epochs:
                raise RuntimeError(f"{epoch} epochs did not use the time budget of {budget_s} s")
            last = trainer.train_epoch(epoch)
            spent += last["time_epoch_s"]
            epoch += 1
        if "eval_caption_accuracy" not in last:  # the budget ended between two evals
            metrics = folder.read_metrics()
            metrics[-1].update(trainer.evaluate(f"epoch_{epoch - 1:04d}"))
            folder.metrics_path.write_text("".join(json.dumps(m) + "\n" for m in metrics))
    finally:
        trainer.close()


def run_name(algorithm: str, label: str) -> str:
    """Table row and file name of a run: the algorithm, and the variant's label if any."""
    return f"{algorithm}-{label}" if label else algorithm


def summarize(runs: list[dict[str, Any]], name: str, index: int) -> tuple[float, float]:
    values = [r["curves"][name][index][1] for r in runs]
    return float(np.mean(values)), float(np.std(values))


def print_table(results: dict[str, list[dict[str, Any]]], queries: int) -> str:
    header = (
        f"{'algorithm':<20} {'seeds':>5} | {'train-prompt accuracy':^27} | {'held-out accuracy':^27} | "
        f"{'eval reward (train prompts)':^29} | {'diversity':^15} | "
        f"{'queries':>7} | {'train s':>7} | {'sample s':>8} | {'update s':>8} | {'min/run':>7}"
    )
    lines = [f"reward queries per run: {queries}", header, "-" * len(header)]
    for algorithm, runs in results.items():
        cells = []
        for name in ("train", "heldout", "reward"):
            (b, _), (f, fs) = summarize(runs, name, 0), summarize(runs, name, -1)
            cells.append(f"{b:.3f} -> {f:.3f} ± {fs:.3f}" + (" " * 2 if name != "reward" else ""))
        if all(r["curves"]["diversity"] for r in runs):
            (b, _), (f, _) = summarize(runs, "diversity", 0), summarize(runs, "diversity", -1)
            cells.append(f"{b:.3f} -> {f:.3f}")
        else:  # --eval-seeds 1: one image per prompt, no diversity
            cells.append("-")
        minutes = np.mean([r["seconds"] for r in runs]) / 60
        spent, sampling, updating = (
            np.mean([r["curves"][key][-1][1] for r in runs if key in r["curves"]] or [np.nan])
            for key in ("seconds", "sampling_seconds", "update_seconds")
        )
        used = np.mean([r["curves"]["train"][-1][0] for r in runs])
        lines.append(f"{algorithm:<20} {len(runs):>5} | {cells[0]:^27} | {cells[1]:^27} | {cells[2]:^29} | "
                     f"{cells[3]:^15} | {used:7.0f} | {spent:7.0f} | {sampling:8.0f} | {updating:8.0f} | "
                     f"{minutes:7.1f}")  # fmt: skip
    table = "\n".join(lines)
    print(table, flush=True)
    return table


def x_values(run: dict[str, Any], name: str, axis: str) -> np.ndarray:
    """The x of a curve's points: reward queries, or training seconds at those queries."""
    queries = np.array([q for q, _ in run["curves"][name]])
    if axis == "queries":
        return queries
    seconds = dict((q, t) for q, t in run["curves"]["seconds"])
    return np.array([seconds[q] for q in queries])


def plot(results: dict[str, list[dict[str, Any]]], path: Path, axis: str = "queries") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("train", "caption accuracy, training prompts"),
        ("heldout", "caption accuracy, held-out prompts"),
        ("reward", "reward (BERTScore recall), training prompts"),
        ("diversity", "diversity (same-prompt RMS distance), training prompts"),
    ]
    with_kl = any(
        any(v > 0 for _, v in r["curves"].get("kl_ref", [])) for runs in results.values() for r in runs
    )
    fig, axes = plt.subplots(1, len(panels) + with_kl, figsize=(6 * (len(panels) + with_kl), 4.2), dpi=110)
    if with_kl:
        reward_vs_kl(results, axes[-1])
    for ax, (name, title) in zip(axes, panels, strict=False):
        for algorithm, runs in results.items():
            # With a time budget runs end at different epochs, so have more or fewer evals: the
            # first points are paired by eval, and every run's final eval with the others' finals.
            points = min(len(r["curves"][name]) for r in runs)
            if not points:
                continue
            keep = [[*range(points - 1), len(r["curves"][name]) - 1] for r in runs]
            x = np.mean([x_values(r, name, axis)[k] for r, k in zip(runs, keep, strict=True)], axis=0)
            y = np.array([[r["curves"][name][i][1] for i in k] for r, k in zip(runs, keep, strict=True)])
            mean, std = y.mean(0), y.std(0)
            ax.plot(x, mean, marker="o", markersize=3, label=f"{algorithm} ({len(runs)} seeds)")
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel(
            "reward queries (training samples scored)"
            if axis == "queries"
            else "training seconds (sampling + reward wait + update; mean over seeds)"
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def reward_vs_kl(results: dict[str, list[dict[str, Any]]], ax: Any) -> None:
    """The KL-reward trade-off: each run's eval reward against its KL to the base at that epoch."""
    for name, runs in results.items():
        xs, ys = [], []
        for run in runs:
            kl = dict(run["curves"].get("kl_ref", []))
            for queries, reward in run["curves"]["reward"][1:]:  # evals after training began
                if queries in kl:
                    xs.append(kl[queries])
                    ys.append(reward)
        ax.scatter(xs, ys, s=12, label=f"{name} ({len(runs)} seeds)")
    ax.set_title("reward vs KL to the base model (every eval)")
    ax.set_xlabel("kl_ref (mean per-step KL, training samples of that epoch)")
    ax.set_ylabel("eval reward, training prompts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def main() -> None:
    from trainer.config import algorithms

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--algorithms", nargs="+", default=list(algorithms()), choices=algorithms())
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=80, help="epochs per run (the reward-query budget)")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-prompts", type=int, default=160, help="eval prompts per group")
    parser.add_argument("--eval-seeds", type=int, default=2, help="seeds per eval prompt")
    parser.add_argument("--transport", choices=["local", "http"], default="local")
    parser.add_argument(
        "--reward-latency", type=float, default=0.0, help="seconds each batch's reward takes to arrive"
    )
    parser.add_argument(
        "--x-axis", choices=["queries", "seconds"], default="queries", help="the plot's x axis"
    )
    parser.add_argument(
        "--time-budget", type=float, default=0.0, help="stop each run after this many training seconds"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], help="config overrides, e.g. train.learning_rate=1e-3"
    )
    parser.add_argument("--out", default="docs/bench_learning", help="folder for the PNG and JSON")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (cores are split)")
    parser.add_argument("--fresh", action="store_true", help="discard finished runs kept under --out")
    parser.add_argument("--report", action="store_true", help="only rebuild the table and plot")
    parser.add_argument(
        "--label", default="", help="a variant's name (with --set): its runs are kept and shown apart"
    )
    args = parser.parse_args()
    if args.transport == "http":
        args.set.append("reward.embed_server=true")
    logging.basicConfig(level=logging.WARNING)

    from trainer.cli import quiet_libraries
    from trainer.policy import resolve_pretrained

    quiet_libraries()
    out = Path(args.out)
    runs_out = out / "runs"
    runs_out.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        for old in runs_out.glob("*.json"):
            old.unlink()
    todo = []
    for algorithm in args.algorithms:
        for seed in args.seeds:
            kept = runs_out / f"{run_name(algorithm, args.label)}-seed{seed}.json"
            if not kept.exists():
                todo.append((algorithm, seed))
                continue
            settings = json.loads(kept.read_text()).get("settings")
            if not args.report and settings is not None and settings != run_settings(args):
                raise SystemExit(
                    f"{kept} was measured with {settings}, not {run_settings(args)}: use another "
                    "--label or --out, or --fresh to discard the kept runs"
                )
    if not args.report and todo:
        resolve_pretrained("digits")  # build (or reuse) the shared base once, before the clock starts
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        context = multiprocessing.get_context("spawn")
        with (
            tempfile.TemporaryDirectory(prefix="bench-learning-") as runs_dir,
            ProcessPoolExecutor(args.jobs, mp_context=context) as pool,
        ):
            futures = {pool.submit(run_one, a, s, args, runs_dir, threads): (a, s) for a, s in todo}
            for future in as_completed(futures):
                algorithm, seed = futures[future]
                run = future.result()
                name = run_name(algorithm, args.label)
                (runs_out / f"{name}-seed{seed}.json").write_text(json.dumps(run) + "\n")
                train = run["curves"]["train"]
                print(f"{name} seed {seed}: train accuracy {train[0][1]:.3f} -> {train[-1][1]:.3f} "
                      f"({run['seconds'] / 60:.1f} min)", flush=True)  # fmt: skip
    # Every kept run of the chosen algorithms, each variant (label) its own row.
    results: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(runs_out.glob("*-seed*.json")):
        run = json.loads(path.read_text())
        if run["algorithm"] in args.algorithms and run["seed"] in args.seeds:
            results.setdefault(run_name(run["algorithm"], run.get("label", "")), []).append(run)
    results = dict(
        sorted(results.items(), key=lambda item: (args.algorithms.index(item[1][0]["algorithm"]), item[0]))
    )
    if not results:
        raise SystemExit(f"no finished runs under {runs_out}")
    any_run = next(iter(results.values()))[0]
    table = print_table(results, queries=int(any_run["curves"]["train"][-1][0]))
    plot(results, out / "bench_learning.png", args.x_axis)
    (out / "bench_learning.json").write_text(
        json.dumps({"args": vars(args), "table": table, "runs": results}, indent=1) + "\n"
    )
    print(f"wrote {out / 'bench_learning.png'} and {out / 'bench_learning.json'}")


if __name__ == "__main__":
    main()
