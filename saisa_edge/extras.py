"""Which optional install a command needs: `pip install saisa-edge` is the runtime only."""

from __future__ import annotations

import importlib

from saisa_edge.errors import SaisaError

EXPORT_MODULES = ("torch", "onnx", "transformers")  # the heart of the `export` extra


def require_export(what: str) -> None:
    """A one-line error, naming the extra to install, when the export side is not installed."""
    missing = []
    for name in EXPORT_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise SaisaError(f"{what}: needs {', '.join(missing)}, which a runtime-only install lacks; "
                         "pip install 'saisa-edge[export]'")
