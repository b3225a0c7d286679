"""The whole packet path of every VM, sans-IO: packets and wake-ups in, verdicts out.

The shell hands each packet to ``VmPath.on_packet`` with its direction, an opaque token (the
shell's packet object, never touched here), its IP size, its bytes when the skin needs headers,
the shell's clock reading and a random source. The answer is one of:

- ``ACCEPT`` / a ``Drop``: verdict now;
- ``HELD``: the engine keeps the token; ``Engine.on_wakeup(now)`` hands it back, with its
  verdict, when it is due (``Engine.next_due_ns`` says when to call);
- ``Rewrite(payload, then)``: replace the packet's bytes, then ``then`` (``ACCEPT`` or ``HELD``);
- ``SendIcmp(drop, version, destination, message)``: drop it and send this ICMP error.

Theory of operation
-------------------
Stages, in order: mtu (oversize DF packets: drop and answer "fragmentation needed" / "packet too
big") → dns (answers to the VM: block/rewrite, then hold for ``dns.delay_ms``) → the link stages
(loss → own rate → [shared host uplink, weighted] → delay). The firewall is not here: profiles
are compiled into kernel chains (``interceptor.firewall``), so they hold when the daemon cannot.

Every packet is judged by exactly one skin generation end to end: the skin is read once when the
packet arrives and travels with it through every later stage it waits for (a DNS answer held for
its delay, a packet waiting for the shared uplink and then for its delay line). A swap
(``VmPath.set_skin``) is reference assignments with nothing in between, so packets that arrive
later meet the new skin and packets already inside finish under the old one. A skin with a
timeline changes step the same way: the first packet at or after ``next_change_ns`` asks the
step clock (``engine/timeline.py``) for the precompiled skin in force and swaps it in before it
is judged, so each packet is handled by exactly one step.

Held packets live in one heap ordered by due time. ``on_wakeup(now)`` pops what is due, moves
packets from stage to stage, and returns the verdicts. Nothing here reads a clock or sleeps.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable
from typing import Any

from interceptor.compiled import NO_SKIN, CompiledSkin, DirectionSkin
from interceptor.packet import PROTO_UDP, parse

from . import dns as dns_stage
from .decision import ACCEPT, DROP_MTU, DROP_QUEUE, Accept, Drop, Hold
from .mtu import icmp_error, too_big
from .pipe import Pipe
from .qos import SharedLink
from .timeline import NEVER_NS, StepClock

Random = Callable[[], float]

# Stages a held packet waits for.
_DEPART = 0  # its departure: verdict accept
_TO_LINK = 1  # its ready time behind the VM's own shaper: then it joins the shared uplink
_TO_PIPE = 2  # the end of its DNS delay: then it meets the downlink's link stages

# Hold-time samples a pipe keeps until the daemon collects them (once a second).
MAX_SAMPLES = 50_000


class Held:
    """The engine keeps the packet; ``Engine.on_wakeup`` returns its verdict later."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "HELD"


HELD = Held()


class Rewrite:
    """Replace the packet's bytes with ``payload``, then apply ``then`` (``ACCEPT`` or ``HELD``)."""

    __slots__ = ("payload", "then")

    def __init__(self, payload: bytes, then: Accept | Held) -> None:
        self.payload = payload
        self.then = then

    def __repr__(self) -> str:
        return f"Rewrite({len(self.payload)} bytes, then={self.then!r})"


class SendIcmp:
    """Drop the packet (``drop``) and send ``message``, an ICMP/ICMPv6 error, to ``destination``."""

    __slots__ = ("drop", "version", "destination", "message")

    def __init__(self, drop: Drop, version: int, destination: bytes, message: bytes) -> None:
        self.drop = drop
        self.version = version
        self.destination = destination
        self.message = message

    def __repr__(self) -> str:
        return f"SendIcmp({self.drop!r}, v{self.version}, {len(self.message)} bytes)"


Verdict = Accept | Drop | Held | Rewrite | SendIcmp


