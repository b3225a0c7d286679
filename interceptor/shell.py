"""The trio shell around the engine: packets in, verdicts out, held packets released on time.

Everything that touches a clock, a file descriptor or the kernel for the data path lives here;
every decision is the engine's. One NFQUEUE queue per VM and direction, so a packet is classified
by the queue it arrives on, with no lookup. Held packets wait in one heap ordered by departure
time, released by one timerfd-driven task: no task or timer per packet.

A skin with a firewall profile, DNS rewriting or an MTU needs each packet's headers; only then is
the packet read and parsed (the inspection stages: mtu → firewall → dns), so skins with link
conditions alone keep the length-only fast path.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
from dataclasses import dataclass, field
from time import monotonic_ns
from typing import Callable

import trio

from interceptor.compiled import NO_SKIN, CompiledSkin
from interceptor.engine import ACCEPT, DROP_FIREWALL, DROP_MTU, DROP_QUEUE, Drop, Hold, Pipe, SharedLink
from interceptor.engine import dns as dns_stage
from interceptor.engine.firewall import ALLOW, REJECT, Firewall
from interceptor.engine.mtu import icmp_error, too_big
from interceptor.inject import Injector
from interceptor.nfqueue import Queue
from interceptor.packet import PROTO_UDP, parse
from interceptor.rules import REJECT_MARK
from interceptor.timer import TimerFd

log = logging.getLogger("netskin.shell")

# A held packet is released when its departure time is within this much of now. The wake-up of
# the release task lags the timer by tens of microseconds; arming slightly ahead centres the
# release error around zero instead of making every packet late.
RELEASE_AHEAD_NS = 40_000

# Stages a held packet can be waiting for.
_DEPART = 0  # its departure: verdict accept
_TO_LINK = 1  # its ready time behind the VM's own shaper: then it joins the shared uplink
_TO_PIPE = 2  # the end of its DNS delay: then it enters the link stages



@dataclass
class VmPath:
    """One VM's data path: its two pipes, its queues and the skin they enforce."""

    name: str
    index: int
    interface: str
    uplink_queue: int
    downlink_queue: int
    skin: CompiledSkin = NO_SKIN
    generation: int = 0
    uplink: Pipe = field(default_factory=lambda: Pipe(NO_SKIN.uplink))
    downlink: Pipe = field(default_factory=lambda: Pipe(NO_SKIN.downlink))
    firewall: Firewall = field(default_factory=Firewall)  # one per VM: flows span both directions
    dns_answers: dict[str, int] = field(default_factory=dict)  # DNS stage outcome → count
    icmp_sent: int = 0  # "fragmentation needed" / "packet too big" errors sent for this VM
    # Set by the shell: the inspection stage per direction, or None when the skin needs none.
    inspect_uplink: Callable | None = None
    inspect_downlink: Callable | None = None
    downlink_stages: Callable | None = None  # the downlink's link stages (after a DNS delay)
    on_swap: Callable[[], None] | None = None

    def set_skin(self, skin: CompiledSkin, generation: int) -> None:
        """Swap in ``skin``. Every part is a reference assignment, done with no await in
        between, so in this single-threaded loop every packet sees wholly the old or the new."""
        self.uplink.skin = skin.uplink
        self.downlink.skin = skin.downlink
        self.firewall.profile = skin.firewall
        self.skin = skin
        self.generation = generation
        if self.on_swap is not None:
            self.on_swap()


