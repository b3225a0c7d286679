"""Measuring what a VM of the demo lab experiences: ping, UDP echo probes and iperf3.

Shared by `netskin demo`, the benchmarks and the end-to-end tests. Every probe runs from
inside a lab VM's namespace towards the lab's inet sinks, so no traffic leaves the lab.
"""

from __future__ import annotations

import errno
import json
import re
import select
import socket
import statistics
import struct
import time

from manager.lab import Lab

NS_PER_MS = 1_000_000
_PING_REPLY_RE = re.compile(r"icmp_seq=(\d+) .*time=([\d.]+) ms(.*)$")
_PING_SUMMARY_RE = re.compile(r"(\d+) packets transmitted, (\d+) received")
_PROBE_HEADER = struct.Struct("!IQ")  # sequence number, send time in ns


class MeasureError(RuntimeError):
    """A measurement could not be made (tool missing, server busy, unparsable output)."""


def _rtt_summary(rtts_ms: list[float]) -> dict:
    if not rtts_ms:
        return {"rtt_min_ms": None, "rtt_avg_ms": None, "rtt_median_ms": None, "rtt_max_ms": None}
    return {
        "rtt_min_ms": min(rtts_ms),
        "rtt_avg_ms": statistics.fmean(rtts_ms),
        "rtt_median_ms": statistics.median(rtts_ms),
        "rtt_max_ms": max(rtts_ms),
    }


def parse_ping(output: str) -> dict:
    """Sent, received, loss and RTT statistics from iputils ping output (duplicates not counted)."""
    rtts_ms = []
    for line in output.splitlines():
        reply = _PING_REPLY_RE.search(line)
        if reply and "DUP!" not in reply.group(3):
            rtts_ms.append(float(reply.group(2)))
    summary = _PING_SUMMARY_RE.search(output)
    if summary is None:
        raise MeasureError(f"no ping summary in output:\n{output[-500:]}")
    sent, received = int(summary.group(1)), int(summary.group(2))
    return {
        "sent": sent,
        "received": received,
        "loss_percent": 100.0 * (sent - received) / sent if sent else 0.0,
        **_rtt_summary(rtts_ms),
        "rtts_ms": rtts_ms,
    }


def ping(lab: Lab, vm: str, target: str, count: int = 10, interval: float = 0.2, *,
         size: int | None = None, wait_s: float = 5.0, dont_fragment: bool = False) -> dict:
    """Ping target from a VM; see parse_ping for the keys. wait_s bounds the wait for late replies.

    dont_fragment (-M do) makes a packet larger than the path MTU fail instead of fragmenting."""
    argv = ["ping", "-6" if ":" in target else "-4", "-n", "-c", count, "-i", interval, "-W", wait_s]
    if size is not None:
        argv += ["-s", size]
    if dont_fragment:
        argv += ["-M", "do"]
    done = lab.exec(vm, [*argv, target], timeout=count * interval + wait_s + 30)
    if done.returncode not in (0, 1):  # 1: some or all replies missing, which is a measurement
        raise MeasureError(f"ping {target} from {vm} failed ({done.returncode}): {done.stderr.strip()}")
    return parse_ping(done.stdout)


