"""Data shipped inside the package (saisa_edge/assets), found through importlib.resources.

Paths built from `__file__` and the source tree's layout break in an installed wheel;
`importlib.resources` finds the files wherever the package lives.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from saisa_edge.errors import SaisaError


def asset(*parts: str) -> Path:
    """A bundled file or folder under saisa_edge/assets, as a filesystem path."""
    path = Path(str(resources.files("saisa_edge").joinpath("assets", *parts)))
    if not path.exists():
        raise SaisaError(f"{path}: bundled data is missing; reinstall saisa-edge")
    return path
