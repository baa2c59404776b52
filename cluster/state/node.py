"""Node side of cluster state: a registration under a lease, and the thread keeping it and the load fresh."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

import redis

from cluster.state.control import NodeControl, control_key, read_control
from cluster.state.records import (
    DEFAULT_TIMEOUT_S,
    DEFAULT_TTL_S,
    EVENTS_CHANNEL,
    INDEX_KEY,
    Event,
    LoadReport,
    NodeInfo,
    NotRegistered,
    connect,
    encode_event,
    encode_load,
    encode_node,
    load_key,
    node_key,
)

logger = logging.getLogger(__name__)


class NodeRegistration:
    """One node's entry in the cluster: `register`, `heartbeat` (at least every TTL/3), `publish_load`, `deregister`.

    Thread-safe; each call is one Redis round trip bounded by `timeout_s` (plus one retry on a dropped connection).
    """

    def __init__(
        self, redis_url: str, *, ttl_s: float = DEFAULT_TTL_S, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        if not 0.1 <= ttl_s <= 3600:
            raise ValueError(f"ttl_s must be within [0.1, 3600], not {ttl_s}")
        self.ttl_s = ttl_s
        self._ttl_ms = int(ttl_s * 1000)
        self._client = connect(redis_url, timeout_s=timeout_s)
        # Held across the Redis calls, so that a heartbeat that re-registers cannot interleave with a deregister.
        self._lock = threading.Lock()
        self._info: NodeInfo | None = None
        self._generation = ""

    @property
    def info(self) -> NodeInfo | None:
        return self._info

    def register(self, info: NodeInfo) -> None:
        """Announces `info` under a fresh lease; registering again (same node_id) replaces the record."""
        with self._lock:
            if self._info is not None and self._info.node_id != info.node_id:
                raise ValueError(f"already registered as {self._info.node_id!r}: deregister() first")
            self._write_registration(info)

    def _write_registration(self, info: NodeInfo) -> None:
        generation = secrets.token_hex(8)
        event = Event("register", info.node_id, generation, info=info)
        pipe = self._client.pipeline(transaction=True)
        pipe.set(node_key(info.node_id), encode_node(info), px=self._ttl_ms)
        pipe.hset(INDEX_KEY, info.node_id, generation)
        pipe.publish(EVENTS_CHANNEL, encode_event(event))
        pipe.execute()
        self._info, self._generation = info, generation

    def heartbeat(self) -> bool:
        """Renews the lease. False when it had lapsed already and the node was registered again."""
        with self._lock:
            info = self._registered()
            if self._client.pexpire(node_key(info.node_id), self._ttl_ms):
                return True
            logger.warning("lease of node %s had expired; registering again", info.node_id)
            self._write_registration(info)
            return False

    def publish_load(self, report: LoadReport) -> None:
        """Stores `report` for views that resync and announces it to those subscribed; its TTL is the lease's."""
        with self._lock:
            info = self._registered()
            if report.node_id != info.node_id:
                raise ValueError(f"load report of {report.node_id!r} published by node {info.node_id!r}")
            pipe = self._client.pipeline(transaction=False)
            pipe.set(load_key(info.node_id), encode_load(report), px=self._ttl_ms)
            pipe.publish(EVENTS_CHANNEL, encode_event(Event("load", info.node_id, load=report)))
            pipe.execute()

    def read_control(self) -> NodeControl | None:
        """The operator's control of this node (cluster/state/control.py), renewing its TTL; None if none."""
        return read_control(self._client, self._registered().node_id, renew=True)

    def deregister(self) -> None:
        """Removes the node from every view at once and drops its control. Idempotent; no-op when not registered."""
        with self._lock:
            if self._info is None:
                return
            node_id = self._info.node_id
            pipe = self._client.pipeline(transaction=True)
            # The control too: it was meant for this process, not for the next one under the same id.
            pipe.delete(node_key(node_id), load_key(node_id), control_key(node_id))
            pipe.hdel(INDEX_KEY, node_id)
            pipe.publish(EVENTS_CHANNEL, encode_event(Event("deregister", node_id)))
            pipe.execute()
            self._info, self._generation = None, ""

    def close(self) -> None:
        self._client.close()

    def _registered(self) -> NodeInfo:
        if self._info is None:
            raise NotRegistered("the node is not registered: call register() first")
        return self._info

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.deregister()
        except redis.RedisError as err:
            logger.warning("could not deregister: %s", err)
        finally:
            self.close()


