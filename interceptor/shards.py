"""Engine workers: the daemon's data path on every core.

Each worker owns whole VMs (both directions), so a VM's state (pipes, held packets, timeline
clock) never crosses processes. Every worker is a child process (``python -m interceptor.shards``),
each a ``Shell`` on its own two queue pairs (``HostConfig.queue_numbers(k)``), so the daemon's
own work (reloads, compiles, applies, the control socket) never holds a data path's GIL or its
thread's place on a core. With ``isolate = False`` worker 0 is the daemon's own ``Shell``
instead. The daemon stays the one place that decides: it compiles skins, installs the rules and
serves the control socket; ``Shards`` gives it one view of every VM.

A remote VM is seen through ``RemotePath``: a shadow ``VmPath`` that takes the same skins, clock
and generation as the worker's (so ``skin``, ``generation`` and the timeline position are read
locally) and the worker's counters as last reported (``refresh``; once a second, and before each
status).

A worker that dies is started again with its VMs, their skins, generations and timeline clocks
sent *before* it binds its queues: its VMs' next packets meet their skins. In between its queues
have no listener and the kernel applies ``fail_mode`` (closed: dropped; open: passed).

With a shared host uplink (``host_uplink_kbps``) every VM stays in worker 0, in the daemon's
process: the weighted link is one scheduler and its shares must see every VM's packets.
"""

from __future__ import annotations

import gc
import itertools
import logging
import math
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import trio

from interceptor.compiled import CompiledSkin
from interceptor.engine.path import Engine, VmPath
from interceptor.shell import Shell

log = logging.getLogger("netskin.shards")

_FRAME = struct.Struct("!I")
START_TIMEOUT_S = 20.0  # a worker process imports, binds its queues and answers within this
CALL_TIMEOUT_S = 5.0
RESTART_BACKOFF_S = (0.0, 0.2, 1.0, 5.0)  # a worker that keeps dying is started less often


class WorkerGone(Exception):
    """The worker process exited (or did not answer) before replying."""


# -- framing: length-prefixed pickles on a stream socket (both ends are this package) -----------

def _encode(obj: Any) -> bytes:
    data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    return _FRAME.pack(len(data)) + data


