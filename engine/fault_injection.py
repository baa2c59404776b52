"""A failure a test can force inside the model forward, to prove that one request's failure stays its own.

Off unless the engine's process had SPLITSERVE_TEST_FAIL_MARKER in its environment when the engine was built: only
whoever starts the process (an operator, a test through LocalCluster's environment) can turn it on, never a client.
- `<token id>`: every forward whose batch holds a sequence with that token in its prompt raises InjectedFault right
  after layer 0 stored its KV, so the failure strikes mid-forward, after partial cache writes, in the batched path.
- `*`: every forward raises, as on a broken device: the engine must give up (EngineBrokenError) and its node exit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from engine.errors import InvalidRequestError
from engine.sequence import Sequence

ENV_VAR = "SPLITSERVE_TEST_FAIL_MARKER"
EVERY_FORWARD = "*"

LayerHook = Callable[[int], None]


class InjectedFault(RuntimeError):
    """The failure this module forces (a RuntimeError, like the device and kernel errors it stands in for)."""


@dataclass(frozen=True, slots=True)
class FaultInjector:
    marker: int | None  # a prompt token that makes its batch's forward fail; None with every_forward
    every_forward: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> FaultInjector | None:
        value = environ.get(ENV_VAR, "").strip()
        if not value:
            return None
        if value == EVERY_FORWARD:
            return cls(marker=None, every_forward=True)
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
            if layer == 0:
                what = "every forward" if self.every_forward else f"prompt token {self.marker}"
                raise InjectedFault(f"injected fault ({ENV_VAR}: {what})")

        return failing
