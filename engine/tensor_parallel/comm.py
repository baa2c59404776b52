"""The collectives a tensor-parallel model needs, over one gloo process group of its own.

Its own group, not torch.distributed's default one: a node's KV transport builds gloo groups too (kvtransfer), and
nothing here may depend on, or disturb, process-global state. Every collective waits at most `timeout_s`: a rank that
died or hangs makes the others raise (CollectiveFailed), never wait forever. Tensors on a GPU are staged through host
memory: correct on any device, fast on none; NCCL (one GPU per rank) is the faster path still to build.
"""

from __future__ import annotations

import pickle
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

DIST_ERRORS = (RuntimeError, dist.DistError)


class CollectiveFailed(RuntimeError):
    """A collective did not complete: another rank is gone, or did not join in time."""


class TPComm:
    def __init__(
        self, store: Any, rank: int, world: int, timeout_s: float, host: str = "127.0.0.1", prefix: str = "tp"
    ) -> None:
        self.rank = rank
        self.world = world
        self.timeout = timedelta(seconds=timeout_s)
        options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        options._timeout = self.timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        try:
            self.group: Any = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, world, options)
        except DIST_ERRORS as exc:
            raise CollectiveFailed(
                f"rank {rank} could not join its {world} tensor-parallel ranks: {exc}"
            ) from exc

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum tensor over the ranks, in place (the caller's tensor holds the sum afterwards)."""
        host = tensor if tensor.device.type == "cpu" else tensor.cpu()
        self._wait(self.group.allreduce([host]), "all-reduce")
        if host is not tensor:
            tensor.copy_(host)
        return tensor

    def all_gather_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's equally shaped tensor, concatenated along the last dimension in rank order."""
        host = tensor.contiguous().cpu()
        parts = [torch.empty_like(host) for _ in range(self.world)]
        self._wait(self.group.allgather([parts], [host]), "all-gather")
        return torch.cat(parts, dim=-1).to(tensor.device)

    def gather_to_first(self, tensor: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's equally shaped tensor, in rank order, on rank 0 (on its device); None on the other ranks."""
        host = tensor.contiguous().cpu()
        options = dist.GatherOptions()
        options.rootRank = 0
        parts = [torch.empty_like(host) for _ in range(self.world)] if self.rank == 0 else []
        self._wait(self.group.gather([parts] if parts else [], [host], options), "gather")
        return [part.to(tensor.device) for part in parts] if self.rank == 0 else None

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor into every rank's equally shaped tensor, in place."""
        host = tensor if tensor.device.type == "cpu" else tensor.cpu()
        self._broadcast(host)
        if host is not tensor:
            tensor.copy_(host)
        return tensor

    def broadcast_object(self, obj: object = None) -> Any:
        """Rank 0's obj on every rank (pickled; the other ranks pass nothing)."""
        if self.rank == 0:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            size = torch.tensor([len(data)], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        self._broadcast(size)
        payload = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if self.rank == 0
            else torch.empty(int(size.item()), dtype=torch.uint8)
        )
        self._broadcast(payload)
        return obj if self.rank == 0 else pickle.loads(payload.numpy().tobytes())

    def _broadcast(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self._wait(self.group.broadcast([tensor], options), "broadcast")

    def _wait(self, work: Any, what: str) -> None:
        try:
            work.wait(self.timeout)
        except DIST_ERRORS as exc:
            raise CollectiveFailed(f"tensor-parallel {what} failed on rank {self.rank}: {exc}") from exc