def _read_exact_blocking(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise WorkerGone("the other end closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _receive_blocking(sock: socket.socket) -> Any:
    (size,) = _FRAME.unpack(_read_exact_blocking(sock, _FRAME.size))
    return pickle.loads(_read_exact_blocking(sock, size))


class _Reader:
    """Frames from a trio stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def receive(self) -> Any:
        """The next frame's object; None at the end of the stream."""
        while True:
            if len(self.buffer) >= _FRAME.size:
                (size,) = _FRAME.unpack_from(self.buffer)
                if len(self.buffer) >= _FRAME.size + size:
                    data = bytes(self.buffer[_FRAME.size:_FRAME.size + size])
                    del self.buffer[:_FRAME.size + size]
                    return pickle.loads(data)
            chunk = await self.stream.receive_some(1 << 16)
            if not chunk:
                return None
            self.buffer += chunk


# -- the daemon's side -----------------------------------------------------------------------

class RemotePipe:
    """A remote VM direction's counters as last reported; samples kept until taken."""

    def __init__(self, shadow) -> None:
        self.last: dict = shadow.snapshot()
        self.hold: list[int] = []
        self.late: list[int] = []
        self.reports = 0  # reports taken: a worker reports a VM only when its counters moved

    def activity(self) -> int:
        return self.reports

    def snapshot(self) -> dict:
        return dict(self.last)

    def take_samples(self) -> tuple[list[int], list[int]]:
        hold, late = self.hold, self.late
        self.hold, self.late = [], []
        return hold, late


class RemotePath:
    """A VM served by a worker process, as the daemon sees it."""

    def __init__(self, shadow: VmPath, worker: RemoteWorker) -> None:
        self.shadow = shadow
        self.worker = worker
        self.name = shadow.name
        self.uplink = RemotePipe(shadow.uplink)
        self.downlink = RemotePipe(shadow.downlink)
        self.dns_answers: dict[str, int] = {}
        self.icmp_sent = 0
        self.errors = 0
        self.given: CompiledSkin | None = None  # the skin last set (a timeline's steps come from it)

    # What the daemon set: read from the shadow, which took the same skin, generation and clock.
    @property
    def skin(self) -> CompiledSkin:
        return self.shadow.skin

    @property
    def generation(self) -> int:
        return self.shadow.generation

    @property
    def timeline(self):
        return self.shadow.timeline

    def advance_timeline(self, now_ns: int) -> None:
        self.shadow.advance_timeline(now_ns)

    def set_skin(self, skin: CompiledSkin, generation: int, timeline=None) -> None:
        """Swap the skin in the worker (``Shards.settle`` waits until it is in force there)."""
        self.given = skin
        if self.worker.process is not None:  # else it goes with the start
            self.worker.post("set_skin", name=self.name, skin=skin, generation=generation, timeline=timeline)
        self.shadow.set_skin(skin, generation, timeline)  # the worker got a copy (posts are encoded at once)

    def take_report(self, report: dict) -> None:
        self.uplink.last, self.downlink.last = report["uplink"], report["downlink"]
        self.uplink.reports += 1
        self.downlink.reports += 1
        for pipe, (hold, late) in ((self.uplink, report["samples_up"]), (self.downlink, report["samples_down"])):
            pipe.hold += hold
            pipe.late += late
        self.dns_answers = report["dns"]
        self.icmp_sent = report["icmp"]
        self.errors = report["errors"]


class RemoteWorker:
    """One worker process: started, fed, watched and started again if it dies."""

    def __init__(self, index: int, shell_options: dict, nice: int,
                 queue_numbers: Callable[..., tuple[int, int]], gso: bool) -> None:
        self.index = index
        self.shell_options = shell_options
        self.nice = nice
        self.queue_numbers = queue_numbers
        self.gso = gso
        self.paths: dict[str, RemotePath] = {}
        self.vm_args: dict[str, tuple] = {}  # name → (interface, up, down, addresses)
        self.indexes: dict[str, int] = {}
        self.room_vms = 0
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self.last_exit: str | None = None  # how the last process ended
        self.stopping = False
        self.alive = False  # serving: between a start and the end of its socket
        self.report: dict = {"held": 0, "unclassified": 0}
        self._sock: socket.socket | None = None
        self._stream: trio.SocketStream | None = None
        self._seq = itertools.count(1)
        self._waiting: dict[int, list] = {}  # seq → [event, ok, value]
        self._outbox_send, self._outbox = trio.open_memory_channel(math.inf)

    # The whole state a fresh process needs, in order: its VMs and their skins before the bind.
    def _replay(self) -> list[tuple[str, dict]]:
        messages: list[tuple[str, dict]] = [("init", {"options": self.shell_options, "nice": self.nice,
                                                      "label": f"worker {self.index}"})]
        for name, (interface, up, down, addresses) in self.vm_args.items():
            messages.append(("add_vm", {"name": name, "interface": interface, "up": up, "down": down,
                                        "addresses": addresses}))
            path = self.paths[name]
            if path.given is not None:
                messages.append(("set_skin", {"name": name, "skin": path.given, "generation": path.generation,
                                              "timeline": path.timeline}))
        messages.append(("set_indexes", {"indexes": self.indexes}))
        up, down = self.queue_numbers(self.index)
        gso_pair = tuple(self.queue_numbers(self.index, gso=True)) if self.gso else None
        messages.append(("bind", {"up": up, "down": down, "vms": max(self.room_vms, len(self.vm_args)),
                                  "gso_pair": gso_pair}))
        return messages

    def start_blocking(self, messages: list[tuple[str, dict]]) -> None:
        """Start the process and bring it to serving its queues with ``messages`` (``_replay``,
        read in the daemon's thread); blocking: at start-up, or in a thread on a restart."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        package_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "interceptor.shards", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        ours.settimeout(START_TIMEOUT_S)
        try:
            for seq, (command, args) in enumerate(messages):
                ours.sendall(_encode((-1 - seq, command, args)))
                _, ok, value = _receive_blocking(ours)
                if not ok:
                    raise WorkerGone(f"{command}: {value}")
        except (OSError, WorkerGone) as exc:
            ours.close()
            self.process.kill()
            self.process.wait()
            raise WorkerGone(f"engine worker {self.index} did not start: {exc}") from exc
        ours.settimeout(None)
        ours.setblocking(False)
        self._sock = ours
        self.alive = True
        log.info("engine worker %d: pid %d, %d VM(s), queues %d/%d", self.index, self.process.pid,
                 len(self.vm_args), *self.queue_numbers(self.index))

    async def serve(self) -> None:
        """Talk to the process; when it dies, start another with the same state."""
        failures = 0
        while True:
            self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(self._sock))
            started = time.monotonic()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, self._outbox)
                await self._read()
                nursery.cancel_scope.cancel()
            self.alive = False
            await self._stream.aclose()
            for waiter in self._waiting.values():
                waiter[1:] = [False, "the worker process exited"]
                waiter[0].set()
            self._waiting.clear()
            code = await trio.to_thread.run_sync(self.process.wait)
            if self.stopping:
                return
            self.last_exit = f"status {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
            failures = failures + 1 if time.monotonic() - started < 10 else 1
            log.error("engine worker %d (pid %d) ended (%s); starting it again with its %d VM(s)",
                      self.index, self.process.pid, self.last_exit, len(self.vm_args))
            while True:
                await trio.sleep(RESTART_BACKOFF_S[min(failures - 1, len(RESTART_BACKOFF_S) - 1)])
                # What was sent to the dead process is moot: the new one gets the state whole,
                # then whatever changes after this point, in order.
                self._outbox_send, self._outbox = trio.open_memory_channel(math.inf)
                try:
                    await trio.to_thread.run_sync(self.start_blocking, self._replay())
                    break
                except WorkerGone as exc:
                    log.error("%s", exc)
                    failures += 1
            self.restarts += 1

    async def _write(self, outbox) -> None:
        async for frame in outbox:
            try:
                await self._stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _read(self) -> None:
        reader = _Reader(self._stream)
        while True:
            try:
                reply = await reader.receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            if reply is None:
                return
            seq, ok, value = reply
            waiter = self._waiting.pop(seq, None)
            if waiter is not None:
                waiter[1:] = [ok, value]
                waiter[0].set()
            elif not ok:
                log.error("engine worker %d: %s", self.index, value)

    def post(self, command: str, **args) -> int:
        """Send without waiting (in order with everything else sent)."""
        seq = next(self._seq)
        self._outbox_send.send_nowait(_encode((seq, command, args)))
        return seq

    async def call(self, command: str, **args) -> Any:
        if not self.alive:
            raise WorkerGone(f"engine worker {self.index} is being started again")
        seq = self.post(command, **args)
        waiter = self._waiting[seq] = [trio.Event(), False, None]
        with trio.move_on_after(CALL_TIMEOUT_S):
            await waiter[0].wait()
        self._waiting.pop(seq, None)
        if not waiter[0].is_set():
            # A worker whose trio side does not answer is wedged (its data path holding the lock,
            # say): killed, so ``serve`` starts it again, as systemd's watchdog would the daemon.
            if self.process is not None and self.process.poll() is None:
                log.error("engine worker %d (pid %d) did not answer %s in %.0f s: killed, to be started again",
                          self.index, self.process.pid, command, CALL_TIMEOUT_S)
                self.process.kill()
            raise WorkerGone(f"engine worker {self.index}: no answer to {command} in {CALL_TIMEOUT_S:.0f} s")
        if not waiter[1]:
            raise WorkerGone(f"engine worker {self.index}: {command}: {waiter[2]}")
        return waiter[2]

    def close(self, timeout_s: float = 3.0) -> None:
        """Stop the process: "stop" and then the end of its socket tell it to release what it
        holds and close its queues, as the daemon does; killed if it has not within ``timeout_s``."""
        self.stopping = True
        if self._sock is not None:
            try:
                self._sock.setblocking(True)
                self._sock.settimeout(timeout_s)
                self._sock.sendall(_encode((0, "stop", {})))
            except OSError:
                pass  # gone already: it has nothing left to release
            self._sock.close()
        if self.process is not None:
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.error("engine worker %d did not stop in %.0f s: killed", self.index, timeout_s)
                self.process.kill()
                self.process.wait()


class Shards:
    """Every engine worker, seen by the daemon as one shell: ``paths``, ``queues`` and
    ``interfaces`` hold every VM. ``isolate``: every worker is a child process (``local``, this
    process's ``Shell``, binds no queue); otherwise, and always with a shared uplink, worker 0's
    ``Shell`` runs in this process."""

    def __init__(self, *, workers: int, queue_numbers: Callable[..., tuple[int, int]], gso: bool,
                 shared_uplink: bool, nice: int = 0, isolate: bool = False, **shell_options) -> None:
        self.local = Shell(**shell_options)
        self.count = 1 if shared_uplink else workers
        self.isolated = isolate and not shared_uplink
        self.queue_numbers = queue_numbers
        self.gso = gso
        remote_options = {key: value for key, value in shell_options.items() if key != "host_uplink_kbps"}
        first_remote = 0 if self.isolated else 1
        self.remotes = [RemoteWorker(k, remote_options, nice, queue_numbers, gso)
                        for k in range(first_remote, self.count)]
        self._shadows = Engine()  # the remote VMs' shadow paths: never see a packet
        self.paths: dict[str, Any] = {}
        self.queues: dict[str, tuple[int, int]] = {}
        self.interfaces: dict[str, str] = {}
        self.worker_of: dict[str, int] = {}
        self._indexes: dict[str, int] | None = None
        self.fault_injection = self.local.fault_injection
        self.uplink_queue_limit_ns = self.local.uplink_queue_limit_ns

    # the local shell's parts the daemon reads directly
    @property
    def link(self):
        return self.local.link

    @property
    def classifier(self):
        return self.local.classifier

    @property
    def lock(self):
        """Worker 0's data-path lock: held while reading or changing its engine's state."""
        return self.local.lock

    @property
    def indexes_wanted(self) -> trio.Event:
        return self.local.indexes_wanted

    @indexes_wanted.setter
    def indexes_wanted(self, event: trio.Event) -> None:
        self.local.indexes_wanted = event

    def _is_local(self, worker: int) -> bool:
        return worker == 0 and not self.isolated

    def _remote(self, worker: int) -> RemoteWorker:
        return self.remotes[worker if self.isolated else worker - 1]

    def place(self, name: str) -> int:
        """The worker a new VM goes to: the one with the fewest VMs (0 on a tie)."""
        counts = [0] * self.count
        for worker in self.worker_of.values():
            counts[worker] += 1
        return counts.index(min(counts))

    def add_vm(self, name: str, interface: str, uplink_queue: int, downlink_queue: int,
               addresses: tuple = (), worker: int = 0):
        if self._is_local(worker):
            path = self.local.add_vm(name, interface, uplink_queue, downlink_queue, addresses=addresses)
        else:
            remote = self._remote(worker)
            path = remote.paths[name] = RemotePath(self._shadows.add_vm(name), remote)
            remote.vm_args[name] = (interface, uplink_queue, downlink_queue, tuple(addresses))
            if remote.process is not None:
                remote.post("add_vm", name=name, interface=interface, up=uplink_queue, down=downlink_queue,
                            addresses=tuple(addresses))
        self.paths[name] = path
        self.queues[name] = (uplink_queue, downlink_queue)
        self.interfaces[name] = interface
        self.worker_of[name] = worker
        return path

    def remove_vm(self, name: str) -> None:
        worker = self.worker_of.pop(name)
        if self._is_local(worker):
            self.local.remove_vm(name)
        else:
            remote = self._remote(worker)
            remote.paths.pop(name)
            remote.vm_args.pop(name)
            self._shadows.paths.pop(name, None)
            remote.post("remove_vm", name=name)
        self.paths.pop(name)
        self.queues.pop(name)
        self.interfaces.pop(name)

    def set_skin(self, name: str, skin: CompiledSkin, generation: int, timeline=None) -> None:
        """Swap ``name``'s skin: in force in worker 0 on return, sent to any other worker
        (``settle`` waits for it there)."""
        if self._is_local(self.worker_of[name]):
            self.local.set_skin(name, skin, generation, timeline)
        else:
            self.paths[name].set_skin(skin, generation, timeline)

    def set_queues(self, name: str, uplink_queue: int, downlink_queue: int) -> None:
        self.queues[name] = (uplink_queue, downlink_queue)
        worker = self.worker_of[name]
        if self._is_local(worker):
            self.local.set_queues(name, uplink_queue, downlink_queue)
        else:
            remote = self._remote(worker)
            interface, _, _, addresses = remote.vm_args[name]
            remote.vm_args[name] = (interface, uplink_queue, downlink_queue, addresses)

    def bind(self, vms: int | None = None) -> None:
        """Bind worker 0's queues here (unless isolated) and start the child workers, each bound before it returns
        (blocking: called before the data path runs)."""
        if not self.isolated:
            up, down = self.queue_numbers(0)
            self.local.bind(up, down, vms=vms, gso_pair=tuple(self.queue_numbers(0, gso=True)) if self.gso else None)
        for remote in self.remotes:
            remote.room_vms = vms or 0
            remote.indexes = dict(self._indexes or {})
            remote.start_blocking(remote._replay())

    def set_indexes(self, indexes: dict[str, int]) -> bool:
        changed = self.local.set_indexes(indexes)
        if indexes != self._indexes:
            self._indexes = dict(indexes)
            for remote in self.remotes:
                remote.indexes = dict(indexes)
                if remote.process is not None:
                    remote.post("set_indexes", indexes=remote.indexes)
        return changed

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if not self.isolated:  # isolated, the local shell has no queue: no data-path thread
                await nursery.start(self.local.run)
            for remote in self.remotes:
                nursery.start_soon(remote.serve)
            task_status.started()

    async def settle(self, name: str) -> None:
        """Return once everything sent to ``name``'s worker is in force there."""
        worker = self.worker_of.get(name, 0)
        if not self._is_local(worker):
            try:
                await self._remote(worker).call("ping")
            except WorkerGone as exc:  # a restarted worker gets the state whole
                log.warning("vm %s: %s", name, exc)

    async def refresh(self) -> None:
        """Take every worker's counters (a failed worker keeps its last report)."""
        for remote in self.remotes:
            if not remote.paths and remote.report.get("held", 0) == 0:
                continue
            try:
                report = await remote.call("snapshot")
            except WorkerGone:
                continue
            remote.report = report
            for name, entry in report["vms"].items():
                path = remote.paths.get(name)
                if path is not None:
                    path.take_report(entry)

    def inject_faults(self, name: str, count: int) -> None:
        worker = self.worker_of[name]
        if self._is_local(worker):
            self.local.faults[name] = count
        else:
            self._remote(worker).post("fault", name=name, count=count)

    @property
    def errors(self) -> dict[str, int]:
        out = dict(self.local.errors)
        for remote in self.remotes:
            for name, path in remote.paths.items():
                out[name] = path.errors
        return out

    @property
    def held_packets(self) -> int:
        return self.local.held_packets + sum(remote.report.get("held", 0) for remote in self.remotes)

    @property
    def unclassified(self) -> int:
        return self.local.unclassified + sum(remote.report.get("unclassified", 0) for remote in self.remotes)

    def workers_status(self) -> list[dict]:
        out = [] if self.isolated else [
            {"worker": 0, "pid": os.getpid(), "vms": sum(1 for w in self.worker_of.values() if w == 0),
             "restarts": 0, "last_exit": None}]
        for remote in self.remotes:
            out.append({"worker": remote.index, "pid": remote.process.pid if remote.process else None,
                        "vms": len(remote.paths), "restarts": remote.restarts, "last_exit": remote.last_exit})
        return out

    def release_all(self) -> int:
        return self.local.release_all()

    def close(self) -> None:
        self.local.close()
        for remote in self.remotes:
            remote.close()


# -- the worker process ----------------------------------------------------------------------

def _worker_commands(shell_box: list, nursery: trio.Nursery) -> dict[str, Callable]:
    sent: dict[str, tuple] = {}  # each VM's activity marks when the last snapshot carried it

    def init(options: dict, nice: int, label: str):
        logging.basicConfig(level=logging.INFO, format=f"netskin-interceptor {label}: %(message)s")
        if nice:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, nice)
            except OSError:
                pass
        shell_box.append(Shell(**options))

    def add_vm(name, interface, up, down, addresses):
        shell_box[0].add_vm(name, interface, up, down, addresses=addresses)

    def remove_vm(name):
        shell_box[0].remove_vm(name)
        sent.pop(name, None)

    def set_skin(name, skin, generation, timeline):
        shell_box[0].set_skin(name, skin, generation, timeline)

    def set_indexes(indexes):
        shell_box[0].set_indexes(indexes)

    def bind(up, down, vms, gso_pair):
        shell = shell_box[0]
        shell.bind(up, down, vms=vms, gso_pair=gso_pair)
        # As the daemon does for worker 0: what lives for the process's lifetime leaves the
        # collector's sight, so collections stay short on the hot path.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        nursery.start_soon(shell.run)
        nursery.start_soon(_watch_indexes, shell)

    def snapshot():
        """The VMs whose counters moved since the last snapshot (an idle VM costs the daemon
        nothing: it keeps the report it has). Whether a VM moved is told by its pipes' activity
        marks and error count, so an idle VM costs a tuple compare here, not a copy of its
        counters under the data path's lock."""
        shell = shell_box[0]
        vms = {}
        errors = shell.errors
        with shell.lock:
            for name, path in shell.paths.items():
                mark = path.uplink.activity(), path.downlink.activity(), errors.get(name, 0)
                if sent.get(name) == mark:
                    continue
                sent[name] = mark
                up, down = path.uplink.take_samples(), path.downlink.take_samples()
                vms[name] = {"uplink": path.uplink.snapshot(), "downlink": path.downlink.snapshot(),
                             "dns": dict(path.dns_answers), "icmp": path.icmp_sent, "errors": mark[2],
                             "samples_up": up, "samples_down": down}
        return {"vms": vms, "held": shell.held_packets, "unclassified": shell.unclassified}

    def fault(name, count):
        shell_box[0].faults[name] = count

    def ping():
        return True

    return {f.__name__: f for f in (init, add_vm, remove_vm, set_skin, set_indexes, bind, snapshot, fault,
                                     ping)}


async def _watch_indexes(shell: Shell) -> None:
    """A packet of an unknown device: read the interface indexes again (a recreated tap)."""
    while True:
        await shell.indexes_wanted.wait()
        shell.indexes_wanted = trio.Event()
        shell.set_indexes({name: index for index, name in socket.if_nameindex()})
        await trio.sleep(0.2)


async def _serve(fd: int) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=fd)
    stream = trio.SocketStream(sock)
    reader = _Reader(stream)
    shell_box: list[Shell] = []
    stopping = False
    try:
        async with trio.open_nursery() as nursery:
            commands = _worker_commands(shell_box, nursery)
            while True:
                message = await reader.receive()
                if message is None:  # the daemon is gone
                    break
                seq, command, args = message
                if command == "stop":  # the daemon's own clean stop: release, as it does
                    stopping = True
                    continue
                try:
                    reply = (seq, True, commands[command](**args))
                except Exception as exc:  # noqa: BLE001 - reported to the daemon, the worker goes on
                    logging.getLogger("netskin.shards").exception("%s failed", command)
                    reply = (seq, False, f"{type(exc).__name__}: {exc}")
                await stream.send_all(_encode(reply))
            nursery.cancel_scope.cancel()
    finally:
        # Held packets leave early only on the daemon's stop. A daemon that died without one (a
        # SIGKILL, a crash) leaves them to the kernel, which drops them with the queue, as it
        # does a crashed daemon's own: released early they would have passed without their delay.
        if shell_box:
            if stopping:
                shell_box[0].release_all()
            shell_box[0].close()


def main(argv: list[str]) -> int:
    # A stop (systemd's SIGTERM to the whole unit, Ctrl-C to the process group) is the daemon's
    # to carry out: it sends "stop" and closes this worker's socket after its own clean-up, and
    # the worker then releases what it holds. A killed daemon's socket ends with no "stop": the
    # worker closes its queues and the kernel drops what it held.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    trio.run(_serve, int(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
