"""Which nodes the router stops trying for a request after KV transfers between pairs failed (router/inference.py)."""

from __future__ import annotations

from router.inference import _ends_of_two_failed_links


def test_one_failed_link_blames_neither_end() -> None:
    assert _ends_of_two_failed_links([("p0", "d0")]) == set()
    assert _ends_of_two_failed_links([("p0", "d0"), ("p0", "d0")]) == set()  # the same link twice


def test_a_prefill_node_whose_links_to_two_decode_nodes_failed_is_cut_off() -> None:
    assert _ends_of_two_failed_links([("p0", "d0"), ("p0", "d1")]) == {"p0"}


def test_a_decode_node_two_prefill_nodes_could_not_reach_is_down() -> None:
    assert _ends_of_two_failed_links([("p0", "d0"), ("p1", "d0")]) == {"d0"}
    assert _ends_of_two_failed_links([("p0", "d0"), ("p1", "d0"), ("p1", "d1")]) == {"d0", "p1"}
