"""Trace-driven link: a direction's capacity follows a list of delivery opportunities (Mahimahi).

A compiled trace is a period and the opportunity times inside it; the period repeats for ever,
as ``mm-link`` repeats its trace file. At each opportunity the link delivers up to
``opportunity_bytes`` (1500: one full-size IP packet, Mahimahi's unit) from the head of its
queue. The shaper is sans-IO like the rate stage: the shell passes the arrival time, the shaper
returns the packet's ready time (the opportunity that delivers its last byte) or None (tail drop).

Theory of operation, the same as ``link_queue.cc``'s ``rationalize``:

- Bytes are delivered in order. A packet continues in the opportunity where the packet ahead of
  it ended, if that one still has bytes left; a packet bigger than the opportunity spans several.
- An opportunity that finds the queue empty is wasted: idle time is never saved up as credit.
  So a packet that finds the queue empty starts at the first opportunity at or after its arrival.
- ``queue_limit_ns`` bounds the time a packet waits (arrival to ready) exactly as in the rate
  stage: beyond it a packet is tail-dropped, unless it found the queue empty.

The per-pipe state lives in the ``RateClock`` (``interceptor.engine.shaper``), beside the rate
stage's, so it survives skin swaps and a backlog built at a plain rate still delays a trace.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from interceptor.engine.shaper import RateClock

OPPORTUNITY_BYTES = 1500  # Mahimahi: "each line represents a delivery opportunity" of one MTU


@dataclass(frozen=True, slots=True, eq=False)
class CompiledTrace:
    """One period of delivery opportunities, ready for the hot path.

    ``times_ns``: opportunity times within the period, non-decreasing, each in [0, period_ns]
    (an array of int64: a long trace stays compact). Compared by identity: the loader hands out
    one object per file version, so "the same trace" is a pointer comparison per packet.
    """

    name: str  # the file or "series", for status and errors
    times_ns: array = field(repr=False)
    period_ns: int
    opportunity_bytes: int = OPPORTUNITY_BYTES

    def __post_init__(self) -> None:
        if not self.times_ns or self.period_ns <= 0 or self.opportunity_bytes <= 0:
            raise ValueError(f"trace {self.name!r}: needs opportunities, a period > 0 and bytes > 0")

    @property
    def count(self) -> int:
        return len(self.times_ns)

    @property
    def bytes_per_period(self) -> int:
        return len(self.times_ns) * self.opportunity_bytes

    @property
    def mean_ns_per_byte(self) -> float:
        """The trace's average rate, in the rate stage's unit (what status shows as asked)."""
        return self.period_ns / self.bytes_per_period

    def capacity_bytes(self, start_ns: int, end_ns: int) -> int:
        """Bytes the opportunities in (start_ns, end_ns] can deliver, trace time 0 = the origin
        (so ``start_ns = -1`` counts an opportunity at 0).

        For tests and the benchmark (the hot path never sums): whole periods times the bytes of
        one, plus the partial periods at each end.
        """
        return (self._opportunities_until(end_ns) - self._opportunities_until(start_ns)) * self.opportunity_bytes

    def _opportunities_until(self, t_ns: int) -> int:
        """How many opportunities fall at or before trace time ``t_ns`` (none before 0)."""
        if t_ns < 0:
            return 0
        cycles, offset = divmod(t_ns, self.period_ns)
        return cycles * len(self.times_ns) + bisect_right(self.times_ns, offset)


def shape_trace(trace: CompiledTrace, clock: RateClock, size: int, now_ns: int, queue_limit_ns: int) -> int | None:
    """Ready time (ns) of a ``size``-byte packet arriving at ``now_ns`` on ``trace``; None = drop.

    Opportunities are numbered from the trace's origin: index ``i`` is at
    ``origin + (i // n) * period + times[i % n]``. The clock remembers the index and the bytes
    left in the opportunity where the last accepted packet ended (``trace_index``,
    ``trace_left_bytes``) and that packet's ready time (``next_free_ns``, shared with the rate
    stage). The trace starts at the first packet that meets it; it starts again when the
    direction's trace changes, or when packets were shaped at a plain rate in between
    (``next_free_ns`` then no longer is this trace's).
    """
    last_ns = clock.next_free_ns
    if clock.trace is not trace or clock.trace_ready_ns != last_ns:
        # A new trace, or packets were shaped at a plain rate since: the trace starts here.
        clock.trace = trace
        clock.trace_origin_ns = now_ns
        clock.trace_ready_ns = -1  # no position yet
    times = trace.times_ns
    n = len(times)
    period = trace.period_ns
    origin = clock.trace_origin_ns
    opportunity = trace.opportunity_bytes
    if last_ns >= now_ns and last_ns == clock.trace_ready_ns:
        # The packet ahead ends at an opportunity not yet past: continue right behind it.
        index = clock.trace_index
        left = clock.trace_left_bytes
        if not left:
            index += 1
            left = opportunity
    else:
        # The queue is empty (or what is ahead was shaped at a plain rate): the first opportunity
        # at or after both the arrival and the end of what is ahead.
        start = now_ns if now_ns > last_ns else last_ns
        cycle, offset = divmod(start - origin, period)
        if offset == 0 and cycle and times[-1] == period:
            # A timestamp equal to the period is the end of the cycle before: it is exactly now.
            cycle -= 1
            i = bisect_left(times, period)
        else:
            i = bisect_left(times, offset)
        if i == n:
            cycle += 1
            i = 0
        index = cycle * n + i
        left = opportunity
    if size <= left:
        left -= size
    else:
        rest = size - left
        spans = -(-rest // opportunity)
        index += spans
        left = spans * opportunity - rest
    cycle, i = divmod(index, n)
    ready = origin + cycle * period + times[i]
    if last_ns > now_ns and ready - now_ns > queue_limit_ns:
        return None
    clock.trace_index = index
    clock.trace_left_bytes = left
    clock.trace_ready_ns = ready
    clock.next_free_ns = ready
    return ready