class VmPath:
    """One VM: its skin, its two pipes and the counters of its inspection stages.

    ``needs_payload_up`` / ``needs_payload_down`` tell the shell whether to pass the packet's
    bytes (only skins with an MTU or DNS rewriting look inside packets; the rest need the size).
    """

    def __init__(self, engine: Engine, name: str, max_held: int) -> None:
        self.engine = engine
        self.name = name
        self.skin: CompiledSkin = NO_SKIN
        self.generation = 0
        self.uplink = Pipe(NO_SKIN.uplink, max_held)
        self.downlink = Pipe(NO_SKIN.downlink, max_held)
        self.needs_payload_up = False
        self.needs_payload_down = False
        self.dns_answers: dict[str, int] = {}  # DNS stage outcome → count
        self.icmp_sent = 0  # "fragmentation needed" / "packet too big" errors asked for
        self.to_link: Callable | None = None  # set when the engine has a shared uplink
        # A skin with a timeline: its step clock, and when it next changes step (NEVER_NS without
        # one), so the per-packet cost of timelines is one integer comparison.
        self.timeline: StepClock | None = None
        self.next_change_ns = NEVER_NS
        # The handlers the shell calls per packet (it reads these attributes each time): the plain
        # ones, or with a timeline the same behind the step check.
        self._plain_up = self._link_handler(self.uplink, outgoing=True)
        self._plain_down = self._link_handler(self.downlink, outgoing=False)
        self._timed_up = self._timed(self._plain_up)
        self._timed_down = self._timed(self._plain_down)
        self.on_uplink = self._plain_up
        self.on_downlink = self._plain_down

    def set_skin(self, skin: CompiledSkin, generation: int, timeline: StepClock | None = None) -> None:
        """Swap in ``skin``: reference assignments only, so every packet sees the old or the new.

        ``timeline``: the step clock of ``skin.timeline`` (started by the caller); from then on the
        first packet at or after each change time swaps in the step's precompiled skin.
        """
        self.timeline = timeline
        self.on_uplink = self._plain_up if timeline is None else self._timed_up
        self.on_downlink = self._plain_down if timeline is None else self._timed_down
        if timeline is None:
            self.next_change_ns = NEVER_NS
            self._swap(skin)
            dns = skin.dns is not None
        else:
            self._swap(timeline.skin)
            self.next_change_ns = timeline.next_change_ns
            # The shell decides whether to pass a packet's bytes before the step can change.
            dns = skin.dns is not None or any(s.dns is not None for s in timeline.timeline.skins)
        self.needs_payload_up = skin.mtu is not None
        self.needs_payload_down = skin.mtu is not None or dns
        self.generation = generation

    def _swap(self, skin: CompiledSkin) -> None:
        self.uplink.skin = skin.uplink
        self.downlink.skin = skin.downlink
        self.skin = skin

    def advance_timeline(self, now_ns: int) -> None:
        """Bring the timeline's step to ``now_ns`` (called when ``now_ns >= next_change_ns``)."""
        clock = self.timeline
        if clock is None:
            return
        skin = clock.advance(now_ns)
        if skin is not self.skin:
            self._swap(skin)
        self.next_change_ns = clock.next_change_ns

    def on_packet(self, outgoing: bool, token: Any, size: int, data: bytes | None, now_ns: int,
                  random: Random) -> Verdict:
        """The verdict for one packet (see the module's docstring)."""
        handler = self.on_uplink if outgoing else self.on_downlink
        return handler(token, size, data, now_ns, random)

    # -- the handlers ---------------------------------------------------------------------------

    def _link_handler(self, pipe: Pipe, outgoing: bool) -> Callable:
        engine = self.engine
        held = engine.held
        push = heapq.heappush
        seq = engine.seq
        decide = pipe.decide
        shared = engine.link is not None and outgoing
        inspect = self._inspect
        to_link = self._to_link_handler(pipe) if shared else None
        if shared:
            self.to_link = to_link

        def on_packet(token: Any, size: int, data: bytes | None, now_ns: int, random: Random) -> Verdict:
            if data is not None:
                return inspect(outgoing, token, size, data, now_ns, random)
            if shared:
                return to_link(token, size, now_ns, random, self.skin)
            # The hot path: link stages only, everything bound to locals.
            decision = decide(size, now_ns, random)
            if decision is ACCEPT:
                return ACCEPT
            if decision.__class__ is Hold:
                push(held, (decision.departure_ns, next(seq), token, _DEPART, pipe, size, None, None, now_ns))
                return HELD
            return decision

        return on_packet

    def _timed(self, handler: Callable) -> Callable:
        """``handler`` behind the timeline's step check: the first packet at or after the next
        change swaps the step's skin in before it is judged. Only a skin with a timeline pays
        for the check (``set_skin`` picks the handler)."""
        advance = self.advance_timeline

        def on_packet(token: Any, size: int, data: bytes | None, now_ns: int, random: Random) -> Verdict:
            if now_ns >= self.next_change_ns:
                advance(now_ns)
            return handler(token, size, data, now_ns, random)

        return on_packet

    def _to_link_handler(self, pipe: Pipe) -> Callable:
        """Uplink with a shared host link: own loss and rate, then the weighted link, then delay."""
        engine = self.engine

        def to_link(token: Any, size: int, now_ns: int, random: Random, skin: CompiledSkin) -> Verdict:
            ready = pipe.admit(size, now_ns, random, skin.uplink)
            if ready.__class__ is Drop:
                return ready
            pipe.hold(size)
            if ready <= now_ns:
                if not engine._enter_link(token, pipe, size, self, skin, now_ns, now_ns):
                    return DROP_QUEUE
            else:
                heapq.heappush(engine.held, (ready, next(engine.seq), token, _TO_LINK, pipe, size, self, skin,
                                              now_ns))
            return HELD

        return to_link

    def _inspect(self, outgoing: bool, token: Any, size: int, data: bytes, now_ns: int,
                 random: Random) -> Verdict:
        """mtu → dns → link stages, for a packet whose bytes the skin needs."""
        skin = self.skin
        pipe = self.uplink if outgoing else self.downlink
        header = parse(data)
        mtu = skin.mtu
        if mtu is not None and header.length > mtu and too_big(header, mtu):
            pipe.refuse(DROP_MTU, size)
            error = icmp_error(data, header, mtu)
            if error is None:
                return DROP_MTU
            self.icmp_sent += 1
            return SendIcmp(DROP_MTU, *error)
        dns = None if outgoing else skin.dns
        rebuilt = None
        if dns is not None and header.proto == PROTO_UDP and header.sport == 53:
            outcome, rebuilt = dns_stage.rewrite_answer(data, header, dns)
            self.dns_answers[outcome] = self.dns_answers.get(outcome, 0) + 1
            if rebuilt is not None:
                size = len(rebuilt)
            if dns.delay_ns:
                # A slow resolver: the answer meets the link stages only after the delay, then
                # under the skin it arrived under.
                pipe.hold(size)
                heapq.heappush(self.engine.held, (now_ns + dns.delay_ns, next(self.engine.seq), token,
                                                  _TO_PIPE, pipe, size, self, skin, now_ns))
                return HELD if rebuilt is None else Rewrite(rebuilt, HELD)
        verdict = self.engine._link_stages(self, outgoing, pipe, token, size, now_ns, random, skin)
        if rebuilt is None:
            return verdict
        if verdict is ACCEPT or verdict is HELD:
            return Rewrite(rebuilt, verdict)
        return verdict  # dropped: no point rewriting it

    def snapshot(self) -> dict[str, object]:
        return {"uplink": self.uplink.snapshot(), "downlink": self.downlink.snapshot(),
                "dns": dict(self.dns_answers), "icmp_errors_sent": self.icmp_sent}


