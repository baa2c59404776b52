"""`mixed`: Splitwise's mixed pool around another policy (jsq by default).

A split cluster provisions each pool for the usual mix; a burst of long prompts (or of long outputs) can still
swamp one pool while the other idles. Splitwise's answer, which this policy implements on top of any placement
policy:
- prompt pool overloaded: even the prefill node with the shortest queue has >= prompt_threshold pending tokens
  (or no prefill node is usable). The request is served whole by a decode node, which computes its prompt itself.
- token pool overloaded: no usable decode node can hold the request's KV, or even the least loaded one has
  >= token_threshold tokens waiting. The request is served whole by a prefill node.
Such a node is *borrowed*: it serves both phases. Borrowed nodes take borrowed work first (Splitwise's mixed pool)
as long as they are not overloaded themselves; only then is another node borrowed. A borrowed node returns to its
own pool when its borrowed work has drained: a decode node when it has no prompt tokens queued, a prefill node when
it runs no requests. Otherwise the inner policy decides.

Defaults are the Splitwise simulator's thresholds (splitwise-facts.md: mixed pool prompt threshold 8192 tokens,
token threshold 2048).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from router import placement_model as pm
from router.policy import JoinShortestQueue, Placement, PlacementPolicy, PlacementRequest

if TYPE_CHECKING:
    from router.cluster_index import RoleArrays

PROMPT_THRESHOLD_TOKENS = 8192
TOKEN_THRESHOLD_TOKENS = 2048


class MixedPool:
    name = "mixed"

    def __init__(
        self,
        inner: PlacementPolicy | None = None,
        prompt_threshold: int = PROMPT_THRESHOLD_TOKENS,
        token_threshold: int = TOKEN_THRESHOLD_TOKENS,
    ) -> None:
        """`inner` (join-the-shortest-queue when None) places requests while neither pool is overloaded."""
        for label, value in (("prompt_threshold", prompt_threshold), ("token_threshold", token_threshold)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{label} must be an integer >= 0, got {value!r}")
        if isinstance(inner, MixedPool):
            raise ValueError("the mixed pool wraps another policy, not itself")
        self.inner = inner if inner is not None else JoinShortestQueue()
        self.prompt_threshold = prompt_threshold
        self.token_threshold = token_threshold
        self._borrowed: dict[str, str] = {}  # node id -> the pool that lent it ("prefill" or "decode")

    @property
    def kv_aware(self) -> bool:
        return getattr(self.inner, "kv_aware", False)

    @property
    def borrowed(self) -> dict[str, str]:
        """Nodes currently lent to the other phase, by the pool they come from."""
        return dict(self._borrowed)

    def place(self, request: PlacementRequest, roles: dict[str, RoleArrays]) -> Placement | None:
        self._return_drained(roles)
        prefill, decode = roles["prefill"], roles["decode"]
        if self._prompt_pool_overloaded(prefill):
            # A decode node needs room for the whole request here: nobody else will hold its KV.
            node = self._borrow(decode, "decode", pm.fits_kv(decode, request.max_total_tokens))
            if node is not None:
                return Placement(colocated=node, borrowed=True)
        if self._token_pool_overloaded(decode, request):
            node = self._borrow(prefill, "prefill", pm.fits_kv(prefill, request.max_total_tokens))
            if node is not None:
                return Placement(colocated=node, borrowed=True)
        return self.inner.place(request, roles)

    def _prompt_pool_overloaded(self, prefill: RoleArrays) -> bool:
        queues = prefill.pending_tokens[prefill.usable]
        return queues.size == 0 or int(queues.min()) >= self.prompt_threshold

    def _token_pool_overloaded(self, decode: RoleArrays, request: PlacementRequest) -> bool:
        room = decode.usable & pm.fits_kv(decode, request.prompt_tokens)
        return not room.any() or int(decode.pending_tokens[room].min()) >= self.token_threshold

    def _borrow(self, pool: RoleArrays, lender: str, fits: np.ndarray) -> str | None:
        """A node of `pool` to serve a whole request: one already borrowed if it has room, else a new one."""
        threshold = self.prompt_threshold if lender == "decode" else self.token_threshold
        already = np.fromiter((n in self._borrowed for n in pool.node_ids), dtype=bool, count=len(pool))
        allowed = pool.usable & fits & (pool.pending_tokens < max(threshold, 1))
        i = pm.pick(pool, allowed, (~already).astype(np.int64), *pm.queue_keys(pool))
        if i is None:
            return None
        node_id = pool.node_ids[i]
        self._borrowed[node_id] = lender
        return node_id

    def _return_drained(self, roles: dict[str, RoleArrays]) -> None:
        for node_id, lender in list(self._borrowed.items()):
            pool = roles[lender]
            try:
                i = pool.node_ids.index(node_id)
            except ValueError:  # the node left the cluster
                del self._borrowed[node_id]
                continue
            drained = pool.pending_tokens[i] == 0 if lender == "decode" else pool.running[i] == 0
            if drained:
                del self._borrowed[node_id]
