"""Which replica answers a request: the one that owns its image on a consistent-hash ring.

A replica's visual cache holds the K/V of the images it has seen, so a request about an image
should land where that image already is. A hash ring with virtual nodes gives each replica
about 1/N of the digest space; a replica that leaves hands only its own arcs to the others
(every other image stays where its K/V is), and one that joins takes about 1/(N+1). Requests
without an image have nothing to keep together: they go to the least loaded replica.

The digest is the image's content hash: sha256 of the bytes a data: URL carries (of the URL
itself for file:// paths). The visual cache keys on the preprocessed pixels, which only a
replica can compute; equal bytes give equal pixels, so equal digests meet equal cache keys.
Pure functions and one small class: no Ray here (saisa_edge.serve.ray_app uses it).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from saisa_edge.errors import SaisaError
from saisa_edge.serve.protocol import parse_chat

VIRTUAL_NODES = 128
"""Points per replica on the ring: the spread of shares shrinks as 1/sqrt(points)."""


def _point(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


class HashRing:
    """Replica names on a ring of 64-bit points; `owner(digest)` is the first point clockwise."""

    def __init__(self, nodes: Iterable[str] = (), vnodes: int = VIRTUAL_NODES):
        self.vnodes = vnodes
        self._points: list[int] = []
        self._owners: list[str] = []
        self.nodes: set[str] = set()
        for node in nodes:
            self.add(node)

    def add(self, node: str) -> None:
        if node in self.nodes:
            return
        self.nodes.add(node)
        for i in range(self.vnodes):
            p = _point(f"{node}#{i}")
            at = bisect.bisect(self._points, p)
            self._points.insert(at, p)
            self._owners.insert(at, node)

    def remove(self, node: str) -> None:
        if node not in self.nodes:
            return
        self.nodes.discard(node)
        kept = [(p, o) for p, o in zip(self._points, self._owners) if o != node]
        self._points, self._owners = [p for p, _ in kept], [o for _, o in kept]

    def owner(self, digest: str) -> str:
        if not self._points:
            raise SaisaError("routing: no replica is running")
        at = bisect.bisect(self._points, _point(digest)) % len(self._points)
        return self._owners[at]


def least_loaded(outstanding: Mapping[str, int], nodes: Iterable[str]) -> str:
    """The node with the fewest requests in flight (ties: the smallest name, deterministically)."""
    return min(nodes, key=lambda n: (outstanding.get(n, 0), n))


def image_digest(url: str) -> str:
    """The content hash of an image part's URL: its decoded bytes for data: URLs."""
    head, comma, payload = url.partition(",")
    if url.startswith("data:") and comma and head.endswith(";base64"):
        try:
            return hashlib.sha256(base64.b64decode(payload, validate=True)).hexdigest()
        except (binascii.Error, ValueError):
            pass  # not base64: the replica refuses it; any replica will do
    return hashlib.sha256(url.encode()).hexdigest()


def request_digest(body: Any) -> str | None:
    """The digest of a chat-completions body's image, or None (no image, or a body the replica
    will refuse anyway: it is parsed as the replica parses it, so both agree on which image)."""
    try:
        chat = parse_chat(body)
    except (SaisaError, TypeError, AttributeError):
        return None
    return None if chat.image is None else image_digest(chat.image.url)
