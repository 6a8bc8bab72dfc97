"""Ray Serve scale-out on a local Ray instance (2 CPUs): 2 replicas of the tiny preset behind the
digest-routing ingress. Each image's requests land on one replica (one visual computation per
image, every other request a cache hit) and the answers are the single server's."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image

from saisa_edge.cli import open_session
from saisa_edge.inputs.image import load_image, preprocess
from saisa_edge.runtime.session import Request
from saisa_edge.serve import ServeOptions
from tests.conftest import DEMO_IMAGE
from tests.test_serve import MODEL, _ask, _client, _png, _session, artifact, data_url, model  # noqa: F401

pytest.importorskip("ray", reason="needs the [ray] extra (pip install 'saisa-edge[ray]')")
from ray import serve  # noqa: E402

from saisa_edge.serve.ray_app import REPLICA_HEADER, DigestRouter, application, local_ray  # noqa: E402
from saisa_edge.serve.routing import HashRing  # noqa: E402

N = 8


def _replicas(*names: str) -> list:
    return [SimpleNamespace(replica_id=SimpleNamespace(unique_id=n)) for n in names]


def _pending(digest: str | None):
    return SimpleNamespace(kwargs={"digest": digest})


def test_the_router_sends_a_digest_to_its_owner_and_others_to_the_shortest_queue():
    router = object.__new__(DigestRouter)  # choose_replicas needs none of Ray's router state
    choose = lambda replicas, digest: asyncio.run(router.choose_replicas(replicas, _pending(digest)))  # noqa: E731
    three, digests = _replicas("a", "b", "c"), [hashlib.sha256(str(i).encode()).hexdigest() for i in range(300)]
    owners = {d: choose(three, d) for d in digests}
    ring = HashRing(["a", "b", "c"])
    assert all(len(o) == 1 and len(o[0]) == 1 and o[0][0].replica_id.unique_id == ring.owner(d)
               for d, o in owners.items())
    # "b" died: only its images move; Ray replaced it with "d": images move only to "d"
    lost = {d: choose(_replicas("a", "c"), d)[0][0].replica_id.unique_id for d in digests}
    assert {d for d in digests if lost[d] != ring.owner(d)} == {d for d in digests if ring.owner(d) == "b"}
    replaced = {d: choose(_replicas("a", "c", "d"), d)[0][0].replica_id.unique_id for d in digests}
    assert all(replaced[d] in (lost[d], "d") for d in digests) and "d" in replaced.values()
    assert choose(three, None) == [three]  # one rank: Ray picks the shortest queue in it


@pytest.fixture(scope="module")
def ray_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with local_ray("127.0.0.1", port, num_cpus=2) as url:
        yield url


def _deploy(artifact, routing: str, url: str) -> None:
    opener = functools.partial(open_session, artifact)
    serve.run(application(opener, ServeOptions(model_name=MODEL), replicas=2, routing=routing, cpus_per_replica=1),
              name="saisa", route_prefix="/")
    deadline = time.monotonic() + 300
    while httpx.get(f"{url}/health", timeout=120).status_code != 200:
        assert time.monotonic() < deadline, "the Ray app did not become healthy"
        time.sleep(0.5)


@pytest.mark.slow  # Ray's start and two replicas take a minute or more here
def test_each_image_stays_on_one_replica_and_answers_equal_one_server(artifact, model, ray_url):
    demo = load_image(DEMO_IMAGE)
    images = [demo, demo.rotate(90), demo.transpose(Image.Transpose.FLIP_LEFT_RIGHT), demo.convert("L").convert("RGB")]
    questions = ["What is shown?", "Describe it.", "Which colours?"]
    jobs = [(q, i) for q in questions for i in range(len(images))]
    reference, cfg = _session(model), model[0].config.vision
    want = [reference.generate(Request(q, preprocess(images[i], cfg), max_new_tokens=N)).text for q, i in jobs]
    want_text = reference.generate(Request("Hello there.", None, max_new_tokens=N)).text
    urls = [data_url(_png(img)) for img in images]

    _deploy(artifact, "digest", ray_url)

    def ask(job):
        q, i = job
        r = httpx.post(f"{ray_url}/v1/chat/completions", timeout=300,
                       json={"model": MODEL, "messages": _ask(q, urls[i]), "max_tokens": N, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        return body["choices"][0]["message"]["content"], body["saisa"]["visual_cache"], r.headers[REPLICA_HEADER]

    with ThreadPoolExecutor(4) as pool:
        first = list(pool.map(ask, jobs[:4]))  # each image once, concurrently
        rest = list(pool.map(ask, jobs[4:]))
    got = first + rest
    assert [text for text, _, _ in got] == want
    for i in range(len(images)):
        mine = [g for (q, j), g in zip(jobs, got) if j == i]
        assert len({replica for _, _, replica in mine}) == 1, f"image {i} was answered by several replicas"
        assert sorted(outcome for _, outcome, _ in mine) == ["hit", "hit", "miss"]  # one vision computation

    # without an image: balanced by load (any replica), same answer; streaming passes through the ingress
    client = _client(ray_url)
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=_ask("Hello there.", None), max_tokens=N, temperature=0, stream=True) if c.choices]
    assert "".join(pieces).strip() == want_text
    # the page and errors come from the replica's app unchanged
    assert "saisa-edge chat" in httpx.get(ray_url, timeout=60).text
    r = httpx.post(f"{ray_url}/v1/chat/completions", content=b"{not json", timeout=60)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_serve_command_on_ray_runs_the_application(monkeypatch, artifact):
    """`serve --ray --replicas N` deploys `application` with N replicas on a local Ray (stubbed
    here; the slow test above runs the real one), and --replicas 0 is a one-line refusal."""
    import contextlib

    from click.testing import CliRunner

    import saisa_edge.serve.ray_app as ray_app
    from saisa_edge.cli import main

    made, ran = [], []
    monkeypatch.setattr(ray_app, "local_ray", lambda host, port: contextlib.nullcontext(f"http://{host}:{port}"))
    monkeypatch.setattr(ray_app, "application", lambda opener, options, replicas: made.append((options, replicas))
                        or "app")
    monkeypatch.setattr(serve, "run", lambda app, blocking: ran.append((app, blocking)))
    r = CliRunner().invoke(main, ["serve", str(artifact), "--ray", "--replicas", "3", "--max-batch", "4"])
    assert r.exit_code == 0, r.output
    assert ran == [("app", True)] and made[0][1] == 3 and made[0][0].max_batch == 4
    r = CliRunner().invoke(main, ["serve", str(artifact), "--ray", "--replicas", "0"])
    assert r.exit_code == 2 and "--replicas" in r.output and "Traceback" not in r.output
