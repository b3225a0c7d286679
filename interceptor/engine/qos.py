"""Shared uplink: the host's uplink capacity (``host_uplink_kbps``) shared by all VMs by weight.

Sans-IO and event-driven: the shell calls ``enqueue`` for each packet, ``dequeue(now_ns)``
when ``next_departure_ns()`` is reached, and verdicts what ``dequeue`` returns. No clock reads.

Theory of operation
-------------------
The link is an emulated serial line of ``ns_per_byte``: it sends one packet at a time, and a
packet "departs" when its last byte is sent. ``_free_ns`` is when the link finishes its current
packet. Which packet goes next is decided at the instant the link becomes free, among the
packets that had arrived by then, by deficit round robin (Shreedhar & Varghese; the one-packet-
per-call form of Linux ``sch_drr``):

- each flow (a VM) has quantum = weight × 1514 bytes (qos_priority 1–10; 1514 = one
  Ethernet frame, so every visit can send at least one full-size packet);
- a flow that becomes backlogged joins the tail of the active list with deficit = quantum;
- the head flow sends its head packet if it fits its deficit (deficit -= size); otherwise it
  gets another quantum and moves to the tail; a flow whose queue empties leaves the list.

Over a round, each backlogged flow sends about its quantum, so under contention the shares
are proportional to the weights; a flow alone is visited every round and gets the whole link
(work-conserving). DRR is O(1) per packet, which beats a heap for start-time fair queueing
in CPython, and its unfairness is bounded by one quantum per round.

Decisions are taken eagerly and never in the future: ``enqueue(now)`` first makes every
decision due before ``now`` (so a packet that arrives at ``now`` cannot be picked at an
earlier instant), then adds the packet, and starts it at once if the link is free. An idle
link restarts at the arrival time: idle time is not saved up, so the link never sends faster
than its rate. The result does not depend on how often or how late ``dequeue`` is called.

Queue limit: a flow's waiting bytes (not counting the packet on the wire) may not exceed
``queue_limit_ns / ns_per_byte`` — what the whole link sends in ``queue_limit_ns``. A packet
that would exceed it is tail-dropped, except that a packet finding its flow's queue empty is
always accepted. The limit is per flow, so one VM cannot fill the others' room; measured at
the full link rate, a low-weight flow's queue can take longer than ``queue_limit_ns`` to drain
under contention (by the factor of total weight over its weight). Simple and predictable.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Any

QUANTUM_BYTES = 1514  # per unit of weight


class Flow:
    """One flow's queue, DRR state and counters."""

    __slots__ = (
        "key",
        "weight",
        "quantum",
        "deficit",
        "queue",
        "backlog_bytes",
        "active",
        "sent_packets",
        "sent_bytes",
        "drops",
        "dropped_bytes",
    )

    def __init__(self, key: Hashable, weight: int) -> None:
        self.key = key
        self.weight = 0
        self.quantum = 0
        self.set_weight(weight)
        self.deficit = 0
        self.queue: deque[tuple[int, Any]] = deque()
        self.backlog_bytes = 0
        self.active = False
        self.sent_packets = 0
        self.sent_bytes = 0
        self.drops = 0
        self.dropped_bytes = 0

    def set_weight(self, weight: int) -> None:
        if weight < 1:
            # A zero quantum would spin the scheduler forever: refuse it where it is set.
            raise ValueError(f"flow {self.key!r}: weight must be >= 1, got {weight!r}")
        self.weight = weight
        self.quantum = weight * QUANTUM_BYTES

    def stats(self) -> dict[str, int]:
        return {
            "weight": self.weight,
            "sent_packets": self.sent_packets,
            "sent_bytes": self.sent_bytes,
            "drops": self.drops,
            "dropped_bytes": self.dropped_bytes,
            "backlog_packets": len(self.queue),
            "backlog_bytes": self.backlog_bytes,
        }


