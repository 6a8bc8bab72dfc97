"""`saisa-edge serve` against the real `openai` client: a uvicorn server on 127.0.0.1 (a free
port) around the tiny preset's artifact on ONNX Runtime."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from click.testing import CliRunner
from PIL import Image

from saisa_edge.artifacts import open_artifact
from saisa_edge.backends import open_model
from saisa_edge.checkpoint.loader import open_checkpoint
from saisa_edge.cli import main
from saisa_edge.export.artifact import ExportOptions, export_artifact
from saisa_edge.inputs.conversation import get_template
from saisa_edge.inputs.image import load_image, preprocess
from saisa_edge.runtime.session import Request, Session
from saisa_edge.runtime.visual_cache import VisualCache
from saisa_edge.serve import ServeOptions, create_app
from tests.conftest import DEMO_IMAGE
from tests.imagefiles import encode, with_size
from tests.test_torch_free import _WRAPPER, BLOCKED

MODEL = "tiny"


@pytest.fixture(scope="module", params=["standard", "contrib"])
def artifact(request, tmp_path_factory, tiny_dir) -> Path:
    """Both decoder forms: the batcher's joining and leaving rows must hold on the contrib form's
    one in-place K/V buffer as on the standard form's cache arrays."""
    out = tmp_path_factory.mktemp(f"serve-{request.param}") / "tiny-art"
    export_artifact(open_checkpoint(tiny_dir), out, ExportOptions(decoder_form=request.param))
    return out


@pytest.fixture(scope="module")
def model(artifact):
    return open_model(open_artifact(artifact))


def _session(model) -> Session:
    backend, tok = model
    cache = VisualCache(backend.config.text, backend.identity, backend.dtype, 2**28)
    return Session(backend, tok, get_template(tok.default_conv_mode()), cache)


@contextmanager
def serving(session: Session, **options) -> Iterator[tuple[str, object]]:
    """The app on a free loopback port, in a thread; yields (base URL, app)."""
    app = create_app(session, ServeOptions(model_name=MODEL, **options))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def data_url(path_or_bytes: Path | bytes, mime: str = "image/png") -> str:
    data = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"



def _chat(client: openai.OpenAI, **request):
    """A chat completion, greedy unless the test samples on purpose: tiny's vocabulary has 480
    tokens, so a sampled reply ends on EOS at once about once in 500 requests (CI failed on
    that twice, in two tests)."""
    request.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, **request)

def _ask(question: str, image: str | None) -> list[dict]:
    parts: list[dict] = [{"type": "text", "text": question}]
    if image is not None:
        parts.append({"type": "image_url", "image_url": {"url": image}})
    return [{"role": "user", "content": parts}]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


class Gate:
    """Wraps backend.forward: counts calls, can hold them (a model busy for as long as a test
    needs) or slow them down, deterministically."""

    def __init__(self, backend, delay: float = 0.0):
        self.backend, self.real, self.delay = backend, backend.forward, delay
        self.open, self.calls = threading.Event(), 0
        self.open.set()
        backend.forward = self

    def __call__(self, *args):
        self.calls += 1
        assert self.open.wait(60)
        time.sleep(self.delay)
        return self.real(*args)

    def restore(self) -> None:
        self.open.set()
        self.backend.forward = self.real


@pytest.fixture
def gate(model):
    g = Gate(model[0])
    yield g
    g.restore()


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
              or line.startswith(name + "{")]
    return sum(values)


