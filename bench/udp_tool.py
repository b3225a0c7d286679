"""The benchmark's UDP traffic: a reflector, an RTT prober, a paced one-way sender and a counter.

Runs as its own process inside a lab namespace (``ip netns exec NS python -m bench.udp_tool ...``)
and prints one JSON object on stdout when done. Receive times are the kernel's (SO_TIMESTAMPNS,
CLOCK_REALTIME), so a late wake-up of this process does not show up as network delay; send times
are taken with the same clock just before ``send`` and, with ``--tx-stamps``, by the kernel as the
datagram enters the device layer, so a wait of the sender between the two does not either.

    udp_tool reflect 10.77.0.2:9100
    udp_tool rtt 10.77.0.2:9100 --rate 1000 --seconds 3
    udp_tool count 10.77.0.2:9101 --idle 1.0 --timeout 30     (prints "ready" first)
    udp_tool send 10.77.0.2:9101 --count 10000 --rate 5000 --size 64 [--tx-stamps]
"""

from __future__ import annotations

import argparse
import array
import json
import resource
import select
import signal
import socket
import struct
import sys
import time

HEADER = struct.Struct("!IQ")  # sequence number, send time (ns, CLOCK_REALTIME)
TIMESPEC = struct.Struct("@qq")
IPV4_UDP_OVERHEAD_BYTES = 28  # what a UDP payload gains on the wire as an IPv4 packet
BUFFER_BYTES = 8 << 20
SO_TIMESTAMPNS = 35  # Linux (asm-generic); the socket module does not export it
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
_CMSG_SPACE = socket.CMSG_SPACE(TIMESPEC.size)


SO_TIMESTAMPING = 37  # Linux (asm-generic)
SOF_TIMESTAMPING_SOFTWARE = 1 << 4
SOF_TIMESTAMPING_OPT_ID = 1 << 7
SOF_TIMESTAMPING_TX_SCHED = 1 << 8
SOF_TIMESTAMPING_OPT_TSONLY = 1 << 11
SCM_TSTAMP_SCHED = 1
IP_RECVERR = 11
EXTENDED_ERR = struct.Struct("@IBBBBII")  # struct sock_extended_err: ..., ee_info, ee_data


