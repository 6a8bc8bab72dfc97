"""An OpenAI-compatible HTTP server (`saisa-edge serve`) with in-flight batching around the
visual K/V cache. Needs the `[serve]` extra (fastapi, uvicorn); the runtime stays torch-free.

The stable entry point, for `saisa-edge serve`, tests, and deployments that wrap it (Ray Serve):

    create_app(session: Session, options: ServeOptions = ServeOptions()) -> fastapi.FastAPI

`session` is a `saisa_edge.runtime.session.Session` (backend, tokenizer, template, visual
cache); `options` (`ServeOptions`, a frozen dataclass) carries model_name, max_batch,
max_queue, max_prefill_tokens, timeout_s, api_key, allow_local_images, max_body_bytes,
max_image_bytes and default_max_tokens. The app starts its scheduler thread (the only
thread that runs the model) in its lifespan and stops it at shutdown; `app.state.scheduler`
and `app.state.metrics` are there for tests. Routes: POST /v1/chat/completions,
GET /v1/models, /health, /metrics, and GET / (a chat page, static/chat.html).
"""

from saisa_edge.serve.app import ServeOptions, create_app

__all__ = ["ServeOptions", "create_app"]