class Engine:
    """Every VM's path, the shared host uplink and the heap of held packets."""

    def __init__(self, *, host_uplink_kbps: float = 0, uplink_queue_limit_ns: int = 500_000_000,
                 max_held_per_direction: int = 1 << 30) -> None:
        self.paths: dict[str, VmPath] = {}
        self.max_held = max_held_per_direction
        # With a shared host uplink, every VM's uplink traffic also crosses one weighted link.
        self.link = SharedLink(8e6 / host_uplink_kbps, uplink_queue_limit_ns) if host_uplink_kbps else None
        self._link_now_ns = 0  # the link's inputs must never go back in time
        # (due_ns, seq, token, stage, pipe, size, path, skin, arrival_ns): seq keeps equal times in
        # arrival order; arrival_ns gives each released packet's real hold time.
        self.held: list[tuple] = []
        self.seq = itertools.count()

    def add_vm(self, name: str) -> VmPath:
        path = self.paths[name] = VmPath(self, name, self.max_held)
        return path

    @property
    def next_due_ns(self) -> int | None:
        """When ``on_wakeup`` has something to do next (None: nothing is waiting)."""
        due = self.held[0][0] if self.held else None
        if self.link is not None:
            link_due = self.link.next_departure_ns()
            if link_due is not None and (due is None or link_due < due):
                due = link_due
        return due

    @property
    def held_packets(self) -> int:
        waiting = len(self.held)
        if self.link is not None:
            waiting += sum(len(flow.queue) for flow in self.link.flows.values()) + len(self.link._sent)
        return waiting

    def on_wakeup(self, now_ns: int, random: Random, released_ns: int | None = None
                  ) -> list[tuple[Any, Accept | Drop]]:
        """Verdicts for every held packet due by ``now_ns``, in departure order.

        ``released_ns``: when the shell will verdict them (``now_ns`` when not given; the shell
        looks a little ahead): each released packet's real hold time and lateness are sampled
        for the measured conditions (``Pipe.hold_samples``/``late_samples``).
        """
        released = now_ns if released_ns is None else released_ns
        held = self.held
        pop = heapq.heappop
        push = heapq.heappush
        link = self.link
        out: list[tuple[Any, Accept | Drop]] = []
        while True:
            while held and held[0][0] <= now_ns:
                due, _, token, stage, pipe, size, path, skin, arrival = pop(held)
                if stage == _DEPART:
                    pipe.released(size)
                    if len(pipe.hold_samples) < MAX_SAMPLES:
                        pipe.hold_samples.append(released - arrival)
                        pipe.late_samples.append(released - due)
                    out.append((token, ACCEPT))
                elif stage == _TO_LINK:
                    if not self._enter_link(token, pipe, size, path, skin, due, arrival):
                        out.append((token, DROP_QUEUE))
                else:  # _TO_PIPE: the held DNS answer now meets the downlink's link stages
                    pipe.unhold(size)
                    verdict = self._link_stages(path, False, pipe, token, size, due, random, skin)
                    if verdict is not HELD:
                        out.append((token, verdict))
            if link is None:
                break
            sent = link.dequeue(now_ns)
            if not sent:
                break
            # Off the shared link: the VM's own delay line comes last (propagation), under the
            # skin the packet was admitted under.
            for (token, pipe, size, skin, arrival), departure in sent:
                departure = pipe.delay(departure, random, skin.uplink)
                push(held, (departure, next(self.seq), token, _DEPART, pipe, size, None, None, arrival))
        return out

    def release_all(self) -> list[Any]:
        """Every held token, for a shutdown that must not eat packets (counted as passed)."""
        tokens = []
        for _, _, token, _, pipe, size, _, _, _ in self.held:
            pipe.released(size)
            tokens.append(token)
        self.held.clear()
        if self.link is not None:
            for (token, pipe, size, _, _), _ in self.link.dequeue(1 << 62):
                pipe.released(size)
                tokens.append(token)
        return tokens

    # -- stages shared by the handlers --------------------------------------------------------

    def _link_stages(self, path: VmPath, outgoing: bool, pipe: Pipe, token: Any, size: int, now_ns: int,
                     random: Random, skin: CompiledSkin) -> Accept | Drop | Held:
        if outgoing and self.link is not None:
            return path.to_link(token, size, now_ns, random, skin)
        direction: DirectionSkin = skin.uplink if outgoing else skin.downlink
        decision = pipe.decide(size, now_ns, random) if direction is pipe.skin \
            else pipe.decide_as(direction, size, now_ns, random)
        if decision.__class__ is Hold:
            heapq.heappush(self.held, (decision.departure_ns, next(self.seq), token, _DEPART, pipe, size,
                                       None, None, now_ns))
            return HELD
        return decision

    def _enter_link(self, token: Any, pipe: Pipe, size: int, path: VmPath, skin: CompiledSkin,
                    at_ns: int, arrival_ns: int) -> bool:
        """Offer a packet to the shared uplink under ``skin``'s weight; False: tail-dropped there."""
        at_ns = self._link_now_ns = max(at_ns, self._link_now_ns)
        key: Hashable = path.name
        if self.link.enqueue(key, skin.qos_weight, size, (token, pipe, size, skin, arrival_ns), at_ns):
            return True
        pipe.count_drop(DROP_QUEUE, size, held=True)
        return False