class SharedLink:
    """A link of ``ns_per_byte`` shared by flows in proportion to their weights (DRR)."""

    __slots__ = (
        "ns_per_byte",
        "queue_limit_ns",
        "limit_bytes",
        "flows",
        "_active",
        "_free_ns",
        "_carry_ns",
        "_sent",
    )

    def __init__(self, ns_per_byte: float, queue_limit_ns: int) -> None:
        if ns_per_byte < 0:
            raise ValueError(f"ns_per_byte must be >= 0, got {ns_per_byte!r}")
        self.ns_per_byte = ns_per_byte
        self.queue_limit_ns = queue_limit_ns
        self.limit_bytes = queue_limit_ns / ns_per_byte if ns_per_byte else float("inf")
        self.flows: dict[Hashable, Flow] = {}
        self._active: deque[Flow] = deque()  # backlogged flows, in DRR visiting order
        self._free_ns = 0  # when the link finishes the packet it has started
        self._carry_ns = 0.0  # sub-ns remainder of transmission times, so the rate never drifts
        self._sent: deque[tuple[Any, int]] = deque()  # started packets: (item, departure_ns)

    def enqueue(self, flow_key: Hashable, weight: int, size: int, item: Any, now_ns: int) -> bool:
        """Offer ``item`` (``size`` bytes) of ``flow_key`` arriving at ``now_ns``; False = dropped."""
        self._advance(now_ns)
        flow = self.flows.get(flow_key)
        if flow is None:
            flow = self.flows[flow_key] = Flow(flow_key, weight)
        elif weight != flow.weight:
            flow.set_weight(weight)
        if flow.queue and flow.backlog_bytes + size > self.limit_bytes:
            flow.drops += 1
            flow.dropped_bytes += size
            return False
        if self._free_ns < now_ns:
            # Nothing is waiting (_advance leaves a backlog only while the link is busy past
            # now): an idle link restarts at the arrival, with no credit for the idle time.
            self._free_ns = now_ns
        flow.queue.append((size, item))
        flow.backlog_bytes += size
        if not flow.active:
            flow.active = True
            flow.deficit = flow.quantum
            self._active.append(flow)
        self._advance(now_ns)
        return True

    def next_departure_ns(self) -> int | None:
        """When the next packet finishes on the link (call ``dequeue`` then); None = idle."""
        # Whenever flows are backlogged, the packet on the wire ends after now and is in _sent.
        sent = self._sent
        return sent[0][1] if sent else None

    def dequeue(self, now_ns: int) -> list[tuple[Any, int]]:
        """Every ``(item, departure_ns)`` whose transmission completes by ``now_ns``, in order."""
        self._advance(now_ns)
        sent = self._sent
        out = []
        while sent and sent[0][1] <= now_ns:
            out.append(sent.popleft())
        return out

    def backlog_bytes(self) -> int:
        return sum(flow.backlog_bytes for flow in self._active)

    def snapshot(self) -> dict[Hashable, dict[str, int]]:
        """Per-flow counters and backlog, for status and metrics."""
        return {key: flow.stats() for key, flow in self.flows.items()}

    def _advance(self, until_ns: int) -> None:
        """Start every packet whose turn on the link comes at or before ``until_ns``."""
        active = self._active
        if not active:
            return
        ns_per_byte = self.ns_per_byte
        free_ns = self._free_ns
        carry = self._carry_ns
        sent = self._sent
        while active and free_ns <= until_ns:
            flow = active[0]
            size, item = flow.queue[0]
            while size > flow.deficit:
                flow.deficit += flow.quantum
                active.rotate(-1)
                flow = active[0]
                size, item = flow.queue[0]
            flow.queue.popleft()
            flow.deficit -= size
            flow.backlog_bytes -= size
            if not flow.queue:
                active.popleft()
                flow.active = False
            flow.sent_packets += 1
            flow.sent_bytes += size
            exact = size * ns_per_byte + carry
            tx_ns = int(exact)
            carry = exact - tx_ns
            free_ns += tx_ns
            sent.append((item, free_ns))
        self._free_ns = free_ns
        self._carry_ns = carry
