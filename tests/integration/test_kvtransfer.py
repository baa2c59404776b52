"""KV transports between real processes on 127.0.0.1, for each backend.

The test process is the prefill node (it writes); a spawned process is the decode node: it registers a zeroed pool
with a different number of blocks, publishes its descriptor and, on request, reports the notifications it received
and a copy of its pool. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import pytest
import torch

from kvtransfer import (
    HeadSlice,
    KVLayout,
    KVTransport,
    PeerId,
    TransferError,
    TransferState,
    create_transport,
)
from kvtransfer.descriptor import NodeDescriptor


def _nixl_missing() -> str | None:
    try:
        import nixl  # noqa: F401
    except ImportError as exc:
        return f"nixl is not installed ({exc}); pip install nixl"
    return None


BACKENDS = [
    "torch",
    pytest.param("nixl", marks=pytest.mark.skipif(_nixl_missing() is not None, reason=str(_nixl_missing()))),
]
SENDER_LAYOUT = dict(num_layers=4, num_blocks=10, block_size=4, num_kv_heads=2, head_dim=8)
RECEIVER_BLOCKS = 12
START_TIMEOUT_S = 60.0  # a fresh interpreter importing torch (and NIXL) on a busy 2-core machine


def layout(dtype: str = "float32", **changes: int) -> KVLayout:
    return KVLayout(**{**SENDER_LAYOUT, **changes}, dtype=dtype)


def pool_for(kv: KVLayout, seed: int | None = None) -> list[torch.Tensor]:
    """A pool of random values (distinct per block), or zeros without a seed."""
    shape = (kv.num_blocks, *kv.block_shape)
    if seed is None:
        return [torch.zeros(shape, dtype=kv.torch_dtype) for _ in range(kv.num_layers)]
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(kv.torch_dtype) for _ in range(kv.num_layers)]


# -- the decode node, in its own process ------------------------------------------------------------------------


def _decode_node_main(
    conn: Connection, backend: str, node_id: str, layout_json: str, options: dict[str, Any]
) -> None:
    torch.set_num_threads(1)
    kv = KVLayout.from_json(layout_json)
    transport = create_transport(backend, node_id, **options)
    pool = pool_for(kv)
    transport.register(pool)
    conn.send(transport.local_descriptor())
    while conn.poll(120):  # the test process went away if it says nothing for this long
        command, *args = conn.recv()
        if command == "collect":
            count, timeout_s = args
            received: list[tuple[str, bytes]] = []
            deadline = time.monotonic() + timeout_s
            while len(received) < count and time.monotonic() < deadline:
                received += transport.notifications()
                time.sleep(0.002)
            time.sleep(0.1)  # anything beyond `count` would be a bug: give it a chance to show up
            received += transport.notifications()
            conn.send(
                ([(str(peer), payload) for peer, payload in received], [layer.clone() for layer in pool])
            )
        elif command == "close":
            started = time.monotonic()
            transport.close()
            transport.close()
            conn.send(time.monotonic() - started)
            return


@dataclass
class DecodeNode:
    process: BaseProcess
    conn: Connection
    descriptor: bytes

    def collect(
        self, count: int, timeout_s: float = 10.0
    ) -> tuple[list[tuple[str, bytes]], list[torch.Tensor]]:
        """Wait (bounded) until the node has `count` notifications; returns them and a copy of its pool."""
        self.conn.send(("collect", count, timeout_s))
        assert self.conn.poll(timeout_s + 30), "the decode node did not answer"
        received, pool = self.conn.recv()
        return received, pool

    def close(self) -> float:
        """Close its transport; returns how long that took there."""
        self.conn.send(("close",))
        assert self.conn.poll(30), "the decode node did not close"
        seconds: float = self.conn.recv()
        return seconds


@contextlib.contextmanager
def decode_node(
    backend: str, kv: KVLayout, node_id: str = "decode-0", **options: Any
) -> Iterator[DecodeNode]:
    context = mp.get_context("spawn")
    conn, child_conn = context.Pipe()
    process = context.Process(
        target=_decode_node_main, args=(child_conn, backend, node_id, kv.to_json(), options), daemon=True
    )
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # two processes share two cores
    try:
        process.start()
    finally:
        if threads is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = threads
    try:
        assert conn.poll(START_TIMEOUT_S), "the decode node did not start"
        yield DecodeNode(process, conn, conn.recv())
    finally:
        if process.is_alive():
            with contextlib.suppress(OSError):
                os.kill(process.pid or 0, signal.SIGCONT)
            process.kill()
        process.join(10)
        conn.close()


@contextlib.contextmanager
def transport(backend: str, node_id: str = "prefill-0", **options: Any) -> Iterator[KVTransport]:
    created = create_transport(backend, node_id, **options)
    try:
        yield created
    finally:
        created.close()


# -- tests ------------------------------------------------------------------------------------------------------

# (src blocks, dst blocks, notify) per write: consecutive on both sides, only on the destination, only on the source,
# on neither (without a notification), then an announcement that copies nothing.
WRITES: list[tuple[int, list[int], list[int], bytes | None]] = [
    (0, [2, 3, 4], [7, 8, 9], b"req-7/layer-0"),
    (1, [5, 1, 8], [0, 1, 2], b"req-7/layer-1"),
    (2, [0, 1, 2], [11, 4, 6], b"req-7/layer-2"),
    (3, [9, 0], [3, 10], None),
    (0, [], [], b"req-7/done"),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_by_layer_writes_land_in_the_destination_blocks_only(backend: str, dtype: str) -> None:
    sender_layout = layout(dtype)
    source = pool_for(sender_layout, seed=1)
    with (
        decode_node(backend, layout(dtype, num_blocks=RECEIVER_BLOCKS)) as node,
        transport(backend) as sender,
    ):
        sender.register(source)
        peer = sender.connect(node.descriptor)
        assert peer == "decode-0"
        assert sender.connect(node.descriptor) == peer  # idempotent
        handles = [sender.write_blocks(peer, layer, src, dst, notify) for layer, src, dst, notify in WRITES]
        assert sender.wait(handles, timeout_s=20), [h.error for h in handles]
        assert [sender.poll(h) for h in handles] == [TransferState.DONE] * len(handles)

        received, pool = node.collect(count=4)
        # One notification per announced write; no order across writes is promised.
        assert sorted(received) == sorted(
            ("prefill-0", notify) for _, _, _, notify in WRITES if notify is not None
        )
        for layer in range(sender_layout.num_layers):
            written = {
                dst: src
                for lyr, srcs, dsts, _ in WRITES
                if lyr == layer
                for src, dst in zip(srcs, dsts, strict=True)
            }
            for block in range(RECEIVER_BLOCKS):
                if block in written:
                    assert torch.equal(pool[layer][block], source[layer][written[block]]), (layer, block)
                else:
                    assert not pool[layer][block].any(), f"layer {layer} block {block} was written"
        assert node.close() < 5.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_writes_to_a_dead_peer_fail_within_the_deadline_and_a_restarted_peer_works(backend: str) -> None:
    kv = layout()
    source = pool_for(kv, seed=2)
    receiver_layout = layout(num_blocks=RECEIVER_BLOCKS)
    with transport(backend, transfer_timeout_s=3.0, **_connect_options(backend)) as sender:
        sender.register(source)
        with decode_node(backend, receiver_layout) as node:
            peer = sender.connect(node.descriptor)
            assert sender.wait([sender.write_blocks(peer, 0, [1], [1], b"first")], timeout_s=10)
            node.collect(count=1)
            node.process.kill()
            node.process.join(10)
            started = time.monotonic()
            handles = [sender.write_blocks(peer, layer, [1, 2], [5, 6], b"lost") for layer in range(3)]
            assert sender.wait(handles, timeout_s=10) is False
            assert time.monotonic() - started < 3.0 + 2.0
            assert all(h.state is TransferState.FAILED and h.error for h in handles)
            with pytest.raises(TransferError):  # it is gone: connecting again reports it
                sender.connect(node.descriptor)

        with decode_node(backend, receiver_layout) as restarted:  # same node id, new descriptor
            assert sender.connect(restarted.descriptor) == peer
            assert sender.wait([sender.write_blocks(peer, 2, [3], [4], b"again")], timeout_s=10)
            received, pool = restarted.collect(count=1)
            assert received == [("prefill-0", b"again")]
            assert torch.equal(pool[2][4], source[2][3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stalled_peer_cannot_hang_the_writer(backend: str) -> None:
    # One 32 MiB write, far more than loopback socket buffers hold, into a peer that is stopped (SIGSTOP).
    kv = KVLayout(num_layers=1, num_blocks=256, block_size=16, num_kv_heads=8, head_dim=128, dtype="float32")
    with decode_node(backend, kv) as node, transport(backend, transfer_timeout_s=2.0) as sender:
        sender.register(pool_for(kv, seed=3))
        peer = sender.connect(node.descriptor)
        os.kill(node.process.pid or 0, signal.SIGSTOP)
        started = time.monotonic()
        handle = sender.write_blocks(peer, 0, list(range(256)), list(range(256)), b"big")
        with contextlib.suppress(TransferError):
            sender.wait([handle], timeout_s=6.0)
        assert handle.state is TransferState.FAILED, handle.error
        assert time.monotonic() - started < 2.0 + 2.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_slices_land_in_their_heads_of_the_destination_blocks_only(backend: str) -> None:
    """Tensor-parallel ranks of different degrees: a sender with 1 KV head writes it into head 1 of a receiver with
    2 (HeadSlice), and a sender with 2 writes its head 1 into a receiver's head 0; the other heads stay zero.
    Whole-block writes between them are refused, and so is a connect that does not ask for head slices."""
    one_head, two_heads = layout(num_kv_heads=1), layout(num_kv_heads=2)
    source = pool_for(one_head, seed=3)
    with (
        decode_node(backend, layout(num_kv_heads=2, num_blocks=RECEIVER_BLOCKS)) as node,
        transport(backend) as sender,
    ):
        sender.register(source)
        with pytest.raises(TransferError, match="num_kv_heads 1 here vs 2"):
            sender.connect(node.descriptor)
        peer = sender.connect(node.descriptor, head_slices=True)
        with pytest.raises(ValueError, match="HeadSlice"):
            sender.write_blocks(peer, 0, [0], [0])
        with pytest.raises(ValueError, match="destination heads 2"):
            sender.write_blocks(peer, 0, [0], [0], heads=HeadSlice(0, 2, 1))
        handles = [
            sender.write_blocks(peer, 0, [2, 3, 4], [7, 8, 9], heads=HeadSlice(0, 1, 1)),  # consecutive
            sender.write_blocks(peer, 3, [9, 0], [3, 10], b"sliced", HeadSlice(0, 1, 1)),  # scattered
        ]
        assert sender.wait(handles, timeout_s=10.0)
        block_bytes = 2 * one_head.block_size * one_head.head_dim * 4
        assert [h.num_bytes for h in handles] == [3 * block_bytes, 2 * block_bytes]
        received, pool = node.collect(1)
        assert received == [("prefill-0", b"sliced")]
        want = pool_for(layout(num_kv_heads=2, num_blocks=RECEIVER_BLOCKS))
        for layer, src, dst in [(0, [2, 3, 4], [7, 8, 9]), (3, [9, 0], [3, 10])]:
            want[layer][dst, :, :, 1:2] = source[layer][src]
        for layer in range(one_head.num_layers):
            assert torch.equal(pool[layer], want[layer]), f"layer {layer}"
    wide = pool_for(two_heads, seed=5)
    with (
        decode_node(backend, layout(num_kv_heads=1, num_blocks=RECEIVER_BLOCKS), "decode-1") as node,
        transport(backend, "prefill-1") as sender,
    ):
        sender.register(wide)
        peer = sender.connect(node.descriptor, head_slices=True)
        assert sender.wait([sender.write_blocks(peer, 1, [5, 1], [0, 11], b"one", HeadSlice(1, 0, 1))], 10.0)
        _, pool = node.collect(1)
        assert torch.equal(pool[1][[0, 11]], wide[1][[5, 1]][:, :, :, 1:2])
        assert not pool[1][1:11].any() and not pool[0].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_incompatible_layouts_and_foreign_descriptors_are_refused_at_connect(backend: str) -> None:
    with transport(backend, "prefill-0") as sender, transport(backend, "decode-0") as receiver:
        sender.register(pool_for(layout()))
        receiver.register(pool_for(layout(head_dim=16, num_blocks=RECEIVER_BLOCKS)))
        with pytest.raises(TransferError, match="head_dim 8 here vs 16 at the peer"):
            sender.connect(receiver.local_descriptor())
        foreign = NodeDescriptor("another-backend", "decode-1", layout(), "cpu").to_bytes()
        with pytest.raises(TransferError, match="another-backend"):
            sender.connect(foreign)
        with pytest.raises(TransferError, match=r"malformed|descriptor"):
            sender.connect(b"not a descriptor")
        with pytest.raises(TransferError, match="not connected"):
            sender.write_blocks(PeerId("decode-0"), 0, [0], [0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_write_arguments_are_caller_errors(backend: str) -> None:
    with decode_node(backend, layout(num_blocks=RECEIVER_BLOCKS)) as node, transport(backend) as sender:
        sender.register(pool_for(layout(), seed=4))
        peer = sender.connect(node.descriptor)
        for layer, src, dst, notify, problem in [
            (4, [0], [0], None, "layer"),
            (0, [10], [0], None, "source block 10"),
            (0, [0], [12], None, "destination block 12"),
            (0, [0, 1], [3], None, "2 source blocks but 1"),
            (0, [0, 1], [3, 3], None, "repeat"),
            (0, [0], [0], b"", "notify"),
        ]:
            with pytest.raises(ValueError, match=problem):
                sender.write_blocks(peer, layer, src, dst, notify)
    with pytest.raises(TransferError, match="closed"):
        sender.write_blocks(peer, 0, [0], [0])


def _connect_options(backend: str) -> dict[str, Any]:
    return {"connect_timeout_s": 2.0} if backend == "torch" else {}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_receiver_that_closes_fails_later_writes_without_waiting_for_their_deadline(backend: str) -> None:
    with (
        decode_node(backend, layout(num_blocks=RECEIVER_BLOCKS)) as node,
        transport(backend, transfer_timeout_s=20.0) as sender,
    ):
        sender.register(pool_for(layout(), seed=5))
        peer = sender.connect(node.descriptor)
        assert sender.wait([sender.write_blocks(peer, 1, [0, 1], [0, 1], b"before")], timeout_s=10)
        assert node.close() < 5.0  # its process lives on
        started = time.monotonic()
        handle = sender.write_blocks(peer, 1, [2], [2], b"after")
        assert sender.wait([handle], timeout_s=10) is False, handle.error
        assert time.monotonic() - started < 5.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_big_blocks_in_long_runs_and_scattered_land_exactly(backend: str) -> None:
    # 128 KiB blocks: two-block runs are long enough for the torch backend to send run by run without copies,
    # single blocks are gathered and scattered.
    big = dict(num_layers=2, block_size=16, num_kv_heads=8, head_dim=128)
    writes = [
        (0, [0, 1, 5, 6], [8, 9, 2, 3]),
        (0, [2, 3, 4, 9], [4, 5, 6, 11]),
        (1, [1, 3, 5, 7], [0, 2, 4, 6]),
    ]
    source = pool_for(KVLayout(**big, num_blocks=10, dtype="float32"), seed=6)
    with (
        decode_node(backend, KVLayout(**big, num_blocks=12, dtype="float32")) as node,
        transport(backend) as sender,
    ):
        sender.register(source)
        peer = sender.connect(node.descriptor)
        handles = [
            sender.write_blocks(peer, layer, src, dst, b"w%d" % i)
            for i, (layer, src, dst) in enumerate(writes)
        ]
        assert sender.wait(handles, timeout_s=20), [h.error for h in handles]
        received, pool = node.collect(count=len(writes))
        assert sorted(payload for _, payload in received) == [b"w0", b"w1", b"w2"]
        for layer, srcs, dsts in writes:
            for src, dst in zip(srcs, dsts, strict=True):
                assert torch.equal(pool[layer][dst], source[layer][src]), (layer, src, dst)
        written = {(layer, dst) for layer, _, dsts in writes for dst in dsts}
        assert all(not pool[lyr][b].any() for lyr in range(2) for b in range(12) if (lyr, b) not in written)
