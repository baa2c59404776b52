"""The KV pool as bytes (KVLayout), block-run coalescing, descriptors, and the transport contract's pure helpers."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import pytest
import torch

from kvtransfer import (
    BlockRun,
    HeadSlice,
    KVLayout,
    KVTransport,
    PeerId,
    TransferError,
    TransferHandle,
    TransferState,
    TransferTimeout,
    coalesce_block_pairs,
    create_transport,
)
from kvtransfer.base import check_write
from kvtransfer.descriptor import NodeDescriptor, check_peer

LAYOUT = KVLayout(num_layers=4, num_blocks=10, block_size=16, num_kv_heads=2, head_dim=64, dtype="bfloat16")


def test_block_and_layer_bytes_follow_the_pool_shape() -> None:
    assert LAYOUT.block_bytes == 2 * 16 * 2 * 64 * 2
    assert LAYOUT.layer_bytes == 10 * LAYOUT.block_bytes
    assert LAYOUT.total_bytes == 4 * LAYOUT.layer_bytes
    assert LAYOUT.block_shape == (2, 16, 2, 64)
    assert LAYOUT.torch_dtype is torch.bfloat16


def test_byte_range_is_the_blocks_slice_of_its_layer_tensor() -> None:
    pool = torch.arange(10 * 2 * 16 * 2 * 64, dtype=torch.float32).reshape(10, 2, 16, 2, 64)
    kv = KVLayout.from_kv_layers([pool])
    raw = pool.view(torch.uint8).reshape(-1)
    for block in (0, 3, 9):
        offset, length = kv.byte_range(0, block)
        assert (offset, length) == (block * kv.block_bytes, kv.block_bytes)
        assert torch.equal(raw[offset : offset + length], pool[block].reshape(-1).view(torch.uint8))
    with pytest.raises(ValueError, match="block 10 is out of range"):
        kv.byte_range(0, 10)
    with pytest.raises(ValueError, match="layer 1 is out of range"):
        kv.byte_range(1, 0)


def test_from_kv_layers_reads_the_engine_pool_and_rejects_malformed_ones() -> None:
    layers = [torch.zeros(7, 2, 8, 4, 32, dtype=torch.float16) for _ in range(3)]
    assert KVLayout.from_kv_layers(layers) == KVLayout(3, 7, 8, 4, 32, "float16")
    with pytest.raises(ValueError, match="no layers"):
        KVLayout.from_kv_layers([])
    with pytest.raises(ValueError, match="all layers must match"):
        KVLayout.from_kv_layers([layers[0], torch.zeros(6, 2, 8, 4, 32, dtype=torch.float16)])
    with pytest.raises(ValueError, match="not contiguous"):
        KVLayout.from_kv_layers([torch.zeros(2, 7, 8, 4, 32, dtype=torch.float16).transpose(0, 1)])
    with pytest.raises(ValueError, match="shape"):
        KVLayout.from_kv_layers([torch.zeros(7, 3, 8, 4, 32)])
    with pytest.raises(ValueError, match="dtype"):
        KVLayout.from_kv_layers([torch.zeros(7, 2, 8, 4, 32, dtype=torch.int8)])


@pytest.mark.parametrize(
    ("field", "value"), [("num_layers", 0), ("block_size", -16), ("head_dim", 1.5), ("dtype", "int8")]
)
def test_invalid_layouts_are_refused(field: str, value: object) -> None:
    fields = dict(num_layers=4, num_blocks=10, block_size=16, num_kv_heads=2, head_dim=64, dtype="float32")
    with pytest.raises(ValueError, match=field):
        KVLayout(**{**fields, field: value})  # type: ignore[arg-type]


def test_pools_that_differ_only_in_block_count_are_compatible() -> None:
    bigger = KVLayout(4, 500, 16, 2, 64, "bfloat16")
    assert LAYOUT.compatible_with(bigger) is None
    other = KVLayout(4, 10, 32, 2, 128, "float32")
    reason = LAYOUT.compatible_with(other)
    assert reason is not None
    for detail in ("block_size 16 here vs 32", "head_dim 64 here vs 128", "dtype bfloat16 here vs float32"):
        assert detail in reason
    assert "num_layers" not in reason and "num_kv_heads" not in reason


def test_layout_json_round_trips_and_rejects_garbage() -> None:
    assert KVLayout.from_json(LAYOUT.to_json()) == LAYOUT
    assert KVLayout.from_bytes(LAYOUT.to_bytes()) == LAYOUT
    with pytest.raises(ValueError, match="JSON"):
        KVLayout.from_json("{")
    with pytest.raises(ValueError, match="keys"):
        KVLayout.from_json('{"num_layers": 4}')


@pytest.mark.parametrize(
    ("src", "dst", "runs"),
    [
        ([], [], []),
        ([4, 5, 6, 9], [0, 1, 2, 3], [BlockRun(4, 0, 3), BlockRun(9, 3, 1)]),
        ([0, 1, 2, 3], [8, 9, 3, 4], [BlockRun(0, 8, 2), BlockRun(2, 3, 2)]),
        ([3, 2, 1], [0, 1, 2], [BlockRun(3, 0, 1), BlockRun(2, 1, 1), BlockRun(1, 2, 1)]),
        ([7], [7], [BlockRun(7, 7, 1)]),
    ],
)
def test_coalescing_merges_pairs_consecutive_on_both_sides(
    src: list[int], dst: list[int], runs: list[BlockRun]
) -> None:
    assert coalesce_block_pairs(src, dst) == runs
    expanded = [(r.src_start + i, r.dst_start + i) for r in runs for i in range(r.length)]
    assert expanded == list(zip(src, dst, strict=True))


def test_coalescing_needs_as_many_sources_as_destinations() -> None:
    with pytest.raises(ValueError, match="2 source blocks but 1"):
        coalesce_block_pairs([1, 2], [3])


def test_descriptors_round_trip_and_malformed_ones_are_transfer_errors() -> None:
    descriptor = NodeDescriptor(
        "nixl",
        "decode-3",
        LAYOUT,
        "cuda",
        layer_addresses=(1 << 40, 2 << 40),
        device_index=1,
        agent_metadata=b"\0md",
    )
    assert NodeDescriptor.from_bytes(descriptor.to_bytes()) == descriptor
    for garbage in (b"", b"SSKV", b"XXXX\x01\x00\x00\x00\x02{}", descriptor.to_bytes()[:20]):
        with pytest.raises(TransferError):
            NodeDescriptor.from_bytes(garbage)


def test_a_peer_must_share_the_backend_and_layout_and_not_be_this_node() -> None:
    peer = NodeDescriptor("torch", "decode-0", KVLayout(4, 99, 16, 2, 64, "bfloat16"), "cpu", endpoint="h:1")
    check_peer(peer, "torch", "prefill-0", LAYOUT)
    with pytest.raises(TransferError, match="uses the 'torch' KV transport"):
        check_peer(peer, "nixl", "prefill-0", LAYOUT)
    with pytest.raises(TransferError, match="itself"):
        check_peer(peer, "torch", "decode-0", LAYOUT)
    with pytest.raises(TransferError, match="num_kv_heads 4 here vs 2"):
        check_peer(peer, "torch", "prefill-0", KVLayout(4, 10, 16, 4, 64, "bfloat16"))


def test_write_arguments_are_checked_against_both_pools() -> None:
    peer = KVLayout(4, 20, 16, 2, 64, "bfloat16")
    assert check_write(LAYOUT, peer, 3, [9, 0], [19, 5], b"r1/l3") == ([9, 0], [19, 5])
    for layer, src, dst, notify, problem in [
        (4, [0], [0], None, "layer"),
        (True, [0], [0], None, "layer"),
        (0, [10], [0], None, "source block 10"),
        (0, [0], [20], None, "destination block 20"),
        (0, [0], [-1], None, "destination block -1"),
        (0, [0.0], [0], None, "not an integer"),
        (0, [0, 1], [5, 5], None, "repeat"),
        (0, [0], [0], b"", "notify"),
        (0, [0], [0], b"x" * 5000, "at most 4096"),
    ]:
        with pytest.raises(ValueError, match=problem):
            check_write(LAYOUT, peer, layer, src, dst, notify)  # type: ignore[arg-type]


def test_head_slices_may_join_pools_of_different_kv_heads_and_must_fit_both() -> None:
    two = dataclasses.replace(LAYOUT, num_kv_heads=2)
    four = dataclasses.replace(LAYOUT, num_kv_heads=4, num_blocks=3)
    assert "num_kv_heads 2 here vs 4" in (two.compatible_with(four) or "")
    assert two.compatible_with(four, head_slices=True) is None
    assert "head_dim" in (two.compatible_with(dataclasses.replace(four, head_dim=2), head_slices=True) or "")
    assert check_write(two, four, 0, [1], [2], None, HeadSlice(1, 3, 1)) == ([1], [2])
    for heads, problem in [
        (HeadSlice(0, 3, 2), "destination heads 3"),
        (HeadSlice(2, 0, 1), "source heads 2"),
        (HeadSlice(0, 0, 0), "positive count"),
        (None, "write a HeadSlice"),
    ]:
        with pytest.raises(ValueError, match=problem):
            check_write(two, four, 0, [1], [2], None, heads)
    assert HeadSlice(0, 0, 1).bytes_per_block(two) == two.block_bytes // 2


class _ScriptedTransport(KVTransport):
    """Settles each handle after a given number of polls; only what wait() needs."""

    name = "scripted"

    def __init__(self, outcomes: dict[int, tuple[int, TransferState]]) -> None:
        self.outcomes = outcomes  # layer -> (polls until settled, final state)
        self.polls = 0

    def poll(self, handle: TransferHandle) -> TransferState:
        self.polls += 1
        after, state = self.outcomes[handle.layer]
        if handle.state is TransferState.PENDING and self.polls >= after:
            handle.settle(state, None if state is TransferState.DONE else "scripted failure")
        handle.expire_if_late()
        return handle.state

    def register(self, kv_layers: list[torch.Tensor]) -> None: ...
    def local_descriptor(self) -> bytes:
        return b""

    def connect(self, peer_descriptor: bytes, head_slices: bool = False) -> PeerId:
        return PeerId("peer")

    def write_blocks(
        self,
        peer: PeerId,
        layer: int,
        src: Sequence[int],
        dst: Sequence[int],
        notify: bytes | None = None,
        heads: HeadSlice | None = None,
    ) -> TransferHandle:
        raise NotImplementedError

    def notifications(self) -> list[tuple[PeerId, bytes]]:
        return []

    def close(self) -> None: ...


def _handle(layer: int, deadline_s: float = 60.0) -> TransferHandle:
    now = time.monotonic()
    return TransferHandle(PeerId("peer"), layer, 0, now + deadline_s, started=now)


def test_wait_reports_all_done_or_any_failed() -> None:
    done = _ScriptedTransport({0: (3, TransferState.DONE), 1: (5, TransferState.DONE)})
    assert done.wait([_handle(0), _handle(1)], timeout_s=5) is True
    failed = _ScriptedTransport({0: (2, TransferState.DONE), 1: (4, TransferState.FAILED)})
    handles = [_handle(0), _handle(1)]
    assert failed.wait(handles, timeout_s=5) is False
    assert [h.state for h in handles] == [TransferState.DONE, TransferState.FAILED]
    assert _ScriptedTransport({}).wait([], timeout_s=0) is True


def test_wait_gives_up_at_its_timeout_and_handles_expire_at_their_deadline() -> None:
    never = _ScriptedTransport({0: (10**9, TransferState.DONE)})
    started = time.monotonic()
    with pytest.raises(TransferTimeout, match="1 KV write"):
        never.wait([_handle(0)], timeout_s=0.2)
    assert 0.2 <= time.monotonic() - started < 1.0

    late = _handle(0, deadline_s=0.1)
    assert never.wait([late], timeout_s=5) is False
    assert late.state is TransferState.FAILED and late.error is not None and "deadline" in late.error


def test_a_settled_handle_stays_settled() -> None:
    handle = _handle(0)
    assert handle.settle(TransferState.DONE)
    assert not handle.settle(TransferState.FAILED, "too late")
    assert handle.state is TransferState.DONE and handle.error is None


def test_unknown_backends_are_named() -> None:
    with pytest.raises(ValueError, match=r"unknown KV transport 'rdma'; choose one of \['nixl', 'torch'\]"):
        create_transport("rdma", "node-0")
