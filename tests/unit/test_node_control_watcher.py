"""The node's control watcher against a stand-in for its Redis key: drain, resume, move, and Redis failing."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis

from cluster.node.control import ControlWatcher, serve_until_stop_or_move
from cluster.state import InvalidRecord, NodeControl, Role

WAIT_S = 10.0  # every wait below ends well before this unless the watcher is broken


class FakeNode:
    """The control key (`control`, or `error` raised on reading it) and what the watcher did to the node."""

    def __init__(self) -> None:
        self.control: NodeControl | None = None
        self.error: Exception | None = None
        self.reads = 0
        self.drain_calls: list[bool] = []
        self.events: asyncio.Queue[dict[str, object]] = asyncio.Queue()

    def read(self) -> NodeControl | None:
        self.reads += 1
        if self.error is not None:
            raise self.error
        return self.control

    async def set_draining(self, drain: bool) -> None:
        self.drain_calls.append(drain)

    def watcher(self, role: Role) -> ControlWatcher:
        return ControlWatcher(
            self.read, self.set_draining, role=role, node_id="n-1", say=self.events.put_nowait, poll_s=0.005
        )

    async def next_event(self) -> dict[str, object]:
        return await asyncio.wait_for(self.events.get(), WAIT_S)

    async def polls(self, count: int) -> None:
        """Returns once the watcher has read the key `count` more times."""
        target, deadline = self.reads + count, time.monotonic() + WAIT_S
        while self.reads < target:
            assert time.monotonic() < deadline, "the watcher stopped polling"
            await asyncio.sleep(0.005)


def test_drain_and_resume_are_applied_once_per_change() -> None:
    async def scenario() -> None:
        node = FakeNode()
        task = asyncio.create_task(node.watcher("decode").wait_for_move())
        node.control = NodeControl(drain=True)
        assert await node.next_event() == {"event": "draining", "node_id": "n-1"}
        await node.polls(5)  # the same control read again changes nothing
        node.control = NodeControl(drain=False)
        assert await node.next_event() == {"event": "resumed", "node_id": "n-1"}
        node.control = NodeControl(drain=True)
        assert (await node.next_event())["event"] == "draining"
        node.control = None  # the operator cleared the control: serve again
        assert (await node.next_event())["event"] == "resumed"
        await node.polls(5)
        assert node.drain_calls == [True, False, True, False]
        assert node.events.empty() and not task.done()
        task.cancel()

    asyncio.run(scenario())


def test_a_move_to_another_pool_ends_the_wait_and_the_own_pool_is_ignored() -> None:
    async def scenario() -> None:
        node = FakeNode()
        task = asyncio.create_task(node.watcher("prefill").wait_for_move())
        node.control = NodeControl(drain=True, pool="prefill")  # already there: only the drain applies
        assert (await node.next_event())["event"] == "draining"
        await node.polls(5)
        assert not task.done()
        node.control = NodeControl(pool="colocated")
        assert await asyncio.wait_for(task, WAIT_S) == "colocated"

    asyncio.run(scenario())


@pytest.mark.parametrize("error", [redis.ConnectionError("refused"), InvalidRecord("NodeControl: bad pool")])
def test_an_unreadable_control_keeps_the_node_as_it_is_and_is_logged_once(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        node = FakeNode()
        task = asyncio.create_task(node.watcher("decode").wait_for_move())
        node.control = NodeControl(drain=True)
        assert (await node.next_event())["event"] == "draining"
        node.error = error
        await node.polls(10)  # a failed read must not resume the drained node
        assert node.drain_calls == [True] and node.events.empty() and not task.done()
        node.error, node.control = None, None
        assert (await node.next_event())["event"] == "resumed"
        task.cancel()

    with caplog.at_level(logging.INFO, logger="cluster.node.control"):
        asyncio.run(scenario())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and repr(error) in warnings[0].getMessage()
    assert any("works again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_a_stop_signal_or_a_move_ends_serving_whichever_comes_first() -> None:
    async def scenario() -> tuple[Role | None, Role | None]:
        stopped_node, stop = FakeNode(), asyncio.Event()
        serving = asyncio.create_task(serve_until_stop_or_move(stop, stopped_node.watcher("decode")))
        await stopped_node.polls(2)
        stop.set()
        on_stop = await asyncio.wait_for(serving, WAIT_S)

        moved_node = FakeNode()
        moved_node.control = NodeControl(pool="prefill")
        on_move = await asyncio.wait_for(
            serve_until_stop_or_move(asyncio.Event(), moved_node.watcher("decode")), WAIT_S
        )
        return on_stop, on_move

    assert asyncio.run(scenario()) == (None, "prefill")