def udp_probe(lab: Lab, vm: str, target: str | None = None, port: int | None = None, *,
              count: int = 100, rate_pps: float = 100.0, payload_bytes: int = 64,
              timeout_s: float = 2.0, warm_up: bool = False) -> dict:
    """Send count numbered datagrams at rate_pps to the inet UDP echo and match the echoes.

    Loss is round-trip: an echo cannot tell which direction dropped a datagram. `reordered`
    counts echoes that arrived after an echo of a later datagram.

    warm_up first sends unnumbered datagrams from the same socket until one is echoed (up to
    timeout_s): an echo server that forks a child per peer (the guests' socat) is not listening
    for a moment after a new peer's first datagram, and that moment is not the path's loss.
    """
    target = target or lab.inet_address
    port = port or lab.echo_port
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    payload_bytes = max(payload_bytes, _PROBE_HEADER.size)
    padding = bytes(payload_bytes - _PROBE_HEADER.size)
    interval_ns = int(1e9 / rate_pps)

    sock = lab.socket(vm, family, socket.SOCK_DGRAM)
    rtts_ms: dict[int, float] = {}
    duplicates = reordered = errors = 0
    highest_seq = -1
    try:
        sock.connect((target, port))
        if warm_up:
            _warm_up(sock, padding, timeout_s)
        sock.setblocking(False)
        start_ns = time.monotonic_ns()
        sent = 0
        give_up_ns = None
        while True:
            now_ns = time.monotonic_ns()
            while sent < count and now_ns >= start_ns + sent * interval_ns:
                try:
                    sock.send(_PROBE_HEADER.pack(sent, time.monotonic_ns()) + padding)
                except OSError as exc:  # a skin's firewall may reject: count, keep the schedule
                    if exc.errno not in (errno.ECONNREFUSED, errno.EPERM, errno.EHOSTUNREACH, errno.ENETUNREACH):
                        raise
                    errors += 1
                sent += 1
            if sent == count and give_up_ns is None:
                give_up_ns = now_ns + int(timeout_s * 1e9)
            if give_up_ns is not None and (len(rtts_ms) == count or now_ns >= give_up_ns):
                break
            next_ns = give_up_ns if sent == count else start_ns + sent * interval_ns
            readable, _, _ = select.select([sock], [], [], max(0, next_ns - now_ns) / 1e9)
            while readable:
                try:
                    reply = sock.recv(65535)
                except BlockingIOError:
                    break
                except ConnectionRefusedError:
                    errors += 1
                    continue
                received_ns = time.monotonic_ns()
                if len(reply) < _PROBE_HEADER.size:
                    continue
                seq, sent_ns = _PROBE_HEADER.unpack_from(reply)
                if seq >= count:  # a late echo of a warm-up datagram
                    continue
                if seq in rtts_ms:
                    duplicates += 1
                    continue
                rtts_ms[seq] = (received_ns - sent_ns) / NS_PER_MS
                if seq < highest_seq:
                    reordered += 1
                highest_seq = max(highest_seq, seq)
    finally:
        sock.close()
    return {
        "sent": count,
        "received": len(rtts_ms),
        "loss_percent": 100.0 * (count - len(rtts_ms)) / count,
        "duplicates": duplicates,
        "reordered": reordered,
        "errors": errors,
        **_rtt_summary(list(rtts_ms.values())),
    }


_WARM_UP_SEQ = 0xFFFFFFFF
_IPERF3_ATTEMPTS = 10


def _warm_up(sock: socket.socket, padding: bytes, timeout_s: float) -> bool:
    """Send a warm-up datagram every 0.2 s until one is echoed; False if none was in timeout_s."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            sock.send(_PROBE_HEADER.pack(_WARM_UP_SEQ, 0) + padding)
        except OSError:
            pass
        answer_by = time.monotonic() + min(0.2, left)
        while (wait := answer_by - time.monotonic()) > 0:
            sock.settimeout(wait)
            try:
                reply = sock.recv(65535)
            except (TimeoutError, OSError):
                break
            if len(reply) >= _PROBE_HEADER.size and _PROBE_HEADER.unpack_from(reply)[0] == _WARM_UP_SEQ:
                return True
    return False


def iperf3(lab: Lab, vm: str, port: int | None = None, reverse: bool = False, udp: bool = False,
           rate: int | str | None = None, seconds: float = 3.0, *, target: str | None = None) -> float:
    """Throughput in bit/s measured by the receiving end (the VM when reverse, else the inet server).

    rate is iperf3's -b (bit/s, or "10M"); iperf3 defaults to 1 Mbit/s for UDP and unlimited for TCP.
    """
    port = port or lab.iperf3_ports[0]
    target = target or lab.inet_address
    argv = ["iperf3", "--json", "-c", target, "-p", port, "-t", seconds, "--connect-timeout", 3000]
    if reverse:
        argv.append("-R")
    if udp:
        argv.append("-u")
    if rate is not None:
        argv += ["-b", rate]
    # iperf3 -s serves one test at a time and reopens its socket after each: a test that starts
    # while the last one is still winding down (slow under a skin) is refused, reset or told "busy".
    for attempt in range(_IPERF3_ATTEMPTS):
        done = lab.exec(vm, argv, timeout=seconds + 30)
        try:
            report = json.loads(done.stdout)
        except json.JSONDecodeError:
            raise MeasureError(f"iperf3 from {vm} to {target}:{port} gave no JSON ({done.returncode}): "
                               f"{done.stderr.strip() or done.stdout[-300:]}") from None
        error = report.get("error")  # iperf3 exits 0 on some errors; the report says so
        if error is None:
            break
        if not any(word in error for word in ("refused", "reset", "busy")) or attempt == _IPERF3_ATTEMPTS - 1:
            raise MeasureError(f"iperf3 from {vm} to {target}:{port}: {error}")
        time.sleep(0.5)
    end = report["end"]
    received = end.get("sum_received") or end.get("sum")
    if not received:
        raise MeasureError(f"iperf3 from {vm} to {target}:{port}: no summary in report")
    return float(received["bits_per_second"])
