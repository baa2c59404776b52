"""ProgressWatch: which stalls withdraw a node, and which long waits do not."""

from __future__ import annotations

import pytest

from cluster.node.progress_watch import ProgressWatch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_engine_step_longer_than_the_limit_is_a_stall_and_ending_it_clears_it() -> None:
    clock, step = Clock(), {"started": None}
    watch = ProgressWatch(lambda: step["started"], stall_s=2.0, clock=clock)
    step["started"] = clock.now
    clock.now += 1.9
    watch.tick()
    assert watch.stalled() is None
    clock.now += 0.2
    watch.tick()
    assert "engine has been in one step for 2.1 s" in (watch.stalled() or "")
    step["started"] = None  # the step ended
    assert watch.stalled() is None


def test_an_idle_engine_is_no_stall_but_a_blocked_event_loop_is() -> None:
    clock = Clock()
    watch = ProgressWatch(lambda: None, stall_s=2.0, clock=clock)
    clock.now += 60  # idle for a minute, the loop ticking all along
    watch.tick()
    assert watch.stalled() is None
    clock.now += 2.5  # no tick: the loop is blocked
    assert "event loop has not run for 2.5 s" in (watch.stalled() or "")


def test_a_limit_shorter_than_the_tick_is_refused() -> None:
    with pytest.raises(ValueError, match="stall_s"):
        ProgressWatch(lambda: None, stall_s=0.1)
