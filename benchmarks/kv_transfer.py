"""KV transfer throughput: a prompt's KV written layer by layer into a second process, against a raw copy.

For each backend, KV size and block pattern, the writer (this process) writes every layer's blocks with one
write_blocks call each into a receiver process, which acknowledges once every layer's notification has arrived. The
baseline is the same number of bytes moved as one contiguous buffer by the backend's library directly, in the same
run: NIXL, one WRITE of a registered buffer; torch, one gloo send/recv of a contiguous tensor. Both are timed from the
first call to the receiver's acknowledgement over a pipe. Prints one JSON line per case; `ratio` is KV throughput
over raw throughput (target >= 0.8).

    python benchmarks/kv_transfer.py [--backends nixl torch] [--sizes-mib 16 64 256 1024] [--patterns scattered]

Patterns: "contiguous" writes blocks 0..n-1 to blocks 0..n-1; "fragmented" n blocks in runs of 8 consecutive ones
at random places of pools twice that size to the same on the other side; "scattered" n random blocks to n other
random blocks (the torch backend must gather and scatter them). A block is 16 tokens x 8 KV heads
x 128 dims in bf16 (64 KiB), as in a Llama-3-8B-shaped model. Memory: about 6x the largest size across both processes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvtransfer import KVLayout, KVTransport, create_transport

PATTERNS = ["contiguous", "fragmented", "scattered"]
BLOCK = dict(block_size=16, num_kv_heads=8, head_dim=128, dtype="bfloat16")
REPLY_TIMEOUT_S = 120.0
# How often the receiver looks for notifications, and the raw NIXL writer for completion (the transport's own
# progress thread checks every 100 us). Much faster polling takes a core from the transfer on a 2-core machine.
POLL_S = 2e-4
FRAGMENT_BLOCKS = 8  # run length of the "fragmented" pattern (512 KiB)


def _layout(size_mib: int, layers: int) -> tuple[KVLayout, int]:
    """The pool layout (twice the blocks needed) and the blocks per layer a size_mib request occupies."""
    probe = KVLayout(num_layers=layers, num_blocks=1, **BLOCK)  # type: ignore[arg-type]
    blocks = max(1, (size_mib << 20) // (layers * probe.block_bytes))
    return KVLayout(num_layers=layers, num_blocks=2 * blocks, **BLOCK), blocks  # type: ignore[arg-type]


def _pool(layout: KVLayout, fill: bool) -> list[torch.Tensor]:
    shape = (layout.num_blocks, *layout.block_shape)
    make = torch.ones if fill else torch.zeros  # zeros: untouched pages, faulted in by the warm-up write
    return [make(shape, dtype=layout.torch_dtype) for _ in range(layout.num_layers)]


# -- raw baselines: the library itself, one contiguous buffer ---------------------------------------------------


class _RawNixl:
    def __init__(self, name: str, num_bytes: int) -> None:
        from nixl._api import nixl_agent, nixl_agent_config

        # Without NIXL's progress thread, which spins a core (the transport runs without it too).
        self.agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
        self.buffer = torch.ones(num_bytes, dtype=torch.uint8)
        self.agent.register_memory(self.buffer)
        self.local = self.agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT", [(self.buffer.data_ptr(), num_bytes, 0)], "DRAM"
        )

    def endpoint(self) -> tuple[bytes, int]:
        return self.agent.get_agent_metadata(), self.buffer.data_ptr()

    def connect(self, endpoint: tuple[bytes, int]) -> None:
        metadata, address = endpoint
        self.peer = self.agent.add_remote_agent(metadata).decode()
        self.remote = self.agent.prep_xfer_dlist(self.peer, [(address, self.buffer.numel(), 0)], "DRAM")

    def send(self) -> None:
        # NIXL sends the notification once the writer sees the write complete: poll until then.
        xfer = self.agent.make_prepped_xfer("WRITE", self.local, [0], self.remote, [0], b"raw")
        state = self.agent.transfer(xfer)
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while state == "PROC" and time.monotonic() < deadline:
            time.sleep(POLL_S)
            state = self.agent.check_xfer_state(xfer)
        xfer.release()
        if state != "DONE":
            raise RuntimeError(f"raw NIXL write ended {state}")

    def finish_send(self) -> None:
        pass

    def receive(self, conn: Connection) -> None:
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        conn.send("ready")
        while time.monotonic() < deadline:
            if any(b"raw" in messages for messages in self.agent.get_new_notifs().values()):
                return
            time.sleep(POLL_S)
        raise TimeoutError("raw NIXL write did not arrive")


class _RawGloo:
    def __init__(self, num_bytes: int) -> None:
        self.buffer = torch.ones(num_bytes, dtype=torch.uint8)

    def host(self) -> int:
        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        return int(self.store.port)

    def join(self, port: int | None, rank: int) -> None:
        store = self.store if port is None else dist.TCPStore("127.0.0.1", port, is_master=False)
        self.group: Any = dist.ProcessGroupGloo(
            dist.PrefixStore("raw", store), rank, 2, timedelta(seconds=60)
        )

    def send(self) -> None:
        self.pending = self.group.send([self.buffer], 1, 0)

    def finish_send(self) -> None:
        self.pending.wait()

    def receive(self, conn: Connection) -> None:
        work = self.group.recv([self.buffer], 0, 0)
        conn.send("ready")
        work.wait()


# -- the receiver process ---------------------------------------------------------------------------------------


def _receiver_main(conn: Connection) -> None:
    torch.set_num_threads(1)
    transport: KVTransport | None = None
    raw: Any = None
    pool: list[torch.Tensor] = []
    while conn.poll(600):
        command, *args = conn.recv()
        if command == "setup":
            backend, layout_json, raw_bytes = args
            if transport is not None:
                transport.close()
            layout = KVLayout.from_json(layout_json)
            transport = create_transport(backend, "bench-decode")
            pool = _pool(layout, fill=False)
            transport.register(pool)
            raw = _RawNixl("bench-raw-decode", raw_bytes) if backend == "nixl" else _RawGloo(raw_bytes)
            raw_endpoint = raw.endpoint() if backend == "nixl" else raw.host()
            conn.send((transport.local_descriptor(), raw_endpoint))
            if backend == "torch":
                raw.join(None, 1)
        elif command == "collect":
            assert transport is not None
            (count,) = args
            received = 0
            deadline = time.monotonic() + REPLY_TIMEOUT_S
            while received < count and time.monotonic() < deadline:
                received += len(transport.notifications())
                if received < count:
                    time.sleep(POLL_S)
            conn.send(received)
        elif command == "raw":
            raw.receive(conn)
            conn.send("done")
        elif command == "stop":
            break
    if transport is not None:
        transport.close()


def _reply(conn: Connection) -> Any:
    if not conn.poll(REPLY_TIMEOUT_S):
        raise TimeoutError("the receiver process did not answer")
    return conn.recv()


# -- the writer (this process) ----------------------------------------------------------------------------------


def _time_kv(
    sender: KVTransport, conn: Connection, peer: Any, plan: list[tuple[list[int], list[int]]]
) -> float:
    started = time.perf_counter()
    handles = [
        sender.write_blocks(peer, layer, src, dst, b"L%d" % layer) for layer, (src, dst) in enumerate(plan)
    ]
    conn.send(("collect", len(plan)))
    received = _reply(conn)
    elapsed = time.perf_counter() - started
    if received != len(plan) or not sender.wait(handles, timeout_s=REPLY_TIMEOUT_S):
        raise RuntimeError(
            f"KV writes failed: {received}/{len(plan)} notifications, {[h.error for h in handles]}"
        )
    return elapsed


def _time_raw(raw: Any, conn: Connection) -> float:
    conn.send(("raw",))
    if _reply(conn) != "ready":
        raise RuntimeError("raw receiver not ready")
    started = time.perf_counter()
    raw.send()
    if _reply(conn) != "done":
        raise RuntimeError("raw transfer failed")
    elapsed = time.perf_counter() - started
    raw.finish_send()
    return elapsed


def _plan(layout: KVLayout, blocks: int, pattern: str, seed: int) -> list[tuple[list[int], list[int]]]:
    if pattern == "contiguous":
        return [(list(range(blocks)), list(range(blocks)))] * layout.num_layers
    run = FRAGMENT_BLOCKS if pattern == "fragmented" else 1
    generator = torch.Generator().manual_seed(seed)

    def pick() -> list[
        int
    ]:  # `blocks` blocks of the pool, in runs of `run` consecutive ones at random places
        starts = torch.randperm(layout.num_blocks // run, generator=generator)[: -(-blocks // run)] * run
        return [int(start) + i for start in starts for i in range(run)][:blocks]

    return [(pick(), pick()) for _ in range(layout.num_layers)]


def run_case(backend: str, size_mib: int, args: argparse.Namespace, conn: Connection) -> None:
    layout, blocks = _layout(size_mib, args.layers)
    kv_bytes = layout.num_layers * blocks * layout.block_bytes
    conn.send(("setup", backend, layout.to_json(), kv_bytes))
    descriptor, raw_endpoint = _reply(conn)
    sender = create_transport(backend, "bench-prefill")
    try:
        sender.register(_pool(layout, fill=True))
        peer = sender.connect(descriptor)
        if backend == "nixl":
            raw: Any = _RawNixl("bench-raw-prefill", kv_bytes)
            raw.connect(raw_endpoint)
        else:
            raw = _RawGloo(kv_bytes)
            raw.join(raw_endpoint, 0)
        for pattern in args.patterns:
            plan = _plan(layout, blocks, pattern, seed=size_mib)
            _time_kv(sender, conn, peer, plan)  # warm-up: connections, page faults on both sides
            _time_raw(raw, conn)
            kv_s, raw_s = [], []
            for _ in range(args.repeats):  # alternated, so that both see the same machine noise
                kv_s.append(_time_kv(sender, conn, peer, plan))
                raw_s.append(_time_raw(raw, conn))
            kv_rate = kv_bytes / statistics.median(kv_s) / 1e9
            raw_rate = kv_bytes / statistics.median(raw_s) / 1e9
            print(
                json.dumps(
                    {
                        "backend": backend,
                        "pattern": pattern,
                        "kv_mib": round(kv_bytes / 2**20, 1),
                        "layers": layout.num_layers,
                        "blocks_per_layer": blocks,
                        "kv_gb_per_s": round(kv_rate, 3),
                        "raw_gb_per_s": round(raw_rate, 3),
                        "ratio": round(kv_rate / raw_rate, 3),
                        "kv_best_gb_per_s": round(kv_bytes / min(kv_s) / 1e9, 3),
                        "raw_best_gb_per_s": round(kv_bytes / min(raw_s) / 1e9, 3),
                    }
                ),
                flush=True,
            )
    finally:
        sender.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", nargs="+", default=["nixl", "torch"], choices=["nixl", "torch"])
    parser.add_argument(
        "--sizes-mib", nargs="+", type=int, default=[16, 64, 256], help="KV per request (max 1024)"
    )
    parser.add_argument("--patterns", nargs="+", default=PATTERNS, choices=["contiguous", "scattered"])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # writer and receiver share the machine's cores
    torch.set_num_threads(1)
    context = mp.get_context("spawn")
    conn, child_conn = context.Pipe()
    receiver = context.Process(target=_receiver_main, args=(child_conn,), daemon=True)
    receiver.start()
    try:
        for backend in args.backends:
            for size in args.sizes_mib:
                run_case(backend, size, args, conn)
    finally:
        conn.send(("stop",))
        receiver.join(30)
        if receiver.is_alive():
            receiver.kill()


if __name__ == "__main__":
    main()
