"""A failure a test can force inside the model forward, to prove that one request's failure stays its own.

Off unless the engine's process had SPLITSERVE_TEST_FAIL_MARKER in its environment when the engine was built: only
whoever starts the process (an operator, a test through LocalCluster's environment) can turn it on, never a client.
- `<token id>`: every forward whose batch holds a sequence with that token in its prompt raises InjectedFault right
  after layer 0 stored its KV, so the failure strikes mid-forward, after partial cache writes, in the batched path.
- `*`: every forward raises, as on a broken device: the engine must give up (EngineBrokenError) and its node exit.
- `stall:<token id>:<seconds>`: such a forward sleeps that long after layer 0 instead, as a wedged kernel would: the
  node must leave the cluster while stuck (cluster/node/progress_watch.py) and its requests go elsewhere.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from engine.errors import InvalidRequestError
from engine.sequence import Sequence

ENV_VAR = "SPLITSERVE_TEST_FAIL_MARKER"
EVERY_FORWARD = "*"
STALL_PREFIX = "stall:"

LayerHook = Callable[[int], None]


class InjectedFault(RuntimeError):
    """The failure this module forces (a RuntimeError, like the device and kernel errors it stands in for)."""


@dataclass(frozen=True, slots=True)
class FaultInjector:
    marker: int | None  # a prompt token that makes its batch's forward fail; None with every_forward
    every_forward: bool = False
    stall_s: float = 0.0  # > 0: the marked forward sleeps this long instead of failing

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> FaultInjector | None:
        value = environ.get(ENV_VAR, "").strip()
        if not value:
            return None
        if value == EVERY_FORWARD:
            return cls(marker=None, every_forward=True)
        if value.startswith(STALL_PREFIX):
            token, _, seconds = value.removeprefix(STALL_PREFIX).partition(":")
            try:
                return cls(marker=int(token), stall_s=float(seconds))
            except ValueError:
                raise InvalidRequestError(
                    f"{ENV_VAR} must be {STALL_PREFIX}<token id>:<seconds>, got {value!r}"
                ) from None
        if not value.isdigit():
            raise InvalidRequestError(f"{ENV_VAR} must be a token id or {EVERY_FORWARD!r}, got {value!r}")
        return cls(marker=int(value))

    def around(self, hook: LayerHook | None, seqs: Iterable[Sequence]) -> LayerHook | None:
        """The forward's layer hook, failing after layer 0 when this batch is one to fail (else hook unchanged)."""
        if not self.every_forward and not any(self.marker in s.prompt_token_ids for s in seqs):
            return hook

        def failing(layer: int) -> None:
            if hook is not None:
                hook(layer)
            if layer == 0 and self.stall_s > 0:
                time.sleep(self.stall_s)
            elif layer == 0:
                what = "every forward" if self.every_forward else f"prompt token {self.marker}"
                raise InjectedFault(f"injected fault ({ENV_VAR}: {what})")

        return failing
