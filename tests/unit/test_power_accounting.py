"""Per-request energy and cost attribution on one node (cluster/power/accounting.py), on constructed steps and waits."""

from __future__ import annotations

import pytest

from cluster.machines import BUILTIN_MACHINES, PowerReading, PowerSource
from cluster.power.accounting import ChargeLedger, RequestCharge, ledger_of


class FixedMeter:
    """A meter whose reading the test sets: attribution must use whatever the meter says."""

    def __init__(self, watts: float, source: PowerSource = "modeled") -> None:
        self.watts = watts
        self.source: PowerSource = source
        self.description = "fixed"

    def read(self) -> PowerReading:
        return PowerReading(self.watts, self.source)

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


H100 = BUILTIN_MACHINES["dgx-h100"]


def ledger(watts: float = 1000.0, clock: Clock | None = None) -> ChargeLedger:
    return ChargeLedger(FixedMeter(watts), H100.cost_per_hour, clock=clock or Clock())


def test_a_step_is_split_over_its_sequences_by_the_tokens_each_computed() -> None:
    book = ledger(watts=1000.0)
    book.record_step(0.5, prompt_tokens={"a": 300}, decode_tokens={"b": 100})
    a, b = book.take("a"), book.take("b")
    assert a.phases["prefill"].seconds == pytest.approx(0.375)
    assert b.phases["decode"].seconds == pytest.approx(0.125)
    assert a.energy_j == pytest.approx(375.0) and b.energy_j == pytest.approx(125.0)
    assert a.energy_j + b.energy_j == pytest.approx(1000.0 * 0.5)  # the whole step, no more, no less
    assert a.cost_usd == pytest.approx(38.0 / 3600 * 0.375)
    assert a.source == b.source == "modeled"
    assert a.phases["decode"].seconds == 0 and b.phases["prefill"].seconds == 0


def test_steps_add_up_and_use_the_meter_reading_of_each_step() -> None:
    book = ledger(watts=1000.0)
    book.record_step(0.2, {"a": 10}, {})
    book.meter.watts = 3000.0  # type: ignore[attr-defined]
    book.record_step(0.1, {}, {"a": 1})
    charge = book.take("a")
    assert charge.phases["prefill"].energy_j == pytest.approx(200.0)
    assert charge.phases["decode"].energy_j == pytest.approx(300.0)
    assert charge.seconds == pytest.approx(0.3)


def test_idle_time_between_steps_is_charged_to_nobody() -> None:
    clock = Clock()
    book = ledger(watts=1000.0, clock=clock)
    book.record_step(0.1, {}, {"a": 1})
    clock.now += 60.0  # a minute with no step and no transfer
    book.record_step(0.1, {}, {"a": 1})
    assert book.take("a").seconds == pytest.approx(0.2)


def test_a_transfer_wait_is_shared_by_the_requests_waiting_then() -> None:
    clock = Clock()
    book = ledger(watts=2000.0, clock=clock)
    book.begin_transfer("a")
    clock.now += 1.0  # a alone
    book.begin_transfer("b")
    clock.now += 2.0  # a and b together
    book.end_transfer("a")
    clock.now += 0.5  # b alone
    book.end_transfer("b")
    a, b = book.take("a"), book.take("b")
    assert a.phases["transfer"].seconds == pytest.approx(1.0 + 1.0)
    assert b.phases["transfer"].seconds == pytest.approx(1.0 + 0.5)
    assert a.phases["transfer"].energy_j == pytest.approx(2000.0 * 2.0)


def test_time_the_engine_spent_stepping_during_a_wait_is_not_charged_twice() -> None:
    clock = Clock()
    book = ledger(watts=1000.0, clock=clock)
    book.begin_transfer("a")
    clock.now += 1.0
    book.record_step(0.25, {"other": 64}, {})  # another request's prompt computed during a's wait
    book.end_transfer("a")
    assert book.take("a").phases["transfer"].seconds == pytest.approx(0.75)
    assert book.take("other").seconds == pytest.approx(0.25)


def test_take_forgets_a_request_and_discard_drops_an_aborted_one() -> None:
    clock = Clock()
    book = ledger(clock=clock)
    book.record_step(0.1, {"a": 5, "b": 5}, {})
    book.begin_transfer("b")
    clock.now += 1.0
    assert book.take("a").seconds > 0
    assert book.take("a") == RequestCharge()  # taken already: nothing left, and an empty charge is no error
    assert book.open_requests == 1
    book.discard("b")
    book.discard("b")
    assert book.open_requests == 0
    clock.now += 1.0
    book.begin_transfer("c")  # b's wait stopped counting when it was discarded
    assert book.open_requests == 0


def test_a_request_taken_while_still_waiting_is_charged_up_to_now() -> None:
    clock = Clock()
    book = ledger(watts=100.0, clock=clock)
    book.begin_transfer("a")
    clock.now += 0.4
    assert book.take("a").phases["transfer"].seconds == pytest.approx(0.4)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="cost_per_hour"):
        ChargeLedger(FixedMeter(1.0), -1.0)
    with pytest.raises(ValueError, match="negative"):
        ledger().record_step(-0.1, {"a": 1}, {})


def test_ledger_of_finds_the_ledger_a_node_attached_to_its_engine() -> None:
    class Engine:
        step_observer: object = None

    engine = Engine()
    assert ledger_of(engine) is None
    engine.step_observer = book = ledger()
    assert ledger_of(engine) is book