class TxStamps:
    """The kernel's stamp of each datagram sent on ``sock`` as it enters the device layer
    (SCM_TSTAMP_SCHED, CLOCK_REALTIME): when the packet leaves the sender, after any wait of the
    sender's between reading its clock and the send. Stamps are keyed by send call, from 0."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING,
                        SOF_TIMESTAMPING_TX_SCHED | SOF_TIMESTAMPING_SOFTWARE
                        | SOF_TIMESTAMPING_OPT_ID | SOF_TIMESTAMPING_OPT_TSONLY)
        self.sock = sock
        self.ns = array.array("q")  # by key; -1: no stamp came back

    def drain(self) -> None:
        """Take every stamp waiting on the socket's error queue."""
        while True:
            try:
                _, ancdata, _, _ = self.sock.recvmsg(0, 256, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            stamp = key = None
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPING:
                    seconds, nanoseconds = TIMESPEC.unpack_from(data)
                    stamp = seconds * 1_000_000_000 + nanoseconds
                elif level == socket.SOL_IP and kind == IP_RECVERR:
                    _, _, _, _, _, info, data_ = EXTENDED_ERR.unpack_from(data)
                    key = data_ if info == SCM_TSTAMP_SCHED else None
            if stamp is not None and key is not None:
                if key >= len(self.ns):
                    self.ns.extend([-1] * (key + 1 - len(self.ns)))
                self.ns[key] = stamp


def _address(spec: str) -> tuple[str, int]:
    host, _, port = spec.rpartition(":")
    return host, int(port)


def _socket(timestamps: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # The FORCE variants let root exceed rmem_max/wmem_max, which are not settable per netns here.
    for option, forced in ((socket.SO_RCVBUF, SO_RCVBUFFORCE), (socket.SO_SNDBUF, SO_SNDBUFFORCE)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, BUFFER_BYTES)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, option, BUFFER_BYTES)
    if timestamps:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    return sock


def _received_ns(ancdata) -> int:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            seconds, nanoseconds = TIMESPEC.unpack_from(data)
            return seconds * 1_000_000_000 + nanoseconds
    return time.time_ns()


def _stop_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def reflect(bind: str) -> None:
    """Echo every datagram back to its sender until SIGTERM (a blocking loop: the least latency)."""
    _stop_on_sigterm()
    sock = _socket()
    sock.bind(_address(bind))
    print("ready", flush=True)
    recvfrom, sendto = sock.recvfrom, sock.sendto
    while True:
        data, peer = recvfrom(65535)
        sendto(data, peer)


def rtt(target: str, rate_pps: float, seconds: float, size: int, grace_s: float) -> dict:
    """Send numbered probes at rate_pps, match the echoes; RTTs in µs (None = no echo)."""
    sock = _socket(timestamps=True)
    sock.connect(_address(target))
    sock.setblocking(False)
    count = max(1, int(rate_pps * seconds))
    padding = bytes(max(0, size - HEADER.size))
    interval_ns = int(1e9 / rate_pps)
    rtt_ns: list[int | None] = [None] * count
    start = time.monotonic_ns()
    sent = 0
    end = None
    while True:
        now = time.monotonic_ns()
        while sent < count and now >= start + sent * interval_ns:
            sock.send(HEADER.pack(sent, time.time_ns()) + padding)
            sent += 1
        if sent == count and end is None:
            end = now + int(grace_s * 1e9)
        if end is not None and now >= end:
            break
        wake = end if sent == count else start + sent * interval_ns
        readable, _, _ = select.select([sock], [], [], max(0, wake - now) / 1e9)
        while readable:
            try:
                data, ancdata, _, _ = sock.recvmsg(2048, _CMSG_SPACE)
            except BlockingIOError:
                break
            if len(data) >= HEADER.size:
                seq, sent_ns = HEADER.unpack_from(data)
                if seq < count and rtt_ns[seq] is None:
                    rtt_ns[seq] = _received_ns(ancdata) - sent_ns
    return {"sent": count, "start_monotonic_ns": start, "interval_ns": interval_ns,
            "rtt_us": [None if v is None else v / 1000 for v in rtt_ns]}


def send(target: str, count: int, rate_pps: float, size: int, tx_stamps: bool = False) -> dict:
    """Send count numbered datagrams of size payload bytes, paced at rate_pps (batched per tick).

    ``tx_stamps``: also report each datagram's kernel send stamp (``TxStamps``; "tx_ns", by
    sequence number, -1 where none came back), and stop on SIGTERM with the result so far."""
    sock = _socket()
    sock.connect(_address(target))
    stamps = TxStamps(sock) if tx_stamps else None
    if stamps:
        _stop_on_sigterm()
    padding = bytes(max(0, size - HEADER.size))
    interval_s = 1.0 / rate_pps
    min_sleep_s = 0.0002  # above 5k pps send small batches instead of sleeping per packet
    pack, send_ = HEADER.pack, sock.send
    errors = 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.monotonic()
    sent = 0
    try:
        while sent < count:
            due = min(count, int((time.monotonic() - start) * rate_pps) + 1)
            while sent < due:
                try:
                    send_(pack(sent, time.time_ns()) + padding)
                except OSError:  # ENOBUFS and the like: the datagram is lost before the path under test
                    errors += 1
                sent += 1
            if stamps:
                stamps.drain()
            next_s = start + sent * interval_s
            delay = next_s - time.monotonic()
            if delay > 0:
                time.sleep(max(delay, min_sleep_s))
    except SystemExit:
        if not stamps:
            raise
    if stamps:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the result is on its way
    elapsed = time.monotonic() - start
    # CPU of the send loop alone (no start-up): in the kernel, a datagram's way up to the queue
    # (its PREROUTING, steering rules included) runs in the softirq of its send call.
    after = resource.getrusage(resource.RUSAGE_SELF)
    result = {"sent": sent, "send_errors": errors, "seconds": elapsed, "size": size,
              "kernel_s": after.ru_stime - usage.ru_stime, "user_s": after.ru_utime - usage.ru_utime}
    if stamps:
        time.sleep(0.01)  # the last datagrams' stamps
        stamps.drain()
        # The kernel numbers send calls; with no failed send that is the sequence number.
        result["tx_ns"] = stamps.ns.tolist() if not errors else []
    return result


def datagrams(bind: str, idle_s: float, timeout_s: float, bufsize: int = 65535):
    """The receivers' loop: bind ``bind`` ("host:port"), say "ready", then yield (payload, kernel
    arrival ns) of each datagram until idle_s passes with none (after the first) or timeout_s in all."""
    _stop_on_sigterm()
    sock = _socket(timestamps=True)
    sock.bind(_address(bind))
    print("ready", flush=True)
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        now = time.monotonic()
        limit = deadline if last is None else min(deadline, last + idle_s)
        if now >= limit:
            return
        if not select.select([sock], [], [], limit - now)[0]:
            continue
        data, ancdata, _, _ = sock.recvmsg(bufsize, _CMSG_SPACE)
        last = time.monotonic()
        yield data, _received_ns(ancdata)


def count(bind: str, idle_s: float, timeout_s: float, warmup_s: float) -> dict:
    """Count datagrams until idle_s passes with none (after the first) or timeout_s in all.

    Reports distinct sequence numbers (for loss), and the receive rate in IP bits/s over the
    packets that arrived after ``warmup_s``: bytes after the first of them divided by the time
    from the first to the last, which needs no agreement with the sender about start and end.
    """
    seen = bytearray()
    arrivals = array.array("q")
    sizes = array.array("i")
    duplicates = 0
    for data, arrived_ns in datagrams(bind, idle_s, timeout_s):
        arrivals.append(arrived_ns)
        sizes.append(len(data) + IPV4_UDP_OVERHEAD_BYTES)
        if len(data) >= HEADER.size:
            seq = HEADER.unpack_from(data)[0]
            if seq >= len(seen):
                seen.extend(bytes(seq + 1 - len(seen) + 4096))
            if seen[seq]:
                duplicates += 1
            seen[seq] = 1
    received = sum(seen)
    result = {"received": received, "duplicates": duplicates, "datagrams": len(arrivals),
              "ip_bytes": sum(sizes), "ip_bits_per_second": None, "window_s": 0.0}
    if arrivals:
        first_ns = arrivals[0] + int(warmup_s * 1e9)
        window = [i for i, t in enumerate(arrivals) if t >= first_ns]
        if len(window) >= 2:
            span_ns = arrivals[window[-1]] - arrivals[window[0]]
            bits = 8 * sum(sizes[i] for i in window[1:])
            if span_ns > 0:
                result["ip_bits_per_second"] = bits * 1e9 / span_ns
                result["window_s"] = span_ns / 1e9
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.udp_tool", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("reflect")
    p.add_argument("bind")
    p = sub.add_parser("rtt")
    p.add_argument("target")
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--grace", type=float, default=1.0)
    p = sub.add_parser("send")
    p.add_argument("target")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--tx-stamps", action="store_true",
                   help="report each datagram's kernel send stamp; SIGTERM ends the run with its result")
    p = sub.add_parser("count")
    p.add_argument("bind")
    p.add_argument("--idle", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--warmup", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.cmd == "reflect":
        reflect(args.bind)
        return 0
    if args.cmd == "rtt":
        result = rtt(args.target, args.rate, args.seconds, args.size, args.grace)
    elif args.cmd == "send":
        result = send(args.target, args.count, args.rate, args.size, args.tx_stamps)
    else:
        result = count(args.bind, args.idle, args.timeout, args.warmup)
    json.dump(result, sys.stdout)
    print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
