"""Recording a run for ``netskin demo --timeline`` and ``netskin plot``.

From the lab's first VM: a UDP echo probe to the internet namespace (``probe_pps`` a second: each
probe's RTT, or lost), a paced UDP stream from the internet namespace to the VM whose arrivals
are counted per ``bin_s`` (throughput), and the daemon's status polled for the timeline's step,
each change placed at the instant the previous poll predicted (``next_change_in_ms``). One loop,
one process, sockets opened inside the namespaces.
"""

from __future__ import annotations

import errno
import secrets
import select
import socket
import struct
import time
from collections.abc import Callable

from manager.lab import Lab
from manager.plot import Recording

_PROBE = struct.Struct("!IQ")  # sequence number, send time (CLOCK_REALTIME ns)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # the asm-generic value (x86, arm)
_TIMESPEC = struct.Struct("@qq")
STREAM_PORT = 9410


def record_run(lab: Lab, vm: str, skin: str, seconds: float, status: Callable[[], dict], *,
               probe_pps: float = 50.0, stream_pps: float = 1000.0, stream_bytes: int = 1200,
               bin_s: float = 0.25) -> Recording:
    """Measure ``vm`` for ``seconds`` while its skin ``skin`` (with a timeline) runs."""
    recording = Recording(skin=skin, vm=vm)
    probe = lab.socket(vm, socket.AF_INET, socket.SOCK_DGRAM)
    sender = lab.socket("inet", socket.AF_INET, socket.SOCK_DGRAM)
    receiver = lab.socket(vm, socket.AF_INET, socket.SOCK_DGRAM)
    nonce = secrets.token_bytes(4)
    sent_at: dict[int, float] = {}
    received: dict[int, float] = {}
    arrivals = [0] * (int(seconds / bin_s) + 2)
    try:
        # Arrival times from the kernel, so the RTT does not include this loop's own lateness.
        probe.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        probe.connect((lab.inet_address, lab.echo_port))
        probe.setblocking(False)
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        receiver.bind((lab.vm(vm).address, STREAM_PORT))
        receiver.setblocking(False)
        sender.connect((lab.vm(vm).address, STREAM_PORT))
        sender.setblocking(False)
        payload = nonce + bytes(stream_bytes - 28 - len(nonce))  # IP packet of stream_bytes
        start = time.monotonic_ns()
        end = start + int(seconds * 1e9)
        probes = streamed = 0
        next_poll = start
        step, predicted = None, None
        while True:
            now = time.monotonic_ns()
            if now >= end:
                break
            elapsed = now - start
            while probes < elapsed * probe_pps / 1e9:
                try:
                    probe.send(_PROBE.pack(probes, time.time_ns()) + nonce)
                except OSError as exc:  # an outage may refuse: still counted as sent and lost
                    if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                        raise
                sent_at[probes] = (time.monotonic_ns() - start) / 1e9
                probes += 1
            while streamed < elapsed * stream_pps / 1e9:
                try:
                    sender.send(payload)
                except (BlockingIOError, ConnectionRefusedError):
                    pass
                streamed += 1
            if now >= next_poll:
                timeline = (status().get(vm) or {}).get("timeline") or {}
                polled = (time.monotonic_ns() - start) / 1e9
                if timeline.get("step") is not None and timeline.get("step") != step:
                    when = predicted if (predicted is not None and step is not None) else polled
                    recording.steps.append((round(min(when, polled), 4), int(timeline["step"]),
                                            f"step {timeline['step']}"))
                    step = timeline.get("step")
                if timeline.get("next_change_in_ms") is not None:
                    predicted = polled + timeline["next_change_in_ms"] / 1000
                next_poll = now + 100_000_000
            readable, _, _ = select.select([probe, receiver], [], [], 0.002)
            for sock in readable:
                _drain(sock, start, sent_at, received, arrivals, bin_s, nonce)
        settle = time.monotonic() + 1.0
        while time.monotonic() < settle:
            readable, _, _ = select.select([probe, receiver], [], [], 0.05)
            for sock in readable:
                _drain(sock, start, sent_at, received, arrivals, bin_s, nonce, late=sock is receiver)
    finally:
        for sock in (probe, sender, receiver):
            sock.close()
    recording.probes = [(round(t, 4), received.get(seq)) for seq, t in sorted(sent_at.items())]
    bits = stream_bytes * 8
    recording.throughput = [(round((i + 1) * bin_s, 4), count * bits / bin_s / 1000)
                            for i, count in enumerate(arrivals[: int(seconds / bin_s)])]
    return recording


def _drain(sock, start: int, sent_at: dict, received: dict, arrivals: list, bin_s: float, nonce: bytes,
           late: bool = False) -> None:
    while True:
        try:
            data, ancdata, _flags, _addr = sock.recvmsg(65535, socket.CMSG_SPACE(_TIMESPEC.size))
        except (BlockingIOError, ConnectionRefusedError):
            return
        now = time.monotonic_ns()
        if len(data) >= _PROBE.size + len(nonce) and data[_PROBE.size:_PROBE.size + len(nonce)] == nonce:
            arrived = time.time_ns()
            for level, kind, value in ancdata:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    seconds, nanoseconds = _TIMESPEC.unpack_from(value)
                    arrived = seconds * 1_000_000_000 + nanoseconds
            seq, sent_ns = _PROBE.unpack_from(data)
            if seq in sent_at and seq not in received:
                received[seq] = round((arrived - sent_ns) / 1e6, 3)
        elif data[: len(nonce)] == nonce and not late:
            index = int((now - start) / 1e9 / bin_s)
            if index < len(arrivals):
                arrivals[index] += 1
