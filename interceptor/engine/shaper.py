"""Rate stage: a bandwidth limit with a bounded queue, as a virtual clock (earliest departure time).

No token bucket and no timer: each pipe keeps ``next_free_ns``, the instant its emulated link
finishes sending what it has already accepted. A packet starts when the link is free, is fully
sent ``size * ns_per_byte`` later, and that instant is its ready time. The backlog is the time
the link is already committed for, so the queue limit is a limit on queueing delay, the way
``sch_fq`` (``time_next_packet``) and ``tc-tbf latency`` think about it.

A direction with a trace (``skin.trace``) is shaped by ``interceptor.engine.trace`` instead; its
compiled ``ns_per_byte`` is the trace's mean rate, so the unlimited fast path stays one test.
"""

from __future__ import annotations

from interceptor.compiled import DirectionSkin

from .trace import shape_trace


class RateClock:
    """Per-pipe shaper state; survives skin swaps so an old backlog still counts under a new rate.

    ``carry_ns`` is the fraction of a nanosecond not yet charged: per-packet transmission times
    are whole ns (floor of the exact value plus the carry), so the sum over any run is exact to
    within 1 ns and the long-run rate does not drift whatever ``ns_per_byte`` is.

    The ``trace_*`` fields are the trace stage's position (see ``engine.trace.shape_trace``):
    the trace in force, its origin, and where the last accepted packet ended in it.
    ``next_free_ns`` is shared, so a backlog built under one stage delays the other.
    """

    __slots__ = ("next_free_ns", "carry_ns", "trace", "trace_origin_ns", "trace_index",
                 "trace_left_bytes", "trace_ready_ns")

    def __init__(self) -> None:
        self.next_free_ns = 0
        self.carry_ns = 0.0
        self.trace = None
        self.trace_origin_ns = 0
        self.trace_index = 0
        self.trace_left_bytes = 0
        self.trace_ready_ns = -1


def shape(skin: DirectionSkin, clock: RateClock, size: int, now_ns: int) -> int | None:
    """Ready time (ns) of a ``size``-byte packet arriving at ``now_ns``; None = tail drop.

    - Unlimited (``ns_per_byte == 0``): ready at ``now_ns``, the clock is not touched.
    - An idle link restarts at ``now_ns``: unused time is not saved up as credit, so the output
      never bursts above the rate by more than the packet in flight.
    - Tail drop when the backlog the packet would join plus its own transmission time exceeds
      ``queue_limit_ns``; a dropped packet does not advance the clock. Exception: a packet that
      finds the queue empty is always accepted, even when it alone takes longer than the limit
      (1500 B at 16 kbit/s is 750 ms): otherwise a low rate with the default 500 ms limit would
      black-hole every full-size packet instead of passing them slowly.
    """
    ns_per_byte = skin.ns_per_byte
    if not ns_per_byte:
        return now_ns
    trace = skin.trace
    if trace is not None:
        return shape_trace(trace, clock, size, now_ns, skin.queue_limit_ns)
    start = clock.next_free_ns
    exact = size * ns_per_byte + clock.carry_ns
    tx_ns = int(exact)
    if start > now_ns:
        if start + tx_ns - now_ns > skin.queue_limit_ns:
            return None
    else:
        start = now_ns
    clock.carry_ns = exact - tx_ns
    start += tx_ns
    clock.next_free_ns = start
    return start


def backlog_ns(clock: RateClock, now_ns: int) -> int:
    """Queueing delay a packet arriving at ``now_ns`` would wait before it starts (for status)."""
    backlog = clock.next_free_ns - now_ns
    return backlog if backlog > 0 else 0
