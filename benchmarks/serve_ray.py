"""Ray Serve replicas: digest routing against Ray's default routing on one request mix, as JSON
(a local Ray instance, loopback only, bounded in requests and time).

    python -m benchmarks.serve_ray --artifact ART [--replicas 2] [--images 8] [--repeats 4]

The mix: `--images` distinct images, each asked about `--repeats` times, in one seeded random
order, sent by `--clients` concurrent clients (non-streaming, greedy). For each routing the app
is deployed afresh (empty visual caches), warmed up with text-only requests, and the mix
replayed; `--rounds` times, the routings interleaved. Reported per routing: the visual
cache hit rate over the requests (the `saisa` extension's outcome; the best possible is
1 - images/requests, one computation per image), replicas per image (1.0: every image stayed on
one replica), requests per replica, wall time, requests/s and completion tokens/s.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import random
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from ray import serve

from benchmarks.serve import QUESTIONS, images
from saisa_edge.cli import open_session
from saisa_edge.serve import ServeOptions
from saisa_edge.serve.ray_app import REPLICA_HEADER, ROUTINGS, application, local_ray

MODEL = "bench"


def warm_up(url: str, clients: int, timeout: float) -> None:
    """Text-only requests (nothing cached), so every replica has run the model before the mix."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello."}], "max_tokens": 2}
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout).raise_for_status(),
                      range(2 * clients)))


def replay(url: str, mix: list[tuple[str, str]], clients: int, max_tokens: int, timeout: float) -> dict[str, Any]:
    def ask(job: tuple[str, str]) -> tuple[str, str, int]:
        question, image = job
        parts = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": image}}]
        r = httpx.post(f"{url}/v1/chat/completions", timeout=timeout, json={
            "model": MODEL, "messages": [{"role": "user", "content": parts}], "max_tokens": max_tokens,
            "temperature": 0})
        r.raise_for_status()
        body = r.json()
        return body["saisa"]["visual_cache"], r.headers[REPLICA_HEADER], body["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        got = list(pool.map(ask, mix))
    wall = time.perf_counter() - t0
    per_image: dict[str, set[str]] = {}
    for (_, image), (_, replica, _) in zip(mix, got):
        per_image.setdefault(image, set()).add(replica)
    per_replica: dict[str, int] = {}
    for _, replica, _ in got:
        per_replica[replica] = per_replica.get(replica, 0) + 1
    hits = sum(outcome == "hit" for outcome, _, _ in got)
    return {"requests": len(got), "hit_rate": round(hits / len(got), 3),
            "vision_computations": len(got) - hits,
            "replicas_per_image": round(sum(map(len, per_image.values())) / len(per_image), 2),
            "requests_per_replica": sorted(per_replica.values()), "wall_s": round(wall, 2),
            "requests_per_s": round(len(got) / wall, 3),
            "tokens_per_s": round(sum(t for _, _, t in got) / wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, required=True, help="Artifact (or engine) folder each replica serves.")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=4, help="Requests per image.")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance (one per replica).")
    ap.add_argument("--timeout", type=float, default=600, help="Seconds per request (bounds the run).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2, help="Fresh deployments per routing, interleaved.")
    args = ap.parse_args()

    pool = images(args.images, args.seed)
    mix = [(QUESTIONS[k % len(QUESTIONS)], image) for image in pool for k in range(args.repeats)]
    random.Random(args.seed).shuffle(mix)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    opener = functools.partial(open_session, args.artifact)
    results: dict[str, Any] = {}
    # Ray's driver prints its workers' messages on stdout: keep stdout for the JSON alone
    with contextlib.redirect_stdout(sys.stderr), local_ray("127.0.0.1", port, args.cpus) as url:
        for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits both alike
            for routing in ROUTINGS:
                app = application(opener, ServeOptions(model_name=MODEL), args.replicas, routing,
                                  cpus_per_replica=args.cpus / args.replicas)
                serve.run(app, name="saisa", route_prefix="/")
                warm_up(url, args.clients, args.timeout)
                results.setdefault(routing, []).append(replay(url, mix, args.clients, args.max_tokens, args.timeout))
                serve.delete("saisa")
    print(json.dumps({"artifact": str(args.artifact), "replicas": args.replicas, "images": args.images,
                      "repeats": args.repeats, "clients": args.clients, "max_tokens": args.max_tokens,
                      "best_hit_rate": round(1 - 1 / args.repeats, 3), **results}, indent=2))


if __name__ == "__main__":
    main()
