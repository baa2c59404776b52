"""Stop strings cut the text exactly, also when split across deltas, and nothing past them is ever streamed."""

from __future__ import annotations

import pytest

from engine.stop_strings import StopStringMatcher


def stream(stops: list[str], deltas: list[str]) -> tuple[list[str], StopStringMatcher]:
    m = StopStringMatcher(stops)
    out = [m.feed(d) for d in deltas]
    out.append(m.flush())
    return out, m


def test_stop_inside_one_delta() -> None:
    out, m = stream(["END"], ["hello END world"])
    assert "".join(out) == "hello " and m.stopped_at == 6


def test_stop_split_across_deltas_is_held_back_then_cut() -> None:
    out, m = stream(["STOP"], ["abc ST", "O", "P tail"])
    assert out[0] == "abc " and out[1] == "" and "".join(out) == "abc "
    assert m.final_text == "abc "


def test_partial_match_is_released_when_it_turns_out_not_to_be_a_stop() -> None:
    out, m = stream(["STOP"], ["abc ST", "ONE"])
    assert "".join(out) == "abc STONE" and m.stopped_at is None


def test_earliest_of_several_stops_wins() -> None:
    out, _ = stream(["world", "lo w"], ["hello world"])
    assert "".join(out) == "hel"


def test_no_stops_streams_everything_immediately() -> None:
    out, _ = stream([], ["a", "b"])
    assert out == ["a", "b", ""]


@pytest.mark.parametrize("split", range(1, 12))
def test_every_split_point_gives_the_same_text(split: int) -> None:
    text = "one two<|x|> three"
    out, _ = stream(["<|x|>"], [text[:split], text[split:]])
    assert "".join(out) == "one two"
