"""The consistent-hash ring that sends each image to the replica holding its visual K/V."""

from __future__ import annotations

import base64
import hashlib
from collections import Counter

import pytest

from saisa_edge.errors import SaisaError
from saisa_edge.serve.routing import HashRing, image_digest, least_loaded, request_digest

DIGESTS = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]


def test_same_digest_same_owner_whatever_the_order_nodes_joined():
    a, b = HashRing(["r0", "r1", "r2"]), HashRing(["r2", "r0", "r1"])
    assert [a.owner(d) for d in DIGESTS] == [b.owner(d) for d in DIGESTS]


def test_shares_are_even_with_virtual_nodes():
    shares = Counter(HashRing([f"r{i}" for i in range(4)]).owner(d) for d in DIGESTS)
    assert set(shares) == {"r0", "r1", "r2", "r3"}
    assert max(shares.values()) < 1.35 * len(DIGESTS) / 4  # one point per replica would be far worse


def test_losing_a_replica_remaps_only_its_share():
    ring = HashRing(["r0", "r1", "r2", "r3"])
    before = {d: ring.owner(d) for d in DIGESTS}
    ring.remove("r2")
    after = {d: ring.owner(d) for d in DIGESTS}
    moved = {d for d in DIGESTS if before[d] != after[d]}
    assert moved == {d for d in DIGESTS if before[d] == "r2"}
    assert "r2" not in after.values()
    ring.add("r2")  # it comes back: its images come back to it, nothing else moves
    assert {d: ring.owner(d) for d in DIGESTS} == before


def test_a_new_replica_takes_about_its_share_from_the_others():
    ring = HashRing(["r0", "r1", "r2"])
    before = {d: ring.owner(d) for d in DIGESTS}
    ring.add("r3")
    moved = [d for d in DIGESTS if ring.owner(d) != before[d]]
    assert all(ring.owner(d) == "r3" for d in moved)
    assert 0.15 < len(moved) / len(DIGESTS) < 0.35


def test_an_empty_ring_is_an_error():
    with pytest.raises(SaisaError, match="no replica"):
        HashRing().owner(DIGESTS[0])


def test_requests_without_an_image_go_to_the_least_loaded():
    assert least_loaded({"r0": 3, "r1": 1, "r2": 2}, ["r0", "r1", "r2"]) == "r1"
    assert least_loaded({"r0": 1}, ["r0", "r1"]) == "r1"  # none in flight counts as zero
    assert least_loaded({}, ["r1", "r0"]) == "r0"


def _body(url: str | None, question: str = "What?") -> dict:
    parts: list[dict] = [{"type": "text", "text": question}]
    if url is not None:
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return {"messages": [{"role": "user", "content": parts}]}


def test_the_digest_is_the_image_bytes_hash():
    png = b"\x89PNG\r\n\x1a\n some image"
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    assert image_digest(url) == hashlib.sha256(png).hexdigest()
    # the same image asked about differently, or in a later turn, has the same digest
    later = _body(url, "Describe it.")
    later["messages"] += [{"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Colour?"}]
    assert request_digest(_body(url)) == request_digest(later) == image_digest(url)
    assert request_digest(_body(None)) is None
    assert request_digest({"messages": "nonsense"}) is None  # the replica answers the 400
    assert image_digest("data:image/png;base64,@@") == hashlib.sha256(b"data:image/png;base64,@@").hexdigest()
    assert image_digest("file:///x/a.png") != image_digest("file:///x/b.png")