def _wait(cond, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# --- protocol ----------------------------------------------------------------------------


def test_answers_equal_saisa_edge_run_streaming_or_not(model, artifact):
    question, n = "What is in the picture?", 12
    r = CliRunner().invoke(main, ["run", str(artifact), "--image", str(DEMO_IMAGE), "--prompt", question,
                                  "--max-new-tokens", str(n), "--json"])
    assert r.exit_code == 0, r.output
    want = json.loads(r.stdout)
    with serving(_session(model)) as (url, _):
        client = _client(url)
        got = _chat(client, messages=_ask(question, data_url(DEMO_IMAGE)),
                                             max_tokens=n, temperature=0)
        pieces, finish, usage, saisa = [], None, None, None
        for c in _chat(client, messages=_ask(question, data_url(DEMO_IMAGE)),
                                                max_completion_tokens=n, temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
            if c.choices:
                pieces.append(c.choices[0].delta.content or "")
                finish = c.choices[0].finish_reason or finish
                saisa = (c.model_extra or {}).get("saisa") or saisa
            usage = c.usage or usage
        assert [m.id for m in client.models.list()] == [MODEL]
    assert got.choices[0].message.content == want["text"] and want["tokens"]
    assert got.choices[0].finish_reason == want["finish_reason"] == "length"
    visual = model[0].config.num_visual_tokens
    assert got.usage.completion_tokens == n and got.usage.prompt_tokens == len(want["prompt_tokens"]) - 1 + visual
    first = got.model_extra["saisa"]
    assert first["visual_cache"] == "miss" and {"vision", "visual_kv", "prefill", "first_token"} <= set(first["timings_ms"])
    assert "".join(pieces).strip() == want["text"] and finish == "length"
    assert usage.completion_tokens == n and saisa["visual_cache"] == "hit" and saisa["timings_ms"]["vision"] == 0.0
    assert saisa["prefix_reused_tokens"] > 0  # the text before the image was not run again


def test_multi_turn_maps_to_the_template_as_chat_does(model):
    session = _session(model)
    px = preprocess(load_image(DEMO_IMAGE), model[0].config.vision)
    chat = session.chat(px)
    first, second = chat.ask("What is shown?", max_new_tokens=6), chat.ask("And the colours?", max_new_tokens=6)
    messages = _ask("What is shown?", data_url(DEMO_IMAGE)) + [
        {"role": "assistant", "content": first.text}, {"role": "user", "content": "And the colours?"}]
    with serving(_session(model)) as (url, _):
        got = _chat(_client(url), messages=messages, max_tokens=6, temperature=0)
    assert got.choices[0].message.content == second.text


def test_sixteen_concurrent_requests_over_four_images(model, gate):
    demo = load_image(DEMO_IMAGE)
    images = [demo, demo.rotate(90), demo.transpose(Image.Transpose.FLIP_LEFT_RIGHT), demo.convert("L").convert("RGB")]
    questions = ["What is shown?", "Describe it.", "Which colours?", "Is it day?"]
    jobs = [(q, i) for i in range(4) for q in questions]
    reference = _session(model)
    cfg = model[0].config.vision
    want = [reference.generate(Request(q, preprocess(images[i], cfg), max_new_tokens=10)).text for q, i in jobs]
    urls = [data_url(_png(img)) for img in images]
    backend = model[0]
    real_vision, runs = backend.vision, []
    backend.vision = lambda pixels: runs.append(1) or real_vision(pixels)
    try:
        with serving(_session(model), max_batch=8, max_queue=16) as (url, app):
            client = _client(url)
            gate.open.clear()  # hold the model until every request is in: they must be batched

            def one(job):
                q, i = job
                return _chat(client, messages=_ask(q, urls[i]), max_tokens=10,
                                                      temperature=0)

            with ThreadPoolExecutor(16) as pool:
                futures = [pool.submit(one, job) for job in jobs]
                scheduler = app.state.scheduler
                _wait(lambda: len(scheduler.queue) + scheduler.running == 16)
                gate.open.set()
                got = [f.result() for f in futures]
            misses = _metric(url, "saisa_visual_cache_misses_total")
            batched = _metric(url, "saisa_batch_size_sum") / _metric(url, "saisa_batch_size_count")
    finally:
        backend.vision = real_vision
    assert [g.choices[0].message.content for g in got] == want
    assert len(runs) == 4 and misses == 4
    assert sorted(g.model_extra["saisa"]["visual_cache"] for g in got) == ["hit"] * 12 + ["miss"] * 4
    assert batched > 2  # decode steps ran many rows at once


# --- refusals ------------------------------------------------------------------------------


def _refused(call, status: int, code_or_text: str) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    err = e.value
    assert err.status_code == status, err.message
    body = err.body if isinstance(err.body, dict) else {}
    assert code_or_text in (str(body.get("code")) + body.get("message", "")), body
    assert "Traceback" not in err.response.text and "\n" not in body.get("message", "")
    return err


def test_bad_images_and_prompts_are_refused(model, tmp_path):
    with serving(_session(model), max_body_bytes=1 << 20) as (url, _):
        client = _client(url)

        def ask(image=None, question="What?", **kw):
            return lambda: _chat(client, messages=_ask(question, image), max_tokens=2,
                                                          **kw)

        huge = with_size(encode("PNG"), "PNG", 9000, 9000)
        _refused(ask(data_url(huge)), 413, "image_too_large")
        _refused(ask(data_url(b"\x89PNG\r\n\x1a\nnot really")), 400, "cannot decode the image")
        _refused(ask("data:image/png;base64,@@@"), 400, "not valid base64")
        _refused(ask(data_url(encode("GIF"), "image/png")), 400, "send PNG, JPEG or WebP")
        _refused(ask("https://example.com/cat.png"), 400, "fetches nothing from the network")
        _refused(ask(f"file://{DEMO_IMAGE}"), 400, "--allow-local-images")
        _refused(ask(data_url(b"x" * (2 << 20))), 413, "body_too_large")
        _refused(ask(question="word " * 3000), 413, "prompt_too_long")
        _refused(ask(n=2), 400, "'n'")
        _refused(ask(temperature=-1), 400, "temperature")
        _refused(lambda: client.chat.completions.create(model="other", messages=_ask("Hi", None)), 404,
                 "model_not_found")
        r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json")
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "assistant", "content": "x"}]})
        assert r.status_code == 400 and "messages[0]" in r.json()["error"]["message"]
        ok = _chat(client, messages=_ask("What?", data_url(DEMO_IMAGE)), max_tokens=2)
        assert ok.choices[0].finish_reason == "length"
        assert _metric(url, 'saisa_requests_total{status="413"}') == 3


