"""One VM, one direction: the skin in force plus the state and counters its packets leave behind.

``Pipe.decide`` is the per-packet entry point of the engine's link stages (loss → rate →
delay). It is sans-IO: the shell passes the IP size, its clock reading and a random source,
and gets back ``ACCEPT``, a ``Drop`` or a ``Hold``. The mutable state (loss state, rate clock,
delay line) lives here rather than in the skin, so swapping skins (assigning ``pipe.skin``)
keeps the departure times of packets already held and applies the new skin from the next
packet on: no packet is handled partly by each.
"""

from __future__ import annotations

from collections.abc import Callable

from interceptor.compiled import PASSTHROUGH, DirectionSkin

from .decision import (
    ACCEPT,
    DROP_ERROR,
    DROP_LOSS,
    DROP_MTU,
    DROP_OVERFLOW,
    DROP_QUEUE,
    Accept,
    Drop,
    Hold,
)
from .delay import DelayLine, departure
from .loss import LossState, lose
from .shaper import RateClock, shape

Random = Callable[[], float]


class Pipe:
    """Per VM and direction: skin, stage state and counters.

    Counters (all monotonic except the ``held_*`` gauges):

    - ``packets``/``bytes``: every packet offered to ``decide``/``admit`` or refused by an
      inspection stage before them (IP bytes).
    - ``passed_packets``/``passed_bytes``: verdicted accept, immediately or after a hold (the
      shell calls ``released(size)`` when it accepts a held packet).
    - ``drops``: reason → count; ``dropped_packets``/``dropped_bytes``: totals over reasons.
    - ``held_packets``/``held_bytes``: currently held (the queue depth); ``held_total``: ever held.
    """

    __slots__ = (
        "_skin",
        "_passthrough",
        "loss",
        "clock",
        "line",
        "packets",
        "bytes",
        "passed_packets",
        "passed_bytes",
        "drops",
        "dropped_packets",
        "dropped_bytes",
        "held_packets",
        "held_bytes",
        "held_total",
        "max_held",
        "hold_samples",
        "late_samples",
    )

    def __init__(self, skin: DirectionSkin = PASSTHROUGH, max_held: int = 1 << 30) -> None:
        self.skin = skin
        self.loss = LossState()
        self.clock = RateClock()
        self.line = DelayLine()
        self.packets = 0
        self.bytes = 0
        self.passed_packets = 0
        self.passed_bytes = 0
        self.drops: dict[str, int] = {
            d.reason: 0 for d in (DROP_LOSS, DROP_QUEUE, DROP_MTU, DROP_OVERFLOW, DROP_ERROR)
        }
        self.dropped_packets = 0
        self.dropped_bytes = 0
        self.held_packets = 0
        self.held_bytes = 0
        self.held_total = 0
        # Packets this pipe may hold at once: one VM's flood must not exhaust memory or the
        # kernel queue (whose overflow would bypass the daemon under fail_mode "open").
        self.max_held = max_held
        # Real hold times and release lateness (ns) of released packets, appended by the engine's
        # wake-ups and taken by the daemon once a second (``take_samples``) for the measured
        # conditions. Packets accepted at once add nothing here: their added delay is zero.
        self.hold_samples: list[int] = []
        self.late_samples: list[int] = []

    @property
    def skin(self) -> DirectionSkin:
        return self._skin

    @skin.setter
    def skin(self, skin: DirectionSkin) -> None:
        # is_passthrough is five comparisons; evaluate it once per swap, not once per packet.
        self._passthrough = skin.is_passthrough
        self._skin = skin

    def decide(self, size: int, now_ns: int, random: Random) -> Accept | Drop | Hold:
        """Loss, then rate, then delay, for one packet of ``size`` IP bytes arriving at ``now_ns``.

        ``ACCEPT`` when the packet may leave now (no ``Hold`` is allocated), ``Drop`` with the
        stage's reason, or ``Hold(departure_ns)``.
        """
        self.packets += 1
        self.bytes += size
        # Fast path: a passthrough skin with nothing held cannot overtake anything. With packets
        # still held from a previous skin, go through the delay line so order is kept.
        if self._passthrough and not self.held_packets:
            self.passed_packets += 1
            self.passed_bytes += size
            return ACCEPT
        if self.held_packets >= self.max_held:
            self.count_drop(DROP_OVERFLOW, size)
            return DROP_OVERFLOW
        # The body of admit(), inlined: one method call less per packet (~10% of the full path).
        skin = self._skin
        if (skin.loss_probability or skin.gilbert_elliott is not None) and lose(skin, self.loss, random):
            self.count_drop(DROP_LOSS, size)
            return DROP_LOSS
        ready = shape(skin, self.clock, size, now_ns)
        if ready is None:
            self.count_drop(DROP_QUEUE, size)
            return DROP_QUEUE
        departure_ns = departure(skin, self.line, ready, random)
        # Due already, but a packet ahead of it may still be waiting for the release timer: then
        # it is held too (released right behind that one), so it can never overtake.
        if departure_ns <= now_ns and not self.held_packets:
            self.passed_packets += 1
            self.passed_bytes += size
            return ACCEPT
        self.held_packets += 1
        self.held_bytes += size
        self.held_total += 1
        return Hold(departure_ns)

    def decide_as(self, skin: DirectionSkin, size: int, now_ns: int, random: Random) -> Accept | Drop | Hold:
        """``decide`` under ``skin`` rather than the pipe's current one: for a packet admitted
        under an earlier generation (a DNS answer held for its delay), which must be handled
        wholly by the skin it was admitted under."""
        current = self._skin
        passthrough = self._passthrough
        self._skin = skin
        self._passthrough = skin.is_passthrough
        try:
            return self.decide(size, now_ns, random)
        finally:
            self._skin = current
            self._passthrough = passthrough

    def admit(self, size: int, now_ns: int, random: Random, skin: DirectionSkin | None = None) -> Drop | int:
        """Loss then rate: the packet's ready time (ns), or the ``Drop`` (counted here)."""
        self.packets += 1
        self.bytes += size
        if self.held_packets >= self.max_held:
            self.count_drop(DROP_OVERFLOW, size)
            return DROP_OVERFLOW
        if skin is None:
            skin = self._skin
        if (skin.loss_probability or skin.gilbert_elliott is not None) and lose(skin, self.loss, random):
            self.count_drop(DROP_LOSS, size)
            return DROP_LOSS
        ready = shape(skin, self.clock, size, now_ns)
        if ready is None:
            self.count_drop(DROP_QUEUE, size)
            return DROP_QUEUE
        return ready

    def delay(self, ready_ns: int, random: Random, skin: DirectionSkin | None = None) -> int:
        """Departure time (ns) of a packet ready at ``ready_ns`` (updates the delay line only),
        under ``skin`` (the one the packet was admitted under) or the current one."""
        return departure(self._skin if skin is None else skin, self.line, ready_ns, random)

    def hold(self, size: int) -> None:
        """The shell holds a packet this pipe admitted (for the shared uplink stage)."""
        self.held_packets += 1
        self.held_bytes += size
        self.held_total += 1

    def unhold(self, size: int) -> None:
        """The shell stops holding a packet without a verdict yet (it goes on to ``decide``)."""
        self.held_packets -= 1
        self.held_bytes -= size

    def released(self, size: int) -> None:
        """The shell accepted a packet this pipe had held."""
        self.held_packets -= 1
        self.held_bytes -= size
        self.passed_packets += 1
        self.passed_bytes += size

    def refuse(self, drop: Drop, size: int) -> None:
        """Count a packet that an inspection stage (mtu) dropped before ``decide``."""
        self.packets += 1
        self.bytes += size
        self.count_drop(drop, size)

    def count_drop(self, drop: Drop, size: int, *, held: bool = False) -> None:
        """Count a drop decided by this pipe or by another stage ("mtu", "overflow", ...).

        ``held=True``: the packet had been held by this pipe (e.g. dropped by the shared uplink
        or flushed on shutdown), so it also leaves the held gauges.
        """
        drops = self.drops
        reason = drop.reason
        drops[reason] = drops.get(reason, 0) + 1
        self.dropped_packets += 1
        self.dropped_bytes += size
        if held:
            self.held_packets -= 1
            self.held_bytes -= size

    def take_samples(self) -> tuple[list[int], list[int]]:
        """The hold and lateness samples gathered since the last call (and start afresh)."""
        hold, late = self.hold_samples, self.late_samples
        self.hold_samples, self.late_samples = [], []
        return hold, late

    def activity(self) -> tuple[int, int, int, int, int]:
        """A cheap mark that moves whenever any counter or sample does (every change offers,
        holds, releases or drops a packet): equal marks mean nothing happened in between."""
        return self.packets, self.passed_packets, self.dropped_packets, self.held_total, self.held_packets

    def snapshot(self) -> dict[str, object]:
        """The counters, as plain data for status and metrics."""
        return {
            "packets": self.packets,
            "bytes": self.bytes,
            "passed_packets": self.passed_packets,
            "passed_bytes": self.passed_bytes,
            "dropped_packets": self.dropped_packets,
            "dropped_bytes": self.dropped_bytes,
            "drops": dict(self.drops),
            "held_packets": self.held_packets,
            "held_bytes": self.held_bytes,
            "held_total": self.held_total,
        }

    def __repr__(self) -> str:
        return (
            f"Pipe(packets={self.packets}, passed={self.passed_packets}, "
            f"dropped={self.dropped_packets}, held={self.held_packets})"
        )