class Shell:
    def __init__(
        self,
        *,
        fail_open: bool,
        host_uplink_kbps: float = 0,
        uplink_queue_limit_ns: int = 500_000_000,
        max_held: int = 16384,
        seed: int | None = None,
    ) -> None:
        self.fail_open = fail_open
        self.max_held = max_held
        self.paths: dict[str, VmPath] = {}
        # With a shared host uplink, every VM's uplink traffic also crosses one weighted link.
        self.link = SharedLink(8e6 / host_uplink_kbps, uplink_queue_limit_ns) if host_uplink_kbps else None
        self._link_now_ns = 0  # the link's inputs must never go back in time
        self._queues: list[Queue] = []
        self._held: list = []  # heap of (time_ns, seq, packet, pipe, size, stage, path)
        self._seq = itertools.count()
        self._timer = TimerFd()
        self._random = random.Random(seed).random
        self.injector = Injector()

    # -- set-up -------------------------------------------------------------------------------

    def add_vm(self, path: VmPath) -> None:
        self.paths[path.name] = path
        path.on_swap = lambda: self._set_inspection(path)
        self._set_inspection(path)
        uplink = self._shared_uplink_handler(path) if self.link else self._handler(path, path.uplink, True)
        downlink = self._handler(path, path.downlink, False)
        for number, handler in ((path.uplink_queue, uplink), (path.downlink_queue, downlink)):
            self._queues.append(Queue(number, handler, max_len=self.max_held, fail_open=self.fail_open))

    # -- inspection: mtu → firewall → dns -------------------------------------------------------

    def _set_inspection(self, path: VmPath) -> None:
        path.inspect_uplink = self._inspector(path, outgoing=True)
        path.inspect_downlink = self._inspector(path, outgoing=False)

    def _inspector(self, path: VmPath, outgoing: bool) -> Callable | None:
        """The inspection stage for one direction of ``path.skin``, or None if it needs none.

        The stage returns the size with which the packet goes on to the link stages, or -1 when
        it has verdicted or held the packet itself.
        """
        skin = path.skin
        mtu = skin.mtu
        profile = skin.firewall
        dns = None if outgoing else skin.dns
        if mtu is None and profile is None and dns is None:
            return None
        pipe = path.uplink if outgoing else path.downlink
        judge = path.firewall.judge
        answers = path.dns_answers
        injector = self.injector
        rewrite_answer = dns_stage.rewrite_answer

        def inspect(packet, size: int, now: int) -> int:
            data = packet.get_payload()
            header = parse(data)
            if mtu is not None and header.length > mtu and too_big(header, mtu):
                pipe.refuse(DROP_MTU, size)
                packet.drop()
                error = icmp_error(data, header, mtu)
                if error is not None:
                    injector.send_icmp(*error)
                    path.icmp_sent += 1
                return -1
            if profile is not None:
                action = judge(header, data, outgoing, now)
                if action != ALLOW:
                    pipe.refuse(DROP_FIREWALL, size)
                    if action == REJECT:
                        # NF_REPEAT with the reject mark: the chain's first rules hand the packet
                        # to the kernel's REJECT target, so the refusal is a real firewall's.
                        packet.set_mark(packet.get_mark() | REJECT_MARK)
                        packet.repeat()
                    else:
                        packet.drop()
                    return -1
            if dns is not None and header.proto == PROTO_UDP and header.sport == 53:
                outcome, rebuilt = rewrite_answer(data, header, dns)
                answers[outcome] = answers.get(outcome, 0) + 1
                if rebuilt is not None:
                    packet.set_payload(rebuilt)
                    size = len(rebuilt)
                if dns.delay_ns:
                    # A slow resolver: the answer reaches the link only after the delay.
                    pipe.hold(size)
                    heapq.heappush(self._held, (now + dns.delay_ns, next(self._seq), packet, pipe, size,
                                                _TO_PIPE, path))
                    self._rearm()
                    return -1
            return size

        return inspect

    # -- link stages ----------------------------------------------------------------------------

    def _handler(self, path: VmPath, pipe: Pipe, outgoing: bool) -> Callable:
        # The hot path: everything it needs is bound to locals once, here.
        decide = pipe.decide
        held = self._held
        push = heapq.heappush
        seq = self._seq
        rand = self._random
        timer = self._timer
        ahead = RELEASE_AHEAD_NS

        def on_packet(packet) -> None:
            size = packet.get_payload_len()
            inspect = path.inspect_uplink if outgoing else path.inspect_downlink
            if inspect is not None:
                size = inspect(packet, size, monotonic_ns())
                if size >= 0:
                    link_stages(packet, size, monotonic_ns())
                return
            # Without inspection (the common case): link_stages' body inlined, one call less per packet.
            decision = decide(size, monotonic_ns(), rand)
            if decision is ACCEPT:
                packet.accept()
            elif decision.__class__ is Hold:
                departure = decision.departure_ns
                push(held, (departure, next(seq), packet, pipe, size, _DEPART, None))
                armed = timer.armed_ns
                if not armed or departure - ahead < armed:
                    timer.arm(departure - ahead)
            else:
                packet.drop()

        def link_stages(packet, size: int, now: int) -> None:
            decision = decide(size, now, rand)
            if decision is ACCEPT:
                packet.accept()
            elif decision.__class__ is Hold:
                departure = decision.departure_ns
                push(held, (departure, next(seq), packet, pipe, size, _DEPART, None))
                armed = timer.armed_ns
                if not armed or departure - ahead < armed:  # due before the timer: fire sooner
                    timer.arm(departure - ahead)
            else:
                packet.drop()

        if not outgoing:
            path.downlink_stages = link_stages  # where a DNS answer goes after its delay
        return on_packet

    def _shared_uplink_handler(self, path: VmPath) -> Callable:
        """Uplink with a shared host link: VM loss and shaper, then the weighted link, then delay."""
        pipe = path.uplink
        admit = pipe.admit
        rand = self._random

        def on_packet(packet) -> None:
            size = packet.get_payload_len()
            now = monotonic_ns()
            inspect = path.inspect_uplink
            if inspect is not None:
                size = inspect(packet, size, now)
                if size < 0:
                    return
            ready = admit(size, now, rand)
            if ready.__class__ is Drop:
                packet.drop()
                return
            pipe.hold(size)
            if ready <= now:
                self._to_link(packet, pipe, size, path, now)
                self._rearm()
            else:
                heapq.heappush(self._held, (ready, next(self._seq), packet, pipe, size, _TO_LINK, path))
                self._rearm()

        return on_packet

    def _to_link(self, packet, pipe: Pipe, size: int, path: VmPath, at_ns: int) -> None:
        at_ns = self._link_now_ns = max(at_ns, self._link_now_ns)
        if not self.link.enqueue(path.name, path.skin.qos_weight, size, (packet, pipe, size), at_ns):
            pipe.count_drop(DROP_QUEUE, size, held=True)
            packet.drop()

    def _rearm(self) -> None:
        """Arm the timer for the earliest of the next held packet and the link's next departure."""
        due = self._held[0][0] if self._held else None
        if self.link is not None:
            link_due = self.link.next_departure_ns()
            if link_due is not None and (due is None or link_due < due):
                due = link_due
        if due is None:
            self._timer.disarm()
        elif due - RELEASE_AHEAD_NS != self._timer.armed_ns:
            self._timer.arm(due - RELEASE_AHEAD_NS)

    # -- running ------------------------------------------------------------------------------

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for queue in self._queues:
                nursery.start_soon(queue.serve)
            nursery.start_soon(self._release_loop)
            task_status.started()

    async def _release_loop(self) -> None:
        held = self._held
        pop = heapq.heappop
        push = heapq.heappush
        timer = self._timer
        link = self.link
        while True:
            await timer.wait()
            now = monotonic_ns()
            horizon = now + RELEASE_AHEAD_NS
            while True:
                while held and held[0][0] <= horizon:
                    due, _, packet, pipe, size, stage, path = pop(held)
                    if stage == _DEPART:
                        packet.accept()
                        pipe.released(size)
                    elif stage == _TO_LINK:
                        self._to_link(packet, pipe, size, path, due)
                    else:  # _TO_PIPE: the held DNS answer now meets the downlink's conditions
                        pipe.unhold(size)
                        path.downlink_stages(packet, size, due)
                if link is None:
                    break
                sent = link.dequeue(horizon)
                if not sent:
                    break
                # Off the shared link: the VM's own delay line comes last (propagation).
                for (packet, pipe, size), departure in sent:
                    departure = pipe.delay(departure, self._random)
                    push(held, (departure, next(self._seq), packet, pipe, size, _DEPART, None))
            self._rearm()

    def release_all(self) -> int:
        """Verdict every held packet now (on shutdown: a stopped daemon must not eat packets)."""
        released = 0
        waiting = [(packet, pipe, size) for _, _, packet, pipe, size, _, _ in self._held]
        if self.link is not None:
            waiting += [item for item, _ in self.link.dequeue(1 << 62)]
        self._held.clear()
        for packet, pipe, size in waiting:
            try:
                packet.accept()
                pipe.released(size)
                released += 1
            except RuntimeError:
                break  # the queue is already gone; the kernel dropped what it held
        return released

    def close(self) -> None:
        for queue in self._queues:
            queue.close()
        self._queues.clear()
        self._timer.close()
        self.injector.close()

    @property
    def held_packets(self) -> int:
        return len(self._held)