def test_local_images_only_under_the_allowed_folder(model, tmp_path):
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "demo.png").write_bytes(DEMO_IMAGE.read_bytes())
    with serving(_session(model), allow_local_images=allowed) as (url, _):
        client = _client(url)
        ok = _chat(client, messages=_ask("What?", f"file://{allowed / 'demo.png'}"),
                                            max_tokens=2)
        assert ok.model_extra["saisa"]["visual_cache"] == "miss"
        _refused(lambda: _chat(client, messages=_ask("What?", f"file://{allowed}/../images/../../{DEMO_IMAGE}"), max_tokens=2),
            400, "outside --allow-local-images")


def test_api_key(model):
    with serving(_session(model), api_key="s3cret") as (url, _):
        _refused(lambda: _chat(_client(url, "wrong"), messages=_ask("Hi", None)),
                 401, "invalid_api_key")
        _refused(lambda: _client(url, "wrong").models.list(), 401, "invalid_api_key")
        ok = _chat(_client(url, "s3cret"), messages=_ask("Hi", None), max_tokens=2)
        assert ok.usage.completion_tokens >= 1
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_full_queue_is_429_with_retry_after(model, gate):
    with serving(_session(model), max_batch=1, max_queue=1) as (url, app):
        client = _client(url)
        scheduler = app.state.scheduler
        gate.open.clear()
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(_chat, client, messages=_ask("Hi", None), max_tokens=3,
                                  temperature=0)  # greedy: OpenAI's default of 1 may sample an early end
            _wait(lambda: scheduler.running == 1)
            queued = pool.submit(_chat, client, messages=_ask("Hey", None), max_tokens=3,
                                 temperature=0)
            _wait(lambda: len(scheduler.queue) == 1)
            err = _refused(lambda: _chat(client, messages=_ask("Yo", None)), 429,
                           "queue_full")
            assert int(err.response.headers["retry-after"]) >= 1
            assert _metric(url, "saisa_queue_depth") == 1
            gate.open.set()
            assert running.result().usage.completion_tokens == 3 and queued.result().usage.completion_tokens == 3
    with serving(_session(model), max_batch=1, max_queue=0) as (url, _):  # no queue: a free row still takes one
        assert _chat(_client(url), messages=_ask("Hi", None),
                                                    max_tokens=2, temperature=0).usage.completion_tokens == 2


def test_timeout_is_503_with_retry_after(model, gate):
    """One request times out while it decodes, the other while it waits in the queue.
    Greedy, so the decoding one cannot end early on a sampled EOS (the tiny vocabulary has
    480 tokens: sampling ended it within the timeout about once in fifty runs)."""
    ask = dict(messages=_ask("Hi", None))
    with serving(_session(model)) as (url, _):  # the premise, without the timeout: no early EOS
        assert _chat(_client(url), **ask, max_tokens=30).choices[0].finish_reason == "length"
    gate.delay = 0.05
    with serving(_session(model), timeout_s=0.5, max_batch=1) as (url, app):
        client = _client(url)

        def slow():
            return _refused(lambda: _chat(client, **ask, max_tokens=500), 503, "timeout")

        with ThreadPoolExecutor(2) as pool:
            errors = [pool.submit(slow) for _ in range(2)]
            errors = [e.result() for e in errors]
        assert all(int(e.response.headers["retry-after"]) >= 1 for e in errors)
        assert app.state.scheduler.running == 0 and _metric(url, 'saisa_requests_total{status="503"}') == 2


