"""The two ends of a pair: the writer's sender and completion threads, the receiver's receiving and landing
threads, and the close handshake between them."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from engine.kernels import gather_blocks, scatter_blocks
from kvtransfer.backends.torch_backend.wire import (
    BYE_TAG,
    DATA_TAG,
    DIST_ERRORS,
    IDLE,
    WriteHeader,
    byte_view,
)
from kvtransfer.base import PeerId, TransferHandle, TransferState, check_write
from kvtransfer.descriptor import NodeDescriptor
from kvtransfer.layout import HeadSlice, KVLayout, coalesce_block_pairs

JOIN_TIMEOUT_S = 2.0  # how long close() waits for one thread or one goodbye
# A write whose runs (blocks consecutive on both sides) average this many bytes sends each run as its own gloo
# message, straight from one pool into the other; shorter runs are gathered into one message and scattered on
# arrival, as a message costs tens of microseconds of its own.
MIN_RUN_BYTES = 256 << 10

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class TorchHandle(TransferHandle):
    pass


@dataclass(slots=True)
class Job:
    handle: TorchHandle
    src: list[int]
    dst: list[int]
    notify: bytes | None
    heads: HeadSlice | None = None


_Started = tuple[TorchHandle, list[Any], list[torch.Tensor]]


class PairLink:
    """A pair's gloo group and its close handshake. on_end(reason) runs once, on the watcher thread."""

    def __init__(self, group: Any, rank: int, name: str, on_end: Callable[[str], None]) -> None:
        self.group = group
        self._other = 1 - rank
        self._on_end = on_end
        self._lock = threading.Lock()
        self._bye_sent = False
        self._watcher = threading.Thread(target=self._watch, name=f"kv-watch-{name}", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        """Say goodbye and wait (bounded) for the answer, which ends the watcher."""
        self._say_bye()
        self._watcher.join(JOIN_TIMEOUT_S)

    def _watch(self) -> None:
        try:
            self.group.recv([torch.empty(1, dtype=torch.uint8)], self._other, BYE_TAG).wait(IDLE)
            reason = "the peer closed the connection"
            self._say_bye()  # the answer: it lets the peer's watcher end too
        except DIST_ERRORS as exc:
            reason = f"the connection dropped ({exc})"
        self._on_end(reason)

    def _say_bye(self) -> None:
        with self._lock:
            if self._bye_sent:
                return
            self._bye_sent = True
        with contextlib.suppress(*DIST_ERRORS):  # a peer that is gone needs no goodbye
            bye = self.group.send([torch.ones(1, dtype=torch.uint8)], self._other, BYE_TAG)
            bye.wait(timedelta(seconds=JOIN_TIMEOUT_S))


class OutboundPair:
    """This node's writes to one peer: gloo rank 0, a sender thread that starts the writes in order and a
    completion thread that waits for them in the same order, so that layer L+1 is on its way while L completes."""

    def __init__(
        self,
        node: NodeDescriptor,
        descriptor: bytes,
        key: str,
        store: Any,
        group: Any,
        pool: list[torch.Tensor],
    ) -> None:
        self.node = node
        self.descriptor = descriptor  # as given to connect(), to make reconnecting idempotent
        self.broken: str | None = None  # why writes to this peer fail, once they do
        self._headers_key = f"kv/pair/{key}/headers"
        self._store = store
        self._pool = pool
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        # Writes whose sends are posted: (handle, gloo sends, the tensors sent, kept alive until they complete).
        self._started: queue.SimpleQueue[_Started | None] = queue.SimpleQueue()
        self._seq = 0
        self.link = PairLink(group, 0, node.node_id, self._on_end)
        self._sender = threading.Thread(target=self._send_loop, name=f"kv-send-{node.node_id}", daemon=True)
        self._completer = threading.Thread(
            target=self._complete_loop, name=f"kv-sent-{node.node_id}", daemon=True
        )
        self._sender.start()
        self._completer.start()

    def submit(self, job: Job) -> None:
        if self.broken is not None:
            job.handle.settle(TransferState.FAILED, self.broken)
        else:
            self._jobs.put(job)

    def close(self) -> None:
        self.broken = self.broken or "the connection was closed"
        self.link.close()
        self._jobs.put(None)
        self._sender.join(JOIN_TIMEOUT_S)
        self._completer.join(JOIN_TIMEOUT_S)

    def _on_end(self, reason: str) -> None:
        self.broken = self.broken or f"connection to KV peer {self.node.node_id!r} ended: {reason}"

    def _fail(self, handle: TorchHandle, reason: str) -> None:
        self.broken = self.broken or reason
        handle.settle(TransferState.FAILED, self.broken)

    def _send_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            handle = job.handle
            if self.broken is not None:
                handle.settle(TransferState.FAILED, self.broken)
                continue
            if handle.expire_if_late():  # expired while queued: never sent, so the stream stays in step
                continue
            try:
                payloads, runs = self._payloads(job)
                works = [self.link.group.send([byte_view(p)], 1, DATA_TAG) for p in payloads]
                heads = None if job.heads is None else (job.heads.dst_start, job.heads.count)
                header = WriteHeader(self._seq, handle.layer, tuple(job.dst), runs, job.notify, heads)
                self._store.queue_push(self._headers_key, header.encode())
                self._seq += 1
            except Exception as exc:  # gloo, store or gather errors: the pair is out of step
                self._fail(handle, f"connection to KV peer {handle.peer!r} broke: {exc}")
                continue
            self._started.put((handle, works, payloads))
        self._started.put(None)

    def _complete_loop(self) -> None:
        while (started := self._started.get()) is not None:
            handle, works, _payloads = started
            try:
                for work in works:
                    work.wait(timedelta(seconds=max(handle.deadline - time.monotonic(), 1e-3)))
            except Exception as exc:  # a timeout or a dropped connection: gloo has closed the pair
                self._fail(handle, f"connection to KV peer {handle.peer!r} broke: {exc}")
                continue
            if not handle.settle(TransferState.DONE):  # poll() gave up on it: the stream is out of step
                self.broken = self.broken or f"a write to KV peer {handle.peer!r} outlived its deadline"

    def _payloads(self, job: Job) -> tuple[list[torch.Tensor], tuple[int, ...]]:
        """The tensors to send and the run lengths the header announces (none: one gathered message)."""
        if not job.src:  # an announcement copies nothing
            return [], ()
        kv_layer = self._pool[job.handle.layer]
        if (
            job.heads is not None
        ):  # some heads of each block: one gathered message [n, 2, block_size, count, D]
            index = torch.tensor(job.src, dtype=torch.long, device=kv_layer.device)
            first, count = job.heads.src_start, job.heads.count
            return [kv_layer.index_select(0, index)[:, :, :, first : first + count].contiguous().cpu()], ()
        runs = coalesce_block_pairs(job.src, job.dst)
        num_bytes = len(job.src) * kv_layer[0].numel() * kv_layer.element_size()
        if kv_layer.device.type == "cpu" and (len(runs) == 1 or num_bytes >= MIN_RUN_BYTES * len(runs)):
            slices = [kv_layer[r.src_start : r.src_start + r.length] for r in runs]
            return slices, tuple(r.length for r in runs)
        src_runs = coalesce_block_pairs(job.src, job.src)
        if len(src_runs) == 1:  # a GPU pool's consecutive blocks: copied to host memory in one piece
            blocks = kv_layer[src_runs[0].src_start : src_runs[0].src_start + src_runs[0].length]
        else:
            blocks = gather_blocks(kv_layer, torch.tensor(job.src, dtype=torch.int32, device=kv_layer.device))
        return [blocks.cpu()], ()


@dataclass(slots=True)
class _Landing:
    """A write whose bytes are on their way."""

    header: WriteHeader
    works: list[Any]  # the gloo recvs, in the order the writer sends
    finish: Callable[[], None] | None  # moves staged bytes into the pool once they are all in
    staging: torch.Tensor | None  # the staging buffer to give back, if one was used


class InboundPair:
    """One peer's writes into this node: gloo rank 1, a receiver thread that pops headers and starts each recv, and
    a landing thread that waits for them in order, scatters staged blocks and queues the notifications. Up to
    STAGING_BUFFERS staged writes are in flight, so one layer is scattered while the next arrives."""

    STAGING_BUFFERS = 3

    def __init__(
        self,
        peer: PeerId,
        key: str,
        store: Any,
        group: Any,
        pool: list[torch.Tensor],
        layout: KVLayout,
        transfer_timeout_s: float,
        on_notify: Callable[[PeerId, bytes], None],
        on_end: Callable[[InboundPair], None],
    ) -> None:
        self.peer = peer
        self.key = key
        self.headers_key = f"kv/pair/{key}/headers"
        self._store = store  # this pair's own client: its blocking pops must not hold up other threads
        self._pool = pool
        self._layout = layout
        self._timeout_s = transfer_timeout_s
        self._on_notify = on_notify
        self._on_end = on_end
        self._staging: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(self.STAGING_BUFFERS):
            self._staging.put(torch.empty(0, dtype=torch.uint8))  # grown on first use
        self._landings: queue.SimpleQueue[_Landing | None] = queue.SimpleQueue()
        self._failed = False
        self.link = PairLink(group, 1, peer, lambda reason: on_end(self))
        self._receiver = threading.Thread(target=self._receive_loop, name=f"kv-recv-{peer}", daemon=True)
        self._lander = threading.Thread(target=self._land_loop, name=f"kv-land-{peer}", daemon=True)
        self._receiver.start()
        self._lander.start()

    def join(self, timeout_s: float) -> None:
        self._receiver.join(timeout_s)
        self._lander.join(timeout_s)

    def _receive_loop(self) -> None:
        expected_seq = 0
        try:
            while not self._failed and (raw := self._store.queue_pop(self.headers_key, True)):  # empty: stop
                header = WriteHeader.decode(raw)
                if header.seq != expected_seq:
                    raise ValueError(f"write {header.seq} arrived where {expected_seq} was due")
                expected_seq += 1
                self._landings.put(self._start(header))
        except Exception as exc:  # a dead writer, a malformed header: either way this pair is done
            log.warning("KV writes from %s stopped: %s", self.peer, exc)
        self._landings.put(None)
        self._on_end(self)

    def _start(self, header: WriteHeader) -> _Landing:
        """Validate a header and post its recvs: straight into the pool where the blocks are consecutive (and
        the pool in host memory), otherwise into a staging buffer that finish() moves into the blocks."""
        layout, dst = self._layout, header.dst_blocks
        # The writer's own slice is its business; here the destination's heads must exist.
        heads = None if header.heads is None else HeadSlice(0, *header.heads)
        check_write(layout, layout, header.layer, dst, dst, header.notify, heads)
        if not dst:
            return _Landing(header, [], None, None)
        kv_layer = self._pool[header.layer]
        if heads is not None:
            return self._start_head_slice(header, kv_layer, heads)
        # One gathered message whose destination is consecutive counts as a single run.
        runs = header.runs or ((len(dst),) if len(coalesce_block_pairs(dst, dst)) == 1 else ())
        slices = _run_slices(kv_layer, dst, runs) if runs else None
        if slices is not None and kv_layer.device.type == "cpu":
            return _Landing(header, [self._recv(target) for target in slices], None, None)
        staging, staged = self._staged(
            len(dst) * layout.block_bytes, kv_layer.dtype, (-1, *layout.block_shape)
        )
        if slices is None:  # one gathered message for scattered blocks
            ids = torch.tensor(dst, dtype=torch.int32, device=kv_layer.device)
            works = [self._recv(staged)]

            def finish() -> None:
                scatter_blocks(staged.to(kv_layer.device), kv_layer, ids)

        else:  # a GPU pool: each run's bytes land in host memory first
            segments = list(staged.split([target.shape[0] for target in slices]))
            works = [self._recv(segment) for segment in segments]

            def finish() -> None:
                for target, segment in zip(slices, segments, strict=True):
                    target.copy_(segment)

        return _Landing(header, works, finish, staging)

    def _start_head_slice(self, header: WriteHeader, kv_layer: torch.Tensor, heads: HeadSlice) -> _Landing:
        """A head slice lands in a staging buffer [n, 2, block_size, count, D], then in its heads of each block."""
        layout, dst = self._layout, header.dst_blocks
        shape = (len(dst), 2, layout.block_size, heads.count, layout.head_dim)
        staging, staged = self._staged(layout.write_bytes(len(dst), heads), kv_layer.dtype, shape)
        index = torch.tensor(dst, dtype=torch.long, device=kv_layer.device)
        first = heads.dst_start

        def finish() -> None:
            kv_layer[index, :, :, first : first + heads.count] = staged.to(kv_layer.device)

        return _Landing(header, [self._recv(staged)], finish, staging)

    def _staged(
        self, num_bytes: int, dtype: torch.dtype, shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A staging buffer (grown if short; give it back once landed) and its first num_bytes as `shape`."""
        staging = self._staging.get(timeout=self._timeout_s)
        if staging.numel() < num_bytes:
            staging = torch.empty(num_bytes, dtype=torch.uint8)
        return staging, staging[:num_bytes].view(dtype).view(shape)

    def _recv(self, target: torch.Tensor) -> Any:
        return self.link.group.recv([byte_view(target)], 0, DATA_TAG)

    def _land_loop(self) -> None:
        while (landing := self._landings.get()) is not None:
            if self._failed:
                continue
            header = landing.header
            try:
                for work in landing.works:
                    work.wait(timedelta(seconds=self._timeout_s))
                if landing.finish is not None:
                    landing.finish()
            except Exception as exc:  # the writer died or stalled: gloo has closed the pair
                log.warning("KV writes from %s stopped: %s", self.peer, exc)
                self._failed = True
                self._on_end(self)
                continue
            finally:
                if landing.staging is not None:
                    self._staging.put(landing.staging)
            if header.notify is not None:
                self._on_notify(self.peer, header.notify)


def _run_slices(kv_layer: torch.Tensor, dst: Sequence[int], runs: Sequence[int]) -> list[torch.Tensor]:
    """The pool slices a write's runs land in; ValueError unless the runs split dst into consecutive stretches."""
    if sum(runs) != len(dst) or min(runs) <= 0:
        raise ValueError(f"runs {list(runs)} do not cover {len(dst)} destination blocks")
    slices, offset = [], 0
    for length in runs:
        start = dst[offset]
        if list(dst[offset : offset + length]) != list(range(start, start + length)):
            raise ValueError(f"destination blocks {list(dst[offset : offset + length])} are not consecutive")
        slices.append(kv_layer[start : start + length])
        offset += length
    return slices
