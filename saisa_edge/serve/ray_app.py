"""Scale-out on Ray Serve: N replicas of the same app (`create_app`), each request routed by its
image's digest so an image keeps landing on the replica that holds its visual K/V.

    Ray's HTTP proxy -> Ingress (FastAPI, one per app) -> DeploymentHandle -> Replica x N

The ingress reads the body, computes the image digest (saisa_edge.serve.routing) and passes
it to the handle; `DigestRouter`, the model deployment's Ray Serve request router, puts the
replicas on a consistent-hash ring (by replica id) and sends the request to the digest's
owner. Requests without an image go to the replica with the shortest queue (Ray's probe of
ongoing requests). A replica that dies is replaced by Ray under a new id: only the dead one's
share of images moves. `routing="default"` keeps Ray's own power-of-two-choices router, the
baseline benchmarks/serve_ray.py compares against.

Each replica runs the whole single-server app in-process (auth, errors, metrics, the page,
in-flight batching) and the ingress forwards HTTP to it as ASGI messages, streaming; every
response carries `x-saisa-replica` (the replica's id). Entry points:

    serve.run(application(open_session, ServeOptions(...), replicas=2))        # Python
    serve run saisa_edge.serve.ray_app:build source=ARTIFACT replicas=2         # Ray's CLI
    saisa-edge serve ARTIFACT --ray --replicas 2                               # this CLI
"""

import asyncio
import functools
import json
import os
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import ray
from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from saisa_edge.errors import SaisaError
from saisa_edge.runtime.session import Session
from saisa_edge.serve.app import ServeOptions, create_app
from saisa_edge.serve.routing import HashRing, request_digest

ROUTINGS = ("digest", "default")
REPLICA_HEADER = "x-saisa-replica"
_HOP_BY_HOP = {"content-length", "transfer-encoding", "connection"}


class DigestRouter(RequestRouter):
    """Ray Serve request router: an image's digest -> its owner on the ring of replica ids."""

    ring: HashRing | None = None

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        digest = pending_request.kwargs.get("digest") if pending_request is not None else None
        if digest is None or not candidate_replicas:
            return [candidate_replicas]  # one rank: Ray sends it to the shortest queue among them
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if self.ring is None:
            self.ring = HashRing()
        for gone in self.ring.nodes - set(by_id):
            self.ring.remove(gone)
        for new in set(by_id) - self.ring.nodes:
            self.ring.add(new)
        return [[by_id[self.ring.owner(digest)]]]


class Replica:
    """One copy of the model and its app; answers forwarded HTTP requests as ASGI, streaming."""

    def __init__(self, open_session: Callable[[], Session], options: ServeOptions):
        self.app = create_app(open_session(), options)
        self.app.state.scheduler.start()  # the app's lifespan, which no ASGI server runs here
        self.name = serve.get_replica_context().replica_id.unique_id

    def __del__(self) -> None:
        self.app.state.scheduler.stop()

    async def __call__(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                       digest: str | None = None) -> AsyncIterator[Any]:
        """Yields (status, headers), then body pieces. `digest` is for the router only."""
        messages: asyncio.Queue[MutableMapping[str, Any] | None] = asyncio.Queue()
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # a client that leaves cancels this generator instead
            raise AssertionError("unreachable")

        async def run() -> None:
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                     "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
                     "query_string": query, "headers": headers, "client": None, "server": None}
            try:
                await self.app(scope, receive, messages.put)
            finally:
                messages.put_nowait(None)

        task = asyncio.create_task(run())
        try:
            while (m := await messages.get()) is not None:
                if m["type"] == "http.response.start":
                    yield m["status"], [*m.get("headers", []), (REPLICA_HEADER.encode(), self.name.encode())]
                elif m.get("body"):
                    yield m["body"]
        finally:
            task.cancel()


_INGRESS = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
# No `from __future__ import annotations` in this module: @serve.ingress reads the route's
# parameters (the Request) from live annotations, and string ones leave FastAPI a query param.


@serve.ingress(_INGRESS)
class Ingress:
    """Forwards every request to a replica, with the digest of its image for the router."""

    def __init__(self, model: DeploymentHandle, max_body_bytes: int):
        self.model, self.max_body_bytes = model.options(stream=True), max_body_bytes

    @_INGRESS.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(self, request: HttpRequest, path: str) -> StreamingResponse:
        body = bytearray()
        async for piece in request.stream():  # bounded: a longer body is the replica's 413
            body += piece
            if len(body) > self.max_body_bytes:
                break
        digest = None
        if request.method == "POST" and path == "v1/chat/completions":
            try:
                digest = request_digest(json.loads(body))
            except ValueError:
                pass  # not JSON: the replica answers the 400
        response = cast(DeploymentResponseGenerator, self.model.remote(  # a stream=True handle's answer
            request.method, "/" + path, request.url.query.encode(), request.headers.raw, bytes(body), digest=digest))
        status, headers = await response.__anext__()
        kept = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers
                if k.decode("latin-1").lower() not in _HOP_BY_HOP}

        async def pieces() -> AsyncIterator[bytes]:
            async for piece in response:
                yield piece

        return StreamingResponse(pieces(), status_code=status, headers=kept)


def application(open_session: Callable[[], Session], options: ServeOptions = ServeOptions(), replicas: int = 2,
                routing: str = "digest", cpus_per_replica: float = 1.0) -> serve.Application:
    """The Ray Serve application: `serve.run(application(...))`. `open_session` runs in each
    replica's process (it must pickle: a module-level function or a functools.partial of one)."""
    if routing not in ROUTINGS:
        raise SaisaError(f"routing: {routing!r} is not one of {', '.join(ROUTINGS)}")
    # RequestRouterConfig takes the class (or its import path); its annotation says otherwise
    router = (RequestRouterConfig(request_router_class=DigestRouter)  # type: ignore[arg-type]
              if routing == "digest" else RequestRouterConfig())
    model = serve.deployment(name="SaisaReplica", num_replicas=replicas,
                             max_ongoing_requests=options.max_batch + options.max_queue,
                             ray_actor_options={"num_cpus": cpus_per_replica}, request_router_config=router)(Replica)
    ingress = serve.deployment(name="SaisaIngress", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=10_000)(Ingress)
    return ingress.bind(model.bind(open_session, options), options.max_body_bytes)


@contextmanager
def local_ray(host: str = "127.0.0.1", port: int = 8000, num_cpus: int | None = None) -> Iterator[str]:
    """A Ray instance on this machine with Serve's HTTP proxy on host:port; yields its URL, and
    shuts both down after. Ray's memory monitor is off unless the environment sets it: on a
    machine shared with other work it kills Serve's controller for memory others use."""
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        yield f"http://{host}:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def build(args: dict[str, str]) -> serve.Application:
    """For Ray's CLI: `serve run saisa_edge.serve.ray_app:build source=ART [replicas=2] [routing=digest]`
    (an artifact or engine folder, ONNX Runtime/TensorRT by its kind, default options)."""
    from saisa_edge.cli import open_session

    source = Path(args["source"])
    return application(functools.partial(open_session, source), ServeOptions(model_name=source.resolve().name),
                       int(args.get("replicas", 2)), args.get("routing", "digest"))
