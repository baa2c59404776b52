"""Per-request energy and cost on one node: the machine time each request used, at the node's power and price.

The rules:
- An engine step's wall time is charged to the sequences computed in it, in proportion to the tokens each one
  computed in that step (a 500-token prompt chunk and a one-token decode share a step 500:1). Energy is that
  share of the step's time x the meter's reading at the end of the step; cost is the same time x the machine
  type's price per second. Prompt-cache hits cost nothing: no token was computed for them.
- KV transfer (prefill node): from the request's last layer until every write of its KV completed, the node waits
  on the network. Each moment of that wait is shared evenly by the requests waiting then, except the moments when
  the engine was stepping: those are already charged to the sequences it computed, and charging them twice would
  bill more energy than the machine drew.
- Idle time (no step, no transfer) is charged to nobody: a request pays for the machine time it used, not for the
  capacity that waited for it. The cluster's idle power shows in each node's `splitserve:node_power_watts`.
- Phases: a sequence's prompt chunks (with its first token) are `prefill` and its later one-token steps `decode`,
  on any node: a prefill node charges prefill (and decode for a request it runs whole), a decode node decode (and
  prefill for a prompt it computes itself or recomputes after a preemption), a colocated node both. Only a prefill
  node's KV hand-over charges `transfer`.
Charges accumulate per request id until the node's service takes them for its response (take) or drops them
(discard, on abort). Thread-safe: steps are recorded on the engine thread, transfers and takes on the event loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args

from cluster.power.telemetry import PowerMeter, UtilisationWindow

Phase = Literal["prefill", "transfer", "decode"]
PHASES: tuple[Phase, ...] = get_args(Phase)


@dataclass(slots=True)
class PhaseCharge:
    seconds: float = 0.0  # machine time charged
    energy_j: float = 0.0
    cost_usd: float = 0.0

    def add(self, seconds: float, watts: float, usd_per_s: float) -> None:
        self.seconds += seconds
        self.energy_j += seconds * watts
        self.cost_usd += seconds * usd_per_s


@dataclass(slots=True)
class RequestCharge:
    """What one request was charged on one node, by phase."""

    phases: dict[Phase, PhaseCharge] = field(default_factory=lambda: {p: PhaseCharge() for p in PHASES})
    source: str = ""  # the node meter's "measured" or "modeled"; empty while nothing was charged

    @property
    def energy_j(self) -> float:
        return sum(p.energy_j for p in self.phases.values())

    @property
    def cost_usd(self) -> float:
        return sum(p.cost_usd for p in self.phases.values())

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.phases.values())


class Step(Protocol):
    """What the engine reports per step (engine.async_engine.StepTiming; this package does not import the engine)."""

    @property
    def started_s(self) -> float: ...
    @property
    def wall_s(self) -> float: ...
    @property
    def prompt_tokens(self) -> Mapping[str, int]: ...
    @property
    def decode_tokens(self) -> Mapping[str, int]: ...


class ChargeLedger:
    def __init__(
        self,
        meter: PowerMeter,
        cost_per_hour: float,
        busy_window: UtilisationWindow | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """busy_window: told of every step before the meter is read, so a modeled meter sees the step's load."""
        if cost_per_hour < 0:
            raise ValueError(f"cost_per_hour must be >= 0, got {cost_per_hour}")
        self.meter = meter
        self.usd_per_s = cost_per_hour / 3600.0
        self.busy_window = busy_window
        self._clock = clock
        self._charges: dict[str, RequestCharge] = {}
        self._lock = threading.Lock()
        self._busy_total_s = 0.0  # all step time ever recorded: what a transfer wait must not charge again
        self._waiting: set[str] = set()  # requests whose KV writes are still in flight
        self._settled_at = clock()
        self._busy_at_settle = 0.0

    # ---- engine steps (engine thread) ------------------------------------------------------------------------------

    def observe_step(self, step: Step) -> None:
        """The engine's step observer (engine.async_engine.StepObserver)."""
        if self.busy_window is not None:
            self.busy_window.record_busy(step.started_s, step.wall_s)
        self.record_step(step.wall_s, step.prompt_tokens, step.decode_tokens)

    def record_step(
        self, wall_s: float, prompt_tokens: Mapping[str, int], decode_tokens: Mapping[str, int]
    ) -> None:
        """One step took wall_s and computed these tokens per request id, as prompt work and as decode work."""
        if wall_s < 0:
            raise ValueError(f"a step cannot take negative time, got {wall_s} s")
        by_phase: tuple[tuple[Phase, Mapping[str, int]], ...] = (
            ("prefill", prompt_tokens),
            ("decode", decode_tokens),
        )
        work = [(rid, n, phase) for phase, tokens in by_phase for rid, n in tokens.items() if n > 0]
        total = sum(n for _, n, _ in work)
        watts = self.meter.read().watts
        with self._lock:
            self._busy_total_s += wall_s
            for rid, n, phase in work:
                self._charge(rid, phase, wall_s * n / total, watts)

    # ---- KV transfer waits (event loop) ------------------------------------------------------------------------------

    def begin_transfer(self, request_id: str) -> None:
        with self._lock:
            self._settle_transfers()
            self._waiting.add(request_id)

    def end_transfer(self, request_id: str) -> None:
        with self._lock:
            self._settle_transfers()
            self._waiting.discard(request_id)

    # ---- results ---------------------------------------------------------------------------------------------------

    def take(self, request_id: str) -> RequestCharge:
        """The request's charges so far, forgotten here (an empty charge if it was never charged)."""
        with self._lock:
            if request_id in self._waiting:
                self._settle_transfers()
                self._waiting.discard(request_id)
            return self._charges.pop(request_id, None) or RequestCharge()

    def discard(self, request_id: str) -> None:
        """Forget a request (aborted, failed, or already taken); safe to call twice."""
        with self._lock:
            self._charges.pop(request_id, None)
            self._waiting.discard(request_id)

    @property
    def open_requests(self) -> int:
        """Requests with charges not yet taken or discarded (a leak check for tests)."""
        with self._lock:
            return len(self._charges)

    # ---- internals (lock held) ------------------------------------------------------------------------------------

    def _charge(self, rid: str, phase: Phase, seconds: float, watts: float) -> None:
        charge = self._charges.get(rid)
        if charge is None:
            charge = self._charges[rid] = RequestCharge(source=self.meter.source)
        charge.phases[phase].add(seconds, watts, self.usd_per_s)

    def _settle_transfers(self) -> None:
        """Charge the time since the last transfer event to the requests that were waiting through it."""
        now = self._clock()
        elapsed = now - self._settled_at
        stepping = self._busy_total_s - self._busy_at_settle
        self._settled_at, self._busy_at_settle = now, self._busy_total_s
        idle = max(0.0, elapsed - stepping)
        if not self._waiting or idle <= 0:
            return
        watts = self.meter.read().watts
        for rid in self._waiting:
            self._charge(rid, "transfer", idle / len(self._waiting), watts)


def ledger_of(engine: object) -> ChargeLedger | None:
    """The ledger a node attached to its AsyncEngine as the step observer, if any: services charge through it."""
    observer = getattr(engine, "step_observer", None)
    return observer if isinstance(observer, ChargeLedger) else None