def test_disconnect_mid_stream_frees_the_slot(model, gate):
    gate.delay = 0.02  # 1000 tokens would take 20 s or more
    with serving(_session(model), max_batch=1) as (url, app):
        client = _client(url)
        stream = _chat(client, messages=_ask("Tell me a story.", None), max_tokens=1000,
                                                temperature=0, stream=True)
        got = [next(stream) for _ in range(3)]
        assert got[1].choices[0].delta.content is not None
        stream.close()
        scheduler = app.state.scheduler
        _wait(lambda: scheduler.running == 0, 10)
        calls = gate.calls
        time.sleep(0.3)
        assert gate.calls == calls  # nothing runs for it any more
        assert _metric(url, 'saisa_requests_total{status="cancelled"}') == 1
        gate.delay = 0.0
        after = _chat(client, messages=_ask("Hi", None), max_tokens=2)
        assert after.usage.completion_tokens == 2  # the one slot is free again


def test_metrics_are_prometheus_text(model):
    with serving(_session(model)) as (url, _):
        _chat(_client(url), messages=_ask("Hi", data_url(DEMO_IMAGE)), max_tokens=3)
        text = httpx.get(f"{url}/metrics").text
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert {"saisa_requests_total", "saisa_time_to_first_token_seconds", "saisa_time_per_output_token_seconds",
            "saisa_generated_tokens_total", "saisa_visual_cache_hits_total", "saisa_visual_cache_misses_total",
            "saisa_visual_cache_bytes", "saisa_queue_depth", "saisa_batch_size"} <= names
    assert 'saisa_requests_total{status="200"} 1' in text and "saisa_generated_tokens_total 3" in text
    assert 'saisa_time_to_first_token_seconds_bucket{le="+Inf"} 1' in text


# --- the command -----------------------------------------------------------------------------


def test_serve_command_runs_without_torch(artifact):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    # as on a device: torch, onnx, transformers and the exporter unimportable
    proc = subprocess.Popen([sys.executable, "-c", _WRAPPER.format(blocked=BLOCKED), "serve", str(artifact),
                             "--port", str(port), "--max-batch", "2", "--api-key", "k"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(lambda: proc.poll() is None and _healthy(url), 60)
        got = _client(url, "k").chat.completions.create(model="tiny-art", messages=_ask("Hi", data_url(DEMO_IMAGE)),
                                                        max_tokens=2, temperature=0)
        assert got.usage.completion_tokens == 2
    finally:
        proc.terminate()
        proc.wait(30)
    assert "Traceback" not in proc.stderr.read().decode()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health").status_code == 200
    except httpx.HTTPError:
        return False


def test_serve_command_refuses_bad_flags(tmp_path, artifact):
    r = CliRunner().invoke(main, ["serve", str(artifact), "--allow-local-images", str(tmp_path / "none")])
    assert r.exit_code == 2 and "not a folder" in r.stderr
    r = CliRunner().invoke(main, ["serve", str(tmp_path)])
    assert r.exit_code == 2 and "neither a SAISA checkpoint" in r.stderr


def test_serve_on_engines_takes_at_most_their_batch(monkeypatch, model, tmp_path):
    """Engines built for --max-batch 2 are never given 3 rows (TensorRT would refuse the shape)."""
    import types

    import saisa_edge.artifacts
    import saisa_edge.cli

    session = _session(model)
    session.backend = types.SimpleNamespace(name="tensorrt", config=model[0].config)
    monkeypatch.setattr(saisa_edge.cli, "_session", lambda *a: (session, 0.0))
    monkeypatch.setattr(saisa_edge.artifacts, "kind_of", lambda path: saisa_edge.artifacts.ENGINE_KIND)
    monkeypatch.setattr(saisa_edge.artifacts, "open_engines",
                        lambda path, verify: types.SimpleNamespace(manifest=types.SimpleNamespace(max_batch=2)))
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(app))
    r = CliRunner().invoke(main, ["serve", str(tmp_path), "--max-batch", "8"])
    assert r.exit_code == 0, r.output
    assert served[0].state.options.max_batch == 2 and served[0].state.scheduler.batcher.max_batch == 2
    assert "built with --max-batch 2" in r.stderr