class LoadPublisher:
    """A daemon thread that keeps a registered node's lease and load fresh.

    Every `poll_s` (or at once after `notify()`) it reads `current_load()` and publishes the report when it differs
    from the last one published, or when `period_s` has passed since; never twice within `min_gap_s`. It heartbeats
    every TTL/4. Redis errors are logged and retried, never raised: the lease expiring is what tells the cluster
    that this node is gone. Retries back off (20 ms doubling to 1 s) so that a Redis outage costs neither CPU nor a
    flood of reconnects; the first success resets the back-off, and since a restarted Redis is empty the heartbeat
    then finds the node key gone and registers the node again.

    `stalled()` (optional) names why the node is stuck, or returns None: while it names something, the node's
    registration is withdrawn (routers drop it at once and move its requests elsewhere; cluster/node/progress_watch.py), and
    it is registered again once the stall is over.
    """

    def __init__(
        self,
        registration: NodeRegistration,
        current_load: Callable[[], LoadReport],
        *,
        period_s: float = 0.1,
        poll_s: float = 0.02,
        min_gap_s: float = 0.01,
        max_backoff_s: float = 1.0,
        stalled: Callable[[], str | None] | None = None,
    ) -> None:
        if not 0 < min_gap_s <= poll_s <= period_s:
            raise ValueError("need 0 < min_gap_s <= poll_s <= period_s")
        self._registration = registration
        self._current_load = current_load
        self._period_s, self._poll_s, self._min_gap_s = period_s, poll_s, min_gap_s
        self._max_backoff_s = max(max_backoff_s, poll_s)
        self._heartbeat_s = registration.ttl_s / 4
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._stalled = stalled
        self._withdrawn: NodeInfo | None = None  # the registration taken back while the node is stalled

    @property
    def withdrawn(self) -> bool:
        return self._withdrawn is not None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("LoadPublisher already started")
        self._wake.set()  # publish the first report at once
        self._thread = threading.Thread(target=self._run, name="splitserve-load-publisher", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """The load changed: publish without waiting for the next poll."""
        self._wake.set()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stops the thread (without deregistering: the caller decides). Waits at most `timeout_s`."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("load publisher thread did not stop within %.1f s", timeout_s)

    def _run(self) -> None:
        last: LoadReport | None = None
        last_at = next_heartbeat = float("-inf")
        backoff_s = self._poll_s
        while not self._stopping.is_set():
            self._wake.wait(self._poll_s)
            self._wake.clear()
            gap = self._min_gap_s - (time.monotonic() - last_at)
            if gap > 0 and self._stopping.wait(gap):
                break
            now = time.monotonic()
            try:
                if self._withdraw_while_stalled():
                    continue
                if now >= next_heartbeat:
                    self._registration.heartbeat()
                    next_heartbeat = now + self._heartbeat_s
                report = self._current_load()
                if last is None or not report.same_load(last) or now - last_at >= self._period_s:
                    self._registration.publish_load(report)
                    last, last_at = report, now
                if self._failing:
                    logger.info("publishing load works again")
                self._failing = False
                backoff_s = self._poll_s
            except Exception as exc:  # a bug in current_load or a Redis error must not kill the lease keeper
                if not self._failing:
                    logger.warning(
                        "publishing load failed (retrying, backing off to every %.1f s): %r",
                        self._max_backoff_s,
                        exc,
                    )
                self._failing = True
                self._stopping.wait(
                    backoff_s
                )  # notify() does not cut this short: Redis is the one to wait for
                backoff_s = min(backoff_s * 2, self._max_backoff_s)

    def _withdraw_while_stalled(self) -> bool:
        """Withdraw the registration when the node is stalled, restore it when it is not; True while withdrawn."""
        reason = self._stalled() if self._stalled is not None else None
        if reason is not None and self._withdrawn is None:
            info = self._registration.info
            if info is None:
                return False
            logger.warning(
                "node %s makes no progress (%s): leaving the cluster until it does", info.node_id, reason
            )
            self._registration.deregister()
            self._withdrawn = info
        elif reason is None and self._withdrawn is not None:
            logger.warning("node %s makes progress again: registering again", self._withdrawn.node_id)
            self._registration.register(self._withdrawn)
            self._withdrawn = None
        return self._withdrawn is not None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
