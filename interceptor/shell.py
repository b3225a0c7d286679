"""The trio shell around the engine: packets in, verdicts out, held packets released on time.

Everything that touches a clock, a file descriptor or the kernel for the data path lives here;
every decision is the engine's. One NFQUEUE queue per VM and direction, so a packet is classified
by the queue it arrives on, with no lookup. Held packets wait in one heap ordered by departure
time, released by one timerfd-driven task: no task or timer per packet.
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
from interceptor.engine import ACCEPT, Hold, Pipe
from interceptor.nfqueue import Queue
from interceptor.timer import TimerFd

log = logging.getLogger("netskin.shell")

# A held packet is released when its departure time is within this much of now. The wake-up of
# the release task lags the timer by tens of microseconds; arming slightly ahead centres the
# release error around zero instead of making every packet late.
RELEASE_AHEAD_NS = 40_000


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

    def set_skin(self, skin: CompiledSkin, generation: int) -> None:
        """Swap in ``skin``. Each direction is one reference assignment, done with no await in
        between, so in this single-threaded loop every packet sees wholly the old or the new."""
        self.uplink.skin = skin.uplink
        self.downlink.skin = skin.downlink
        self.skin = skin
        self.generation = generation


class Shell:
    def __init__(self, *, fail_open: bool, max_held: int = 16384, seed: int | None = None) -> None:
        self.fail_open = fail_open
        self.max_held = max_held
        self.paths: dict[str, VmPath] = {}
        self._queues: list[Queue] = []
        self._held: list = []  # heap of (departure_ns, seq, packet, pipe, size)
        self._seq = itertools.count()
        self._timer = TimerFd()
        self._random = random.Random(seed).random
        self.release_late_ns: list[int] = []  # sampled lateness for diagnostics (bounded)

    # -- set-up -------------------------------------------------------------------------------

    def add_vm(self, path: VmPath) -> None:
        self.paths[path.name] = path
        for number, pipe in ((path.uplink_queue, path.uplink), (path.downlink_queue, path.downlink)):
            self._queues.append(
                Queue(number, self._handler(pipe), max_len=self.max_held, fail_open=self.fail_open)
            )

    def _handler(self, pipe: Pipe) -> Callable:
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
            decision = decide(size, monotonic_ns(), rand)
            if decision is ACCEPT:
                packet.accept()
            elif decision.__class__ is Hold:
                departure = decision.departure_ns
                push(held, (departure, next(seq), packet, pipe, size))
                if held[0][2] is packet:  # a new earliest departure: the timer must fire sooner
                    timer.arm(departure - ahead)
            else:
                packet.drop()

        return on_packet

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
        timer = self._timer
        late = self.release_late_ns
        while True:
            await timer.wait()
            now = monotonic_ns()
            horizon = now + RELEASE_AHEAD_NS
            while held and held[0][0] <= horizon:
                departure, _, packet, pipe, size = pop(held)
                packet.accept()
                pipe.released(size)
                if len(late) < 100_000:
                    late.append(now - departure)
            if held:
                timer.arm(held[0][0] - RELEASE_AHEAD_NS)

    def release_all(self) -> int:
        """Verdict every held packet now (on shutdown: a stopped daemon must not eat packets)."""
        released = 0
        while self._held:
            _, _, packet, pipe, size = heapq.heappop(self._held)
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

    @property
    def held_packets(self) -> int:
        return len(self._held)
