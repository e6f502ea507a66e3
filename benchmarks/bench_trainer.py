"""Trainer overheads, measured side by side in one run on the same tiny model and settings.

1. Sampling: our sampler (DDIM + per-step log-probs + kept trajectory) vs the plain diffusers
   ``StableDiffusionPipeline.__call__`` with the same prompts, steps, eta, CFG and resolution.
   Goal: ratio <= 1.05.
2. Training: one DDPO-IS step on one timestep of a minibatch (CFG UNet call, log-prob, clipped
   loss, backward) vs a bare UNet forward + backward on the same doubled (CFG) batch.
   Goal: ratio <= 1.10.

Runs alternate (ours, theirs, ours, ...) and the median is reported, so drift on a busy machine
hits both sides alike.  Usage:  python benchmarks/bench_trainer.py [--repeats 7] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from trainer.config import build_config
    from trainer.sampling import sample_trajectories
    from trainer.train import Trainer

    out = tempfile.mkdtemp()
    cfg = build_config(
        "tiny",
        {
            "sample": {
                "num_steps": args.steps,
                "batch_size": args.batch,
                "num_batches_per_epoch": 1,
                "resolution": args.resolution,
            },
            "train": {"batch_size": args.batch, "gradient_accumulation_steps": 1},
            "run": {"output_dir": out, "progress": False},
        },
    )
    trainer = Trainer(cfg)
    policy, s = trainer.policy, cfg.sample
    prompts = [trainer.prompts[i % len(trainer.prompts)] for i in range(args.batch)]
    seeds = list(range(args.batch))
    print(
        f"model: tiny SD ({sum(p.numel() for p in policy.unet.parameters()) / 1e6:.2f}M UNet params), "
        f"batch {args.batch}, {args.steps} steps, {args.resolution}px, CFG {s.guidance_scale}, eta {s.eta}, "
        f"threads {torch.get_num_threads()}, repeats {args.repeats}"
    )

    # 1. sampling
    def ours_sample():
        sample_trajectories(policy, prompts, s, seeds)

    def plain_pipeline():
        policy.pipeline(
            prompts,
            num_inference_steps=s.num_steps,
            guidance_scale=s.guidance_scale,
            eta=s.eta,
            height=s.resolution,
            width=s.resolution,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )

    t_ours, t_pipe = alternate(ours_sample, plain_pipeline, args.repeats)
    print(
        f"sampling   ours {t_ours * 1000:8.1f} ms   diffusers pipeline {t_pipe * 1000:8.1f} ms   "
        f"ratio {t_ours / t_pipe:.3f}  (goal <= 1.05)"
    )

    # 2. one training step (one timestep of one minibatch)
    samples = sample_trajectories(policy, prompts, s, seeds)
    idx = torch.arange(args.batch)
    perm = torch.stack([torch.arange(args.steps)] * args.batch)
    adv = torch.randn(args.batch)
    policy.unet.train()

    def ours_train():
        trainer._pg_minibatch(samples, idx, perm, adv, 1, [], 1.0)
        trainer.optimizer.zero_grad(set_to_none=True)

    lat = samples.latents[:, 0]
    t0 = samples.timesteps[:, 0]
    model_in = torch.cat([lat, lat])
    t_in = torch.cat([t0, t0])
    embeds = torch.cat([samples.negative_embeds, samples.prompt_embeds])

    def bare_unet():
        out = policy.unet(model_in, t_in, encoder_hidden_states=embeds, return_dict=False)[0]
        out.float().mean().backward()
        trainer.optimizer.zero_grad(set_to_none=True)

    t_train, t_bare = alternate(ours_train, bare_unet, args.repeats)
    print(
        f"training   ours {t_train * 1000:8.1f} ms   bare UNet fwd+bwd  {t_bare * 1000:8.1f} ms   "
        f"ratio {t_train / t_bare:.3f}  (goal <= 1.10)"
    )


if __name__ == "__main__":
    main()
