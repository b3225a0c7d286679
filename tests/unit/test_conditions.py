"""Asked versus measured (interceptor/conditions.py): figures and tolerance flags from ticks."""

from __future__ import annotations

import random

from interceptor.compiled import DirectionSkin, GilbertElliott
from interceptor.conditions import Asked, ConditionWindow

MS = 1_000_000
S = 1_000_000_000


def run(window: ConditionWindow, seconds: int, pps: int, *, hold_ms=0.0, late_ms=0.0, loss=0.0,
        size=1000, seed=1) -> None:
    """Feed ``seconds`` ticks of synthetic traffic: every packet held ``hold_ms``, lost with ``loss``."""
    rng = random.Random(seed)
    counters = {"packets": 0, "passed_packets": 0, "passed_bytes": 0, "drops": {"loss": 0, "queue": 0}}
    window.tick(0, dict(counters, drops=dict(counters["drops"])), [], [])
    for second in range(1, seconds + 1):
        holds, lates = [], []
        for _ in range(pps):
            counters["packets"] += 1
            if rng.random() < loss:
                counters["drops"]["loss"] += 1
                continue
            counters["passed_packets"] += 1
            counters["passed_bytes"] += size
            if hold_ms:
                holds.append(int(hold_ms * MS))
                lates.append(int(late_ms * MS))
        window.tick(second * S, dict(counters, drops=dict(counters["drops"])), holds, lates)


def asked(**fields) -> Asked:
    return Asked.of(DirectionSkin(**fields))


def test_a_skin_that_is_met_raises_no_flag():
    window = ConditionWindow()
    run(window, 6, 1000, hold_ms=20, late_ms=0.1, loss=0.05)
    measured, flags = window.summary(asked(delay_ns=20 * MS, loss_probability=0.05))
    assert abs(measured["added_delay_ms"]["p50"] - 20.0) <= 0.2 and measured["window_s"] == 5.0  # 1 % bins
    assert 4.0 < measured["loss_percent"] < 6.0
    assert abs(measured["delivered_kbps"] - 7600) < 200  # 950 packets of 1000 bytes a second
    assert flags == []


def test_late_releases_say_the_host_is_not_keeping_up():
    window = ConditionWindow()
    run(window, 6, 1000, hold_ms=25, late_ms=5)
    _, flags = window.summary(asked(delay_ns=20 * MS))
    assert any("late" in line and "not keeping up" in line for line in flags), flags
    assert any(line.startswith("added delay p50 24.9") and "asked 20 ms" in line for line in flags), flags


def test_loss_outside_its_interval_is_flagged_both_ways():
    window = ConditionWindow()
    run(window, 6, 1000, loss=0.2)
    _, flags = window.summary(asked(loss_probability=0.1))
    assert any(line.startswith("loss 20.") and "asked 10 %" in line for line in flags), flags
    _, flags = window.summary(asked(loss_probability=0.3))
    assert any("asked 30 %" in line for line in flags), flags
    _, flags = window.summary(asked(loss_probability=0.2))
    assert flags == []


def test_bursty_loss_is_asked_at_its_stationary_rate():
    ge = GilbertElliott(p=0.1, r=0.3, loss_bad=1.0, loss_good=0.0)
    assert Asked.of(DirectionSkin(gilbert_elliott=ge)).loss_percent == 25.0


def test_a_rate_above_the_asked_one_is_flagged():
    window = ConditionWindow()
    run(window, 6, 1000, size=1000)  # 8 Mbit/s delivered
    rate = 8e9 / (4000 * 1000)  # ns per byte at 4000 kbit/s
    _, flags = window.summary(asked(ns_per_byte=rate))
    assert any("above the asked 4000 kbit/s" in line for line in flags), flags
    _, flags = window.summary(asked(ns_per_byte=8e9 / (8000 * 1000)))
    assert flags == []


def test_packets_accepted_at_once_count_as_zero_added_delay():
    window = ConditionWindow()
    run(window, 3, 100)  # nothing held
    measured, _ = window.summary(asked())
    assert measured["added_delay_ms"] == {"p50": 0.0, "p99": 0.0, "samples": 300}


def test_an_empty_window_reports_nothing_and_flags_nothing():
    measured, flags = ConditionWindow().summary(asked(delay_ns=MS))
    assert measured["packets"] == 0 and flags == []


def test_a_saturated_link_below_its_rate_is_flagged_and_idle_time_is_not():
    rate = 8e9 / (4000 * 1000)
    window = ConditionWindow()
    counters = {"packets": 0, "passed_packets": 0, "passed_bytes": 0, "drops": {"loss": 0, "queue": 0}}
    window.tick(0, {**counters, "drops": dict(counters["drops"])}, [], [])
    for second in range(1, 6):
        if second <= 4:  # saturated at 3 Mbit/s (queue overflowing), then idle
            counters["passed_bytes"] += 375_000
            counters["passed_packets"] += 375
            counters["packets"] += 500
            counters["drops"]["queue"] += 125
        window.tick(second * S, {**counters, "drops": dict(counters["drops"])}, [], [])
    measured, flags = window.summary(asked(ns_per_byte=rate))
    assert measured["saturated_kbps"] == 3000.0 and measured["delivered_kbps"] == 2400.0
    assert any("delivered 3000 kbit/s with a full queue" in line for line in flags), flags
    # The same idle tail at the asked rate is no problem.
    measured, flags = window.summary(asked(ns_per_byte=8e9 / (3000 * 1000)))
    assert flags == []


def test_an_idle_second_costs_no_counters_and_summarizes_as_a_full_tick_would():
    busy, skipped = ConditionWindow(), ConditionWindow()
    counters = {"packets": 500, "passed_packets": 480, "passed_bytes": 480_000, "drops": {"loss": 20, "queue": 0}}
    for window in (busy, skipped):
        window.tick(0, counters, [20 * MS] * 480, [0] * 480, mark=(500, 480, 20))
    assert not skipped.idle(1 * S, None) and not skipped.idle(1 * S, (501, 480, 20))  # moved: a full tick
    for second in range(1, 7):
        busy.tick(second * S, counters, [], [], mark=(500, 480, 20))
        assert skipped.idle(second * S, (500, 480, 20))
    ask = asked(delay_ns=20 * MS, loss_probability=0.04)
    assert skipped.summary(ask) == busy.summary(ask)
    assert skipped.summary(ask)[0]["window_s"] == 5.0 and skipped.summary(ask)[0]["packets"] == 0
    assert not ConditionWindow().idle(0, (0, 0, 0))  # nothing to carry over yet
