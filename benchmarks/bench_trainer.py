"""Trainer overheads per model family, and the CFG-free speed-up, measured side by side in one run.

For every family on its tiny CPU model (sd: 'tiny', sdxl: 'tiny-sdxl', sd3: 'tiny-sd3'):
1. Sampling: our sampler (the family's step with per-step log-probs, trajectory kept) vs the plain
   diffusers pipeline (``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` /
   ``StableDiffusion3Pipeline.__call__``) with the same prompts, steps, CFG and resolution.
   Goal: ratio <= 1.05.
2. Training: one DDPO-IS step on one timestep of a minibatch (CFG denoiser call, log-prob, clipped
   loss, backward) vs a bare denoiser forward + backward on the same doubled (CFG) batch.
   Goal: ratio <= 1.10.
3. CFG-free (sd): guidance 1 vs guidance 3 on the same model, our sampler and our training step;
   guidance 1 skips the unconditional forward, so the ratio should approach 0.5.

Runs alternate (ours, theirs, ours, ...) and the median is reported, so drift on a busy machine
hits both sides alike.  Usage:
    python benchmarks/bench_trainer.py [--repeats 7] [--batch 8] [--steps 20] [--families sd,sdxl,sd3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")

PRESETS = {"sd": "tiny", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3"}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(ours, theirs, repeats: int) -> tuple[float, float]:
    ours(), theirs()  # warm-up
    a, b = [], []
    for _ in range(repeats):
        a.append(timed(ours))
        b.append(timed(theirs))
    return statistics.median(a), statistics.median(b)


def make_trainer(family: str, args, guidance: float | None = None):
    from trainer.config import build_config
    from trainer.train import Trainer

    sample = {
        "num_steps": args.steps,
        "batch_size": args.batch,
        "num_batches_per_epoch": 1,
        "resolution": args.resolution,
    }
    if guidance is not None:
        sample["guidance_scale"] = guidance
    cfg = build_config(
        PRESETS[family],
        {
            "sample": sample,
            "train": {"batch_size": args.batch, "gradient_accumulation_steps": 1},
            "reward": {"transport": "local"},
            "run": {"output_dir": tempfile.mkdtemp(), "progress": False},
        },
    )
    return Trainer(cfg)


def training_step(trainer, samples):
    """One DDPO-IS step on the first timestep of one minibatch (as the loop does it)."""
    n = len(samples)
    idx, perm = torch.arange(n), torch.stack([torch.arange(samples.timesteps.shape[1])] * n)
    adv, groups = torch.randn(n), torch.arange(n)

    def step():
        trainer._pg_minibatch(samples, idx, perm, adv, groups, 1, [], [], 1.0)
        trainer.optimizer.zero_grad(set_to_none=True)

    return step


def bench_family(family: str, args) -> None:
    from trainer.sampling import sample_trajectories

    trainer = make_trainer(family, args)
    policy, s = trainer.policy, trainer.cfg.sample
    prompts = [trainer.prompts[i % len(trainer.prompts)] for i in range(args.batch)]
    seeds = list(range(args.batch))
    params = sum(p.numel() for p in policy.unet.parameters()) / 1e6
    print(
        f"\n[{family}] {type(policy.pipeline).__name__}, {type(policy.unet).__name__} {params:.2f}M params, "
        f"batch {args.batch}, {args.steps} steps, {args.resolution}px, CFG {s.guidance_scale}"
    )

    def ours_sample():
        sample_trajectories(policy, prompts, s, seeds)

    extra = {"eta": s.eta} if family != "sd3" else {}

    def plain_pipeline():
        policy.pipeline(
            prompts,
            num_inference_steps=s.num_steps,
            guidance_scale=s.guidance_scale,
            height=s.resolution,
            width=s.resolution,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
            **extra,
        )

    t_ours, t_pipe = alternate(ours_sample, plain_pipeline, args.repeats)
    print(
        f"  sampling   ours {t_ours * 1000:8.1f} ms   diffusers pipeline {t_pipe * 1000:8.1f} ms   "
        f"ratio {t_ours / t_pipe:.3f}  (goal <= 1.05)"
    )

    samples = sample_trajectories(policy, prompts, s, seeds)
    policy.unet.train()
    ours_train = training_step(trainer, samples)
    lat, t0 = samples.latents[:, 0], samples.timesteps[:, 0]
    model_in, t_in = torch.cat([lat, lat]), torch.cat([t0, t0])
    embeds = torch.cat([samples.negative_embeds, samples.prompt_embeds])

    def bare_denoiser():
        out = policy.family.forward(policy.unet, model_in, t_in, embeds)
        out.float().mean().backward()
        trainer.optimizer.zero_grad(set_to_none=True)

    t_train, t_bare = alternate(ours_train, bare_denoiser, args.repeats)
    print(
        f"  training   ours {t_train * 1000:8.1f} ms   bare denoiser fwd+bwd {t_bare * 1000:8.1f} ms   "
        f"ratio {t_train / t_bare:.3f}  (goal <= 1.10)"
    )


def bench_cfg_free(args) -> None:
    """Guidance 1 vs 3 on the same tiny SD: sampling and one training step."""
    from trainer.sampling import sample_trajectories

    free, cfg3 = make_trainer("sd", args, guidance=1.0), make_trainer("sd", args, guidance=3.0)
    cfg3.policy = free.policy  # the same model and weights for both
    policy = free.policy
    prompts = [free.prompts[i % len(free.prompts)] for i in range(args.batch)]
    seeds = list(range(args.batch))
    print(f"\n[CFG-free, sd] guidance 1 vs 3, batch {args.batch}, {args.steps} steps, {args.resolution}px")
    t_free, t_cfg = alternate(
        lambda: sample_trajectories(policy, prompts, free.cfg.sample, seeds),
        lambda: sample_trajectories(policy, prompts, cfg3.cfg.sample, seeds),
        args.repeats,
    )
    print(
        f"  sampling   w=1 {t_free * 1000:8.1f} ms   w=3 {t_cfg * 1000:8.1f} ms   ratio {t_free / t_cfg:.3f}"
    )
    s_free = sample_trajectories(policy, prompts, free.cfg.sample, seeds)
    s_cfg = sample_trajectories(policy, prompts, cfg3.cfg.sample, seeds)
    policy.unet.train()
    cfg3.optimizer = free.optimizer
    t_free, t_cfg = alternate(training_step(free, s_free), training_step(cfg3, s_cfg), args.repeats)
    print(
        f"  training   w=1 {t_free * 1000:8.1f} ms   w=3 {t_cfg * 1000:8.1f} ms   ratio {t_free / t_cfg:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--families", default="sd,sdxl,sd3", help="comma-separated: sd, sdxl, sd3")
    parser.add_argument("--no-cfg-free", action="store_true", help="skip the guidance 1 vs 3 rows")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, repeats {args.repeats} (medians)")
    for family in args.families.split(","):
        bench_family(family.strip(), args)
    if not args.no_cfg_free:
        bench_cfg_free(args)


if __name__ == "__main__":
    main()
