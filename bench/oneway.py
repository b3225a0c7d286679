"""One-way UDP probes between two lab namespaces, for end-to-end tests of a single direction.

The UDP echo sink cannot tell which direction lost or delayed a datagram; here the sender and
the receiver are both sockets of this process (created inside their namespaces), so every
datagram is counted by its sequence number where it lands, and since both ends read the same
clock, its one-way delay is exact: send time in the payload, arrival time from the kernel
(SO_TIMESTAMPNS), so a late wake-up of this loop does not count as network delay.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from dataclasses import dataclass, field

from manager.lab import Lab

_HEADER = struct.Struct("!IQ")  # sequence number, send time (CLOCK_REALTIME, ns)
# Not exported by Python's socket module; the asm-generic value (x86, arm).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")
RECEIVER_PORT = 9400


@dataclass
class OneWay:
    """What arrived of ``sent`` numbered datagrams: sequence numbers in arrival order, delays."""

    sent: int
    arrivals: list[int] = field(default_factory=list)
    delays_ms: dict[int, float] = field(default_factory=dict)  # seq -> one-way delay
    duplicates: int = 0

    @property
    def received(self) -> int:
        return len(self.delays_ms)

    @property
    def lost(self) -> int:
        return self.sent - self.received

    @property
    def reordered(self) -> int:
        """Arrivals after a datagram with a higher sequence number had already arrived."""
        count, highest = 0, -1
        for seq in self.arrivals:
            if seq < highest:
                count += 1
            highest = max(highest, seq)
        return count

    def loss_bursts(self) -> list[int]:
        """Lengths of the runs of consecutive missing sequence numbers."""
        bursts, run = [], 0
        for seq in range(self.sent):
            if seq in self.delays_ms:
                if run:
                    bursts.append(run)
                run = 0
            else:
                run += 1
        if run:
            bursts.append(run)
        return bursts


def send(lab: Lab, src: str, dst: str, *, count: int, rate_pps: float, payload_bytes: int = 64,
         settle_s: float = 1.0, port: int = RECEIVER_PORT) -> OneWay:
    """Send ``count`` numbered datagrams from namespace ``src`` to ``dst`` ("inet" or a VM name).

    Paced at ``rate_pps``; after the last one, waits until ``settle_s`` passes with nothing new
    (or everything arrived).
    """
    dst_ns = lab.resolve_ns(dst)
    dst_address = lab.inet_address if dst_ns == lab.inet_ns else lab.vm(dst).address
    padding = bytes(max(payload_bytes, _HEADER.size) - _HEADER.size)
    interval_ns = int(1e9 / rate_pps)
    result = OneWay(sent=count)

    receiver = lab.socket(dst, socket.AF_INET, socket.SOCK_DGRAM)
    sender = lab.socket(src, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        receiver.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        receiver.bind((dst_address, port))
        receiver.setblocking(False)
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sender.connect((dst_address, port))

        def drain() -> bool:
            got = False
            while True:
                try:
                    data, ancdata, _flags, _addr = receiver.recvmsg(2048, socket.CMSG_SPACE(_TIMESPEC.size))
                except BlockingIOError:
                    return got
                arrived_ns = time.time_ns()
                for level, kind, value in ancdata:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        sec, nsec = _TIMESPEC.unpack_from(value)
                        arrived_ns = sec * 1_000_000_000 + nsec
                if len(data) < _HEADER.size:
                    continue
                seq, sent_ns = _HEADER.unpack_from(data)
                got = True
                if seq in result.delays_ms:
                    result.duplicates += 1
                    continue
                result.arrivals.append(seq)
                result.delays_ms[seq] = (arrived_ns - sent_ns) / 1e6

        start_ns = time.monotonic_ns()
        seq = 0
        while seq < count:
            now_ns = time.monotonic_ns()
            while seq < count and now_ns >= start_ns + seq * interval_ns:
                sender.send(_HEADER.pack(seq, time.time_ns()) + padding)
                seq += 1
            drain()
            wait_s = max(0.0, (start_ns + seq * interval_ns - time.monotonic_ns()) / 1e9)
            select.select([receiver], [], [], wait_s)
        quiet_until = time.monotonic() + settle_s
        while result.received < count and time.monotonic() < quiet_until:
            select.select([receiver], [], [], 0.05)
            if drain():
                quiet_until = time.monotonic() + settle_s
    finally:
        sender.close()
        receiver.close()
    return result


# --- statistics ------------------------------------------------------------------------------
