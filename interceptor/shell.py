"""The shell around the engine: NFQUEUE packets in, the engine's verdicts out, on time.

It maps ``interceptor.engine.path`` onto the outside world and knows no stage: one NFQUEUE queue
pair (uplink, downlink) for all its VMs, each packet handed to its VM's path by the devices the
kernel reports with it (``interceptor.engine.classify``: a dict lookup, whatever the number of
VMs), a timerfd armed for the engine's next due time, netfilterqueue verdicts, payload rewrites
and the raw sockets that send ICMP errors. A second queue pair, bound with the kernel's GSO flag,
carries the directions whose skin makes no per-packet decision: there a packet may be a
super-packet of up to 64 KiB, weighed by the size in its IP header and never rewritten.

The packets are served by one thread of its own (the data path): a plain epoll over the queues'
fds and the timerfd, so a wake-up costs a system call and a few lines of Python, not a round of
the trio scheduler (about 45 µs here, which at a few packets per wake-up was most of a packet's
cost). The trio side (``run``) starts and stops that thread; everything else the owner does to
the engine (VMs, skins, indexes, counters it takes) happens under ``lock``, which the data path
holds while it handles one wake-up's packets. A packet whose handling raises is verdicted by
``fail_mode`` and counted; the daemon keeps serving. So is a packet of a device the shell does
not know (counted as ``unclassified``): the owner then reads the interface indexes again
(``indexes_wanted``), since a recreated tap comes back with a new index.

An uplink packet's time is when it reached the host, not when the data path read it: the kernel
stamps each packet it receives (the shell keeps a socket with ``SO_TIMESTAMPNS`` open so it does
so on every host) and hands the stamp to the queue with it, and the engine gets the monotonic
clock less the packet's age. So its delay counts from its arrival and a late wake-up of the data
path (a busy CPU) does not add to it. A downlink packet is queued after the host forwarded it,
which clears the stamp: its time is when it was read.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import random
import select
import socket
import struct
import sys
import threading
from time import monotonic_ns, time_ns
from typing import Any, Callable

import trio

from interceptor.compiled import CompiledSkin
from interceptor.engine import ACCEPT, DROP_ERROR, Drop
from interceptor.engine.classify import Classifier, destination_of
from interceptor.engine.path import HELD, Engine, Rewrite, SendIcmp, VmPath
from interceptor.inject import Injector
from interceptor.nfqueue import SEGMENT_COPY_BYTES, Queue, real_length
from interceptor.timer import TimerFd

log = logging.getLogger("netskin.shell")

# A held packet is released when its due time is within this much of now. The wake-up of the
# release task lags the timer by tens of microseconds; arming slightly ahead centres the release
# error around zero instead of making every packet late.
RELEASE_AHEAD_NS = 40_000

# Packets the kernel may queue per queue beyond what the engine holds: room for the packets not
# yet read, so the engine's own cap (drop reason "overflow") is reached before the kernel's.
KERNEL_QUEUE_HEADROOM = 1024

# A packet's kernel stamp is used as its arrival time when its age is in [0, this): outside it
# the wall clock was stepped between the stamp and the read, and the read time is used.
STAMP_MAX_AGE_NS = 1_000_000_000

# Other threads (the trio loop, the daemon's worker threads for compiles and state writes) hold
# the GIL for up to the switch interval before the data path gets it back: 5 ms by default,
# which showed as release-lateness spikes while skins were being rewritten.
SWITCH_INTERVAL_S = 0.0005


SCHED_SETATTR = {"x86_64": 314, "aarch64": 274, "riscv64": 274, "ppc64le": 355, "s390x": 345}


def request_slice(slice_ns: int) -> str | None:
    """Ask the scheduler for this slice for the calling thread (sched_setattr's sched_runtime of a
    SCHED_OTHER thread, which EEVDF reads as the slice, Linux 6.12+); keeps its niceness. Returns
    None, or why it could not."""
    number = SCHED_SETATTR.get(platform.machine())
    if number is None:
        return f"no sched_setattr number known for {platform.machine()}"
    # struct sched_attr (version 1, 56 bytes): size, policy, flags, nice, priority, runtime,
    # deadline, period, util_min, util_max.
    attr = ctypes.create_string_buffer(struct.pack(
        "IIQiIQQQII", 56, os.SCHED_OTHER, 0, os.getpriority(os.PRIO_PROCESS, 0), 0, slice_ns, 0, 0, 0, 0), 56)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, threading.get_native_id(), attr, 0) != 0:
        return os.strerror(ctypes.get_errno())
    return None


class Shell:
    def __init__(
        self,
        *,
        fail_open: bool,
        host_uplink_kbps: float = 0,
        uplink_queue_limit_ns: int = 500_000_000,
        max_held: int = 15000,
        seed: int | None = None,
        fault_injection: bool = False,
        batch_verdicts: bool = True,
        slice_us: int = 0,
    ) -> None:
        self.fail_open = fail_open
        self.slice_us = slice_us  # the data-path thread's scheduler slice (0: the kernel's)
        # Held by the data-path thread while it handles a wake-up; by the owner while it changes
        # the engine (re-entrant: an owner's locked block may call the locked methods below).
        self.lock = threading.RLock()
        self._token: trio.lowlevel.TrioToken | None = None  # the owner's trio loop, while running
        self._indexes_asked = False
        # Accepts while the engine holds nothing go out as one batch verdict per drain.
        self.batch_verdicts = batch_verdicts
        # Held packets by token: (their queue, whether a batch verdict may accept them: not if
        # they carry a rewritten payload, which only their own verdict can send).
        self._holding: dict[Any, tuple[Queue, bool]] = {}
        self.max_held = max_held
        self.uplink_queue_limit_ns = uplink_queue_limit_ns  # of the shared host uplink
        self.engine = Engine(host_uplink_kbps=host_uplink_kbps, uplink_queue_limit_ns=uplink_queue_limit_ns,
                             max_held_per_direction=max_held)
        self.paths: dict[str, VmPath] = self.engine.paths
        self.queues: dict[str, tuple[int, int]] = {}  # vm → (uplink queue, downlink queue)
        self.classifier: Classifier[VmPath] = Classifier()
        self.unclassified = 0  # packets of a device no VM has (fail_mode verdict)
        self.indexes_wanted = trio.Event()  # set on an unknown device: read the indexes again
        self.interfaces: dict[str, str] = {}
        self.errors: dict[str, int] = {}  # vm → packets whose handling raised
        self._error_kinds: set[tuple[str, str]] = set()  # logged once each
        self._queues: list[Queue] = []
        self._timer = TimerFd()
        # While a socket asks for receive timestamps the kernel stamps every packet it receives
        # and queues the stamp with it (NFQA_TIMESTAMP): arrival times (see the module's docstring).
        self._stamps = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._stamps.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_TIMESTAMPNS", 35), 1)
        self._random = random.Random(seed).random
        self.injector = Injector()
        self.fault_injection = fault_injection
        self.faults: dict[str, int] = {}  # vm → packets left whose handling is made to raise (tests)

    @property
    def link(self):
        return self.engine.link

    # -- set-up -------------------------------------------------------------------------------

    def add_vm(self, name: str, interface: str, uplink_queue: int, downlink_queue: int,
               addresses: tuple[str | None, ...] = ()) -> VmPath:
        """Register a VM; ``addresses`` tell its downlink packets routed onto its bridge. Its
        queues are bound by ``bind`` (shared by all the shell's VMs)."""
        with self.lock:
            path = self.engine.add_vm(name)
            self.classifier.add(interface, path, addresses)
            self.queues[name] = (uplink_queue, downlink_queue)
            self.interfaces[name] = interface
            self.errors[name] = 0
        return path

    def remove_vm(self, name: str) -> None:
        """Forget a VM: its packets are no longer classified. Packets it has held are still
        released on time (the heap keeps its path)."""
        with self.lock:
            self.classifier.remove(self.interfaces.pop(name))
            self.engine.paths.pop(name, None)
            self.queues.pop(name, None)
            self.errors.pop(name, None)
            self.faults.pop(name, None)

    def set_queues(self, name: str, uplink_queue: int, downlink_queue: int) -> None:
        """The queues ``name``'s packets are steered to (the owner installs the rules)."""
        self.queues[name] = (uplink_queue, downlink_queue)

    def bind(self, uplink_queue: int, downlink_queue: int, vms: int | None = None,
             gso_pair: tuple[int, int] | None = None) -> None:
        """Bind the queue pair all the VMs' packets arrive on (``vms``: how many VMs it must
        make room for, if more than the shell has now) and, if given, the pair that takes GSO
        super-packets."""
        # Held packets count against the kernel's queue length: every VM may hold max_held.
        max_len = self.max_held * max(1, len(self.paths), vms or 0) + KERNEL_QUEUE_HEADROOM
        pairs = [(uplink_queue, downlink_queue, False)] + ([(*gso_pair, True)] if gso_pair else [])
        for up, down, gso in pairs:
            for number, outgoing in ((up, True), (down, False)):
                queue = Queue(number, None, max_len=max_len, fail_open=self.fail_open, gso=gso)
                queue.handler = self._handler(outgoing, gso, queue)
                self._queues.append(queue)

    def set_indexes(self, indexes: dict[str, int]) -> bool:
        """The kernel's interface name → index map (read by the owner); whether anything changed."""
        with self.lock:
            return self.classifier.set_indexes(indexes)

    def set_skin(self, name: str, skin: CompiledSkin, generation: int, timeline=None) -> None:
        """Swap ``name``'s skin: in force for its next packet when this returns."""
        with self.lock:
            self.paths[name].set_skin(skin, generation, timeline)

    # -- packets ------------------------------------------------------------------------------

    def _handler(self, outgoing: bool, gso: bool = False, queue: Queue | None = None) -> Callable:
        # The hot path: everything it needs is bound to locals once, here; the engine's handler
        # and whether it needs the packet's bytes are read from the path per packet (a swap or a
        # timeline changes them). On a GSO queue (``gso``) the packet's size is read from its IP
        # header: only the first bytes of a super-packet are copied up. An accept is deferred to
        # the queue's batch verdict only while the engine holds nothing: the batch accepts every
        # packet of the queue up to the id, which must not release a held one early.
        engine = self.engine
        held = engine.held
        no_link = engine.link is None
        rand = self._random
        timer = self._timer
        ahead = RELEASE_AHEAD_NS
        apply = self._apply
        on_error = self._on_error
        by_index = self.classifier.by_index  # updated in place when indexes change
        by_address = self.classifier.by_address
        unknown = self._unknown
        faults = self.faults
        fault_injection = self.fault_injection
        later = queue.accept_later if queue is not None and self.batch_verdicts and no_link else None
        holding = self._holding if queue is not None and self.batch_verdicts else None
        hold_id = queue.held.hold if holding is not None else None
        full_copy = SEGMENT_COPY_BYTES
        max_age = STAMP_MAX_AGE_NS

        def arrival(packet) -> int:
            """Monotonic ns when the host received the packet (now, if it has no usable stamp)."""
            now = monotonic_ns()
            stamp = packet.get_timestamp()
            if stamp:
                age = time_ns() - int(stamp * 1e9)
                if 0 <= age < max_age:
                    return now - age
            return now

        def verdict_of(packet, verdict) -> None:
            if verdict is ACCEPT:
                packet.accept()
            elif verdict is HELD:
                if holding is not None:  # released with its queue's batch verdict if it can be
                    holding[packet] = (queue, True)
                    hold_id(packet.id)
                due = held[0][0] if no_link else engine.next_due_ns
                armed = timer.armed_ns
                if due is not None and (not armed or due - ahead < armed):
                    timer.arm(due - ahead)
            elif verdict.__class__ is Drop:
                packet.drop()
            else:
                apply(packet, verdict, queue)

        if outgoing:
            def handle(packet) -> None:
                path = by_index.get(packet.indev)
                if path is None:
                    path = by_index.get(packet.physindev)
                    if path is None:
                        unknown(packet)
                        return
                try:
                    if fault_injection and faults.get(path.name):
                        _inject_fault(faults, path.name)
                    size = packet.get_payload_len()
                    if gso or size >= full_copy:  # maybe copied in part: weighed by its IP header
                        data = packet.get_payload()
                        size = real_length(data)
                        verdict = path.on_uplink(packet, size, data if path.needs_payload_up else None,
                                                 arrival(packet), rand)
                        if size > len(data) and verdict.__class__ is Rewrite:
                            verdict = verdict.then  # never rewrite what was copied in part
                    else:
                        verdict = path.on_uplink(packet, size, packet.get_payload() if path.needs_payload_up else None,
                                                 arrival(packet), rand)
                    if verdict is ACCEPT:  # the common case
                        if later is not None and not held:
                            later(packet.id)
                        else:
                            packet.accept()
                    else:
                        verdict_of(packet, verdict)
                except Exception as exc:  # noqa: BLE001 - one packet must never end the daemon
                    on_error(path.name, packet, exc, path.uplink)
        else:
            def handle(packet) -> None:
                path = by_index.get(packet.outdev)
                if path is None:
                    path = by_index.get(packet.physoutdev)  # bridged: the port
                    if path is None:  # routed onto a VM's bridge: its destination address
                        path = by_address.get(destination_of(packet.get_payload()))
                        if path is None:
                            unknown(packet)
                            return
                try:
                    if fault_injection and faults.get(path.name):
                        _inject_fault(faults, path.name)
                    size = packet.get_payload_len()
                    if gso or size >= full_copy:  # maybe copied in part: weighed by its IP header
                        data = packet.get_payload()
                        size = real_length(data)
                        verdict = path.on_downlink(packet, size, data if path.needs_payload_down else None,
                                                   arrival(packet), rand)
                        if size > len(data) and verdict.__class__ is Rewrite:
                            verdict = verdict.then  # never rewrite what was copied in part
                    else:
                        verdict = path.on_downlink(packet, size,
                                                   packet.get_payload() if path.needs_payload_down else None,
                                                   arrival(packet), rand)
                    if verdict is ACCEPT:
                        if later is not None and not held:
                            later(packet.id)
                        else:
                            packet.accept()
                    else:
                        verdict_of(packet, verdict)
                except Exception as exc:  # noqa: BLE001
                    on_error(path.name, packet, exc, path.downlink)

        return handle

    def _unknown(self, packet) -> None:
        """A packet of no known VM device: fail_mode's verdict, counted; read the indexes again."""
        self.unclassified += 1
        if self.unclassified == 1 or self.unclassified % 10_000 == 0:
            log.warning("%d packet(s) from or to a device of no known VM (verdict by fail_mode=%s); "
                        "reading the interface indexes again", self.unclassified,
                        "open" if self.fail_open else "closed")
        if self._token is None:  # not running (tests call the handlers directly)
            self.indexes_wanted.set()
        elif not self._indexes_asked:  # one request in flight to the owner's loop at a time
            self._indexes_asked = True
            try:
                self._token.run_sync_soon(self._ask_indexes)
            except trio.RunFinishedError:
                pass
        try:
            if self.fail_open:
                packet.accept()
            else:
                packet.drop()
        except Exception:  # noqa: BLE001 - the queue is gone
            pass

    def _apply(self, packet, verdict: Any, queue: Queue | None = None) -> None:
        """The rarer verdicts: a rewrite (then accept or hold) and an ICMP error."""
        if verdict.__class__ is Rewrite:
            packet.set_payload(verdict.payload)
            if verdict.then is ACCEPT:
                packet.accept()
            else:
                if queue is not None and self.batch_verdicts:  # its own verdict carries the payload
                    self._holding[packet] = (queue, False)
                    queue.held.hold(packet.id)
                self._rearm()
        elif verdict.__class__ is SendIcmp:
            packet.drop()
            self.injector.send_icmp(verdict.version, verdict.destination, verdict.message)
        else:
            raise TypeError(f"unknown verdict {verdict!r}")

    def _on_error(self, vm: str, packet, exc: Exception, pipe=None) -> None:
        """Count the error, log each kind once, verdict the packet by fail_mode."""
        self.errors[vm] = self.errors.get(vm, 0) + 1
        where = exc.__traceback__
        while where is not None and where.tb_next is not None:
            where = where.tb_next
        kind = (type(exc).__name__, f"{where.tb_frame.f_code.co_filename}:{where.tb_lineno}" if where else "?")
        if kind not in self._error_kinds:
            self._error_kinds.add(kind)
            log.error("vm %s: handling a packet raised (logged once per kind; counted in status as "
                      "errors); verdict by fail_mode=%s", vm, "open" if self.fail_open else "closed",
                      exc_info=exc)
        if pipe is not None and not self.fail_open:
            pipe.count_drop(DROP_ERROR, 0)
        try:
            if self.fail_open:
                packet.accept()
            else:
                packet.drop()
        except Exception:  # noqa: BLE001 - already verdicted, or the queue is gone
            pass

    def _rearm(self) -> None:
        due = self.engine.next_due_ns
        if due is None:
            self._timer.disarm()
        elif due - RELEASE_AHEAD_NS != self._timer.armed_ns:
            self._timer.arm(due - RELEASE_AHEAD_NS)

    # -- running ------------------------------------------------------------------------------

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve the bound queues on the data-path thread until cancelled; an error that ends the
        thread is raised here."""
        self._token = trio.lowlevel.current_trio_token()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        ended = trio.Event()
        failure: list[BaseException] = []
        stop_read, stop_write = os.pipe()
        thread = threading.Thread(target=self._serve, args=(stop_read, ended, failure),
                                  name="netskin-data", daemon=True)
        thread.start()
        try:
            task_status.started()
            await ended.wait()
            raise RuntimeError("the data path stopped") from (failure[0] if failure else None)
        finally:
            os.write(stop_write, b"x")
            thread.join()  # it finishes the wake-up at hand: a batch of packets at most
            os.close(stop_read)
            os.close(stop_write)
            self._token = None

    def _serve(self, stop_fd: int, ended: trio.Event, failure: list) -> None:
        """The data-path thread: wait in epoll (without the GIL), handle under ``lock``."""
        if self.slice_us:
            problem = request_slice(self.slice_us * 1000)
            if problem:
                log.warning("data path slice %d µs not set (%s); it runs with the kernel's default",
                            self.slice_us, problem)
        poller = select.epoll()
        handlers = {}
        for queue in self._queues:
            handlers[queue.fd] = queue.drain
        handlers[self._timer.fd] = self._release
        for fd in (*handlers, stop_fd):
            poller.register(fd, select.EPOLLIN)
        poll, lock = poller.poll, self.lock
        try:
            while True:
                events = poll()
                with lock:
                    for fd, _ in events:
                        if fd == stop_fd:
                            return
                        handlers[fd]()
        except BaseException as exc:  # noqa: BLE001 - handed to run(), which raises it
            failure.append(exc)
        finally:
            poller.close()
            try:
                self._token.run_sync_soon(ended.set)
            except trio.RunFinishedError:
                pass

    def _ask_indexes(self) -> None:  # in the owner's loop
        self._indexes_asked = False
        self.indexes_wanted.set()

    def _release(self) -> None:
        """The timer fired: verdict the held packets that are due, arm it for the next."""
        self._timer.expire()
        engine = self.engine
        try:
            now = monotonic_ns()
            due = engine.on_wakeup(now + RELEASE_AHEAD_NS, self._random, now)
        except Exception as exc:  # noqa: BLE001
            self._on_error("(release)", None, exc)
            due = []
        holding = self._holding
        queues: dict[Queue, tuple[list, list[int]]] = {}  # per queue: batch candidates, others' ids
        for packet, verdict in due:
            entry = holding.pop(packet, None) if holding else None
            if entry is not None:
                queue, batchable = entry
                released = queues.get(queue)
                if released is None:
                    released = queues[queue] = ([], [])
                if batchable and verdict is ACCEPT:
                    released[0].append(packet)
                    continue
                released[1].append(packet.id)
            try:
                if verdict is ACCEPT:
                    packet.accept()
                else:
                    packet.drop()
            except Exception:  # noqa: BLE001 - verdicted already (after an error) or queue gone
                pass
        for queue, (accepts, verdicted) in queues.items():
            through, alone = queue.held.release(verdicted, [packet.id for packet in accepts])
            if alone:  # behind a packet still held: one by one
                alone_ids = set(alone)
                for packet in accepts:
                    if packet.id in alone_ids:
                        try:
                            packet.accept()
                        except Exception:  # noqa: BLE001 - verdicted already (after an error)
                            pass
            if through is not None:
                try:
                    queue.accept_through(through)
                except OSError:  # the queue is gone
                    pass
        self._rearm()

    def release_all(self) -> int:
        """Verdict every held packet now (on shutdown: a stopped daemon must not eat packets)."""
        released = 0
        with self.lock:
            for packet in self.engine.release_all():
                try:
                    packet.accept()
                    released += 1
                except RuntimeError:
                    break  # the queue is already gone; the kernel dropped what it held
            self._holding.clear()
        return released

    def close(self) -> None:
        for queue in self._queues:
            queue.close()
        self._queues.clear()
        self._timer.close()
        self._stamps.close()
        self.injector.close()

    @property
    def held_packets(self) -> int:
        return self.engine.held_packets


def _inject_fault(faults: dict[str, int], name: str) -> None:
    """Tests only: make this VM's next packet's handling raise."""
    faults[name] -= 1
    raise RuntimeError("fault injected for a test")
