"""`saisa-edge serve` under concurrent clients, as JSON (loopback only, bounded in requests and time).

    python -m benchmarks.serve --artifact ART          # smol, fp32 (see README)

The server runs as its own process (the real command, 127.0.0.1, a free port); clients are
threads with the `openai` client, streaming, greedy, each sending its requests one after the
other. For 1, 4, 8 and 16 concurrent clients and two image mixes:
- `cached`: every request asks about one of four images the server has already seen
  (visual cache hits);
- `unique`: every request brings an image never seen before (vision runs for each).
Reported per phase: aggregate tokens/s (completion tokens over the phase's wall time),
p50/p99 time to first token as the client sees it, the server's mean decode batch size and
its vision computations (visual cache misses) during the phase.
Targets (smol, ONNX Runtime CPU): `cached` aggregate tokens/s at 8 clients >= 3x one client
(a batch reads the weights once per step), and p99 first token at 8 cached clients <= 2x
one client's.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
from PIL import Image

from saisa_edge.inputs.image import DEMO_IMAGE

QUESTIONS = ("Describe the picture in detail.", "What is in the picture?", "Which colours do you see?",
             "What is happening here?")


@dataclass
class Sample:
    ttft_s: float
    total_s: float
    tokens: int


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def images(n: int, seed: int) -> list[str]:
    """`n` distinct images: the demo image with its own random tint and noise each."""
    demo = np.asarray(Image.open(DEMO_IMAGE).convert("RGB"), dtype=np.int16)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        noisy = demo + rng.integers(-40, 41, size=3) + rng.integers(-12, 13, size=demo.shape)
        out.append(data_url(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))))
    return out


def ask(client: openai.OpenAI, model: str, question: str, image: str, max_tokens: int) -> Sample:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    stream = client.chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "text", "text": question},
                                               {"type": "image_url", "image_url": {"url": image}}]}])
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - t0
    return Sample(ttft if ttft is not None else total, total, tokens)


SERVER_COUNTS = ("saisa_batch_size_sum", "saisa_batch_size_count", "saisa_visual_cache_misses_total")


def server_counts(url: str) -> dict[str, float]:
    """The server's decode batch-size histogram (sum, count) and its vision computations so far."""
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in SERVER_COUNTS:
            values[name] = float(value)
    return values


def phase(url: str, model: str, clients: int, per_client: int, pool: list[str], max_tokens: int,
          deadline: float) -> dict[str, Any]:
    """`clients` threads, `per_client` requests each, images taken in turn from `pool`."""
    samples: list[Sample] = []
    lock = threading.Lock()
    counter = iter(range(clients * per_client))

    def client_loop() -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        for _ in range(per_client):
            if time.perf_counter() > deadline:
                return
            with lock:
                i = next(counter)
            s = ask(client, model, QUESTIONS[i % len(QUESTIONS)], pool[i % len(pool)], max_tokens)
            with lock:
                samples.append(s)

    before = server_counts(url)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = server_counts(url)
    delta = {k: after[k] - before[k] for k in SERVER_COUNTS}
    ttfts = sorted(s.ttft_s for s in samples)
    tokens = sum(s.tokens for s in samples)
    return {
        "clients": clients, "requests": len(samples), "completion_tokens": tokens, "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2) if wall else None,
        "ttft_p50_s": round(statistics.median(ttfts), 4) if ttfts else None,
        "ttft_p99_s": round(float(np.percentile(ttfts, 99)), 4) if ttfts else None,
        "mean_batch": round(delta["saisa_batch_size_sum"] / max(delta["saisa_batch_size_count"], 1), 2),
        "vision_runs": int(delta["saisa_visual_cache_misses_total"]),
        "complete": len(samples) == clients * per_client,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, required=True, help="Artifact (or engine) folder to serve.")
    ap.add_argument("--clients", default="1,4,8,16", help="Comma list of concurrent client counts.")
    ap.add_argument("--unique-clients", default=None, help="Client counts for new images (default: --clients).")
    ap.add_argument("--cached-requests", type=int, default=2, help="Requests per client, cached images.")
    ap.add_argument("--unique-requests", type=int, default=1, help="Requests per client, new images.")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--time-limit", type=float, default=1200, help="Seconds; later phases are cut short.")
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    unique_counts = [int(c) for c in (args.unique_clients or args.clients).split(",")]

    port, model = free_port(), "bench"
    server = subprocess.Popen([sys.executable, "-m", "saisa_edge", "serve", str(args.artifact), "--port", str(port),
                               "--max-batch", str(args.max_batch), "--max-queue", "256", "--model-name", model],
                              stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.perf_counter()
        while True:
            if server.poll() is not None:
                raise SystemExit(f"server exited: {server.stderr.read().decode() if server.stderr else ''}")
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        startup = time.perf_counter() - started
        cached = images(4, seed=0)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        t0 = time.perf_counter()
        for image in cached:  # warm-up: the four images enter the cache, the graphs are loaded
            ask(client, model, QUESTIONS[0], image, 2)
        warmup = time.perf_counter() - t0
        deadline = time.perf_counter() + args.time_limit
        fresh = iter(images(sum(unique_counts) * args.unique_requests, seed=1))
        phases = []
        for c in counts:
            phases.append({"images": "cached", **phase(url, model, c, args.cached_requests, cached, args.max_tokens,
                                                       deadline)})
        for c in unique_counts:
            pool = [next(fresh) for _ in range(c * args.unique_requests)]
            phases.append({"images": "unique", **phase(url, model, c, args.unique_requests, pool, args.max_tokens,
                                                       deadline)})
    finally:
        server.terminate()
        server.wait(60)

    def at(images: str, c: int) -> dict[str, Any] | None:
        return next((p for p in phases if p["images"] == images and p["clients"] == c), None)

    one, eight = at("cached", 1), at("cached", 8)
    targets = {}
    if one and eight and one["tokens_per_s"] and eight["tokens_per_s"]:
        speedup = eight["tokens_per_s"] / one["tokens_per_s"]
        ttft = eight["ttft_p99_s"] / one["ttft_p99_s"]
        targets = {"cached_8_over_1_tokens_per_s": round(speedup, 2), "tokens_per_s_target_3x": speedup >= 3,
                   "cached_8_over_1_ttft_p99": round(ttft, 2), "ttft_target_2x": ttft <= 2}
    print(json.dumps({"artifact": str(args.artifact), "max_tokens": args.max_tokens, "max_batch": args.max_batch,
                      "server_startup_s": round(startup, 2), "warmup_s": round(warmup, 2), "phases": phases, "targets": targets}, indent=2))


if __name__ == "__main__":
    main()
