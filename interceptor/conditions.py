"""Asked versus measured: the conditions a VM's skin asks for, next to what its packets got.

Pure bookkeeping, no I/O and no clock: the daemon calls ``ConditionWindow.tick(now_ns, counters,
hold, late)`` once a second per VM and direction with the pipe's cumulative counters and the
hold-time samples the engine gathered since the last tick (``Pipe.take_samples``), or
``idle(now_ns, mark)`` first, which ticks a second in which the pipe's activity mark did not move
without reading its counters; ``summary(asked)`` folds the last ``WINDOW_S`` seconds into
figures and tolerance flags.

Measured, per direction, over the window:
- added delay p50/p99: each delivered packet's real hold in the daemon (arrival to verdict), with
  the packets accepted at once counted as zero;
- release lateness p99: how late the daemon verdicted held packets against their due time, the
  plainest sign that the host cannot keep up;
- loss: the engine's drops by loss over the packets it saw; queue (and overflow) drops apart;
- delivered rate: IP bytes let through per second, over the window and over the seconds in which
  the rate limit's queue overflowed (the link was busy throughout: the rate itself).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, deque
from dataclasses import dataclass

from interceptor.compiled import DirectionSkin

WINDOW_S = 5
NS_PER_MS = 1_000_000
# Samples are kept as log-spaced histograms (1 % wide bins above 1 µs), so a status request costs
# the same whatever the packet rate, and quantiles are good to about 1 %.
_BIN_FLOOR_NS = 1_000
_LOG_STEP = math.log(1.01)
LATE_TOLERANCE_MS = 2.0  # release lateness p99 beyond this: the host is falling behind
Z_999 = 3.29  # two-sided 99.9 % normal quantile, for the loss interval
_NO_SAMPLES: Counter = Counter()  # an idle second's histograms (shared: summaries only read them)


@dataclass(frozen=True)
class Asked:
    """What one direction of a skin asks for, in the units status shows."""

    delay_ms: float
    jitter_ms: float
    loss_percent: float
    rate_kbps: float  # 0: unlimited
    queue_limit_ms: float
    symmetric_jitter: bool  # the delay's median is delay_ms (uniform, normal)

    @classmethod
    def of(cls, skin: DirectionSkin) -> Asked:
        ge = skin.gilbert_elliott
        if ge is not None:
            # The chain's stationary share of time in the bad state, times each state's loss.
            bad = ge.p / (ge.p + ge.r) if ge.p + ge.r else 0.0
            loss = bad * ge.loss_bad + (1 - bad) * ge.loss_good
        else:
            loss = skin.loss_probability
        distribution = getattr(skin, "jitter_distribution", "uniform")
        return cls(
            delay_ms=skin.delay_ns / NS_PER_MS,
            jitter_ms=skin.jitter_ns / NS_PER_MS,
            loss_percent=100 * loss,
            rate_kbps=8e6 / skin.ns_per_byte if skin.ns_per_byte else 0.0,
            queue_limit_ms=skin.queue_limit_ns / NS_PER_MS,
            symmetric_jitter=not skin.jitter_ns or distribution in ("uniform", "normal"),
        )

    def to_json(self) -> dict:
        return {"delay_ms": round(self.delay_ms, 3), "jitter_ms": round(self.jitter_ms, 3),
                "loss_percent": round(self.loss_percent, 4), "rate_kbps": round(self.rate_kbps, 3),
                "queue_limit_ms": round(self.queue_limit_ms, 3)}


@dataclass(slots=True)
class _Second:
    at_ns: int
    packets: int  # cumulative counters at this tick
    passed_packets: int
    passed_bytes: int
    loss_drops: int
    queue_drops: int
    hold: Counter  # histogram (bin → count) of the samples gathered in the second that ended here
    late: Counter
    immediate: int  # packets accepted at once during that second (added delay 0)


class ConditionWindow:
    """One VM and direction: the last ``WINDOW_S`` one-second ticks."""

    def __init__(self) -> None:
        self._ticks: deque[_Second] = deque(maxlen=WINDOW_S + 1)
        self._mark: object = None

    def idle(self, now_ns: int, mark: object) -> bool:
        """A tick for a second in which nothing moved, if ``mark`` (the pipe's ``activity()``)
        equals the one given with the last tick: the counters carry over and no samples are
        read. False (nothing done) otherwise: the caller then takes a full ``tick``."""
        if mark is None or mark != self._mark or not self._ticks:
            return False
        last = self._ticks[-1]
        self._ticks.append(_Second(
            at_ns=now_ns, packets=last.packets, passed_packets=last.passed_packets,
            passed_bytes=last.passed_bytes, loss_drops=last.loss_drops, queue_drops=last.queue_drops,
            hold=_NO_SAMPLES, late=_NO_SAMPLES, immediate=0))
        return True

    def tick(self, now_ns: int, counters: dict, hold_ns: list[int], late_ns: list[int],
             mark: object = None) -> None:
        self._mark = mark
        drops = counters.get("drops", {})
        previous = self._ticks[-1] if self._ticks else None
        passed = counters["passed_packets"]
        immediate = max(0, passed - (previous.passed_packets if previous else passed) - len(hold_ns))
        self._ticks.append(_Second(
            at_ns=now_ns, packets=counters["packets"], passed_packets=passed,
            passed_bytes=counters["passed_bytes"], loss_drops=drops.get("loss", 0),
            queue_drops=drops.get("queue", 0) + drops.get("overflow", 0),
            hold=_histogram(hold_ns), late=_histogram(late_ns), immediate=immediate))

    def summary(self, asked: Asked) -> tuple[dict, list[str]]:
        """Measured figures over the window, and the lines saying where they leave tolerance."""
        ticks = list(self._ticks)
        if len(ticks) < 2:
            return {"window_s": 0, "packets": 0}, []
        first, last = ticks[0], ticks[-1]
        seconds = (last.at_ns - first.at_ns) / 1e9
        packets = last.packets - first.packets
        loss = last.loss_drops - first.loss_drops
        delivered_kbps = (last.passed_bytes - first.passed_bytes) * 8 / 1000 / seconds if seconds else 0.0
        holds: Counter = Counter()
        lates: Counter = Counter()
        zeros = 0
        seconds_kbps: list[tuple[float, bool]] = []  # per second: delivered, and did the queue overflow
        for before, tick in zip(ticks, ticks[1:]):
            holds.update(tick.hold)
            lates.update(tick.late)
            zeros += tick.immediate
            span = max(tick.at_ns - before.at_ns, 1)
            seconds_kbps.append(((tick.passed_bytes - before.passed_bytes) * 8e6 / span,
                                 tick.queue_drops > before.queue_drops))
        # Saturated seconds: the queue overflowed in that second and in the ones on either side,
        # so the link was busy all through it (not a second in which the load began or ended).
        busy_kbps = [kbps for i, (kbps, _) in enumerate(seconds_kbps[1:-1], start=1)
                     if seconds_kbps[i - 1][1] and seconds_kbps[i][1] and seconds_kbps[i + 1][1]]
        measured: dict = {
            "window_s": round(seconds, 2),
            "packets": packets,
            "loss_percent": round(100 * loss / packets, 4) if packets else None,
            "queue_drops": last.queue_drops - first.queue_drops,
            "delivered_kbps": round(delivered_kbps, 3),
            # While the queue overflowed (median over such seconds): what the rate limit let through.
            "saturated_kbps": round(statistics.median(busy_kbps), 3) if busy_kbps else None,
            "added_delay_ms": _quantiles(holds, zeros),
            "late_ms": _quantiles(lates, 0),
        }
        return measured, _out_of_tolerance(asked, measured, packets, loss)


def _histogram(samples_ns: list[int]) -> Counter:
    """Log-spaced bins of the samples; everything under 1 µs shares bin -1 (read back as 0)."""
    bins: Counter = Counter()
    log, floor, step = math.log, _BIN_FLOOR_NS, _LOG_STEP
    for value in samples_ns:
        bins[int(log(value / floor) / step) if value > floor else -1] += 1
    return bins


def _bin_value_ns(index: int) -> float:
    return 0.0 if index < 0 else _BIN_FLOOR_NS * math.exp((index + 0.5) * _LOG_STEP)


def _quantiles(bins: Counter, zeros: int) -> dict | None:
    """p50 and p99 (ms) of the histogram plus ``zeros`` samples of 0."""
    total = sum(bins.values()) + zeros
    if not total:
        return None
    ordered = sorted(bins.items())

    def at(q: float) -> float:
        rank = min(total - 1, max(0, math.ceil(q * total) - 1))
        if rank < zeros:
            return 0.0
        seen = zeros
        for index, count in ordered:
            seen += count
            if rank < seen:
                return round(_bin_value_ns(index) / NS_PER_MS, 3)
        return round(_bin_value_ns(ordered[-1][0]) / NS_PER_MS, 3)

    return {"p50": at(0.50), "p99": at(0.99), "samples": total}


def _out_of_tolerance(asked: Asked, measured: dict, packets: int, lost: int) -> list[str]:
    found = []
    delay = measured["added_delay_ms"]
    if delay and delay["samples"] >= 20 and asked.symmetric_jitter and not asked.rate_kbps:
        tolerance = max(1.0, 0.05 * asked.delay_ms)
        if abs(delay["p50"] - asked.delay_ms) > tolerance:
            found.append(f"added delay p50 {delay['p50']:.2f} ms, asked {asked.delay_ms:g} ms "
                         f"(tolerance ±{tolerance:.2f} ms)")
    late = measured["late_ms"]
    if late and late["samples"] >= 20 and late["p99"] > LATE_TOLERANCE_MS:
        found.append(f"releases late by {late['p99']:.2f} ms at p99 (tolerance {LATE_TOLERANCE_MS:g} ms): "
                     f"the host is not keeping up")
    if packets >= 100:
        p = asked.loss_percent / 100
        low, high = _loss_interval(packets, p)
        if not low <= lost <= high:
            found.append(f"loss {100 * lost / packets:.2f} % ({lost}/{packets}), asked {asked.loss_percent:g} % "
                         f"(99.9 % interval {100 * low / packets:.2f}–{100 * high / packets:.2f} %)")
    if asked.rate_kbps:
        delivered = measured["delivered_kbps"]
        # One full-size packet per window of slack: a rate is an average over whole packets.
        slack = 1500 * 8 / 1000 / max(measured["window_s"], 1e-9)
        if delivered > asked.rate_kbps * 1.05 + slack:
            found.append(f"delivered {delivered:.0f} kbit/s, above the asked {asked.rate_kbps:g} kbit/s")
        saturated = measured["saturated_kbps"]
        if saturated is not None and saturated < asked.rate_kbps * 0.9:
            found.append(f"delivered {saturated:.0f} kbit/s with a full queue, below the asked "
                         f"{asked.rate_kbps:g} kbit/s: the host is not keeping up")
    return found


def _loss_interval(n: int, p: float) -> tuple[float, float]:
    """Counts of losses out of ``n`` at probability ``p`` that are unremarkable: the normal
    approximation's 99.9 % interval widened by two counts, so that small ``n·p`` (where the
    approximation is poor) does not flag on chance alone."""
    if p <= 0:
        return 0, 0
    if p >= 1:
        return n, n
    mean = n * p
    half = Z_999 * math.sqrt(mean * (1 - p)) + 2
    return max(0.0, mean - half), min(float(n), mean + half)
