"""Timelines measured from outside the engine: outages on schedule, and a latency ramp followed.

    python -m bench.timeline [--seconds 60]       (a lab of its own; or as rows of bench.run)

Two probes, both sockets of this process made inside the lab's namespaces (``Lab.socket``), with
send times taken just before ``send`` and receive times from the kernel (SO_TIMESTAMPNS), on the
wall clock the timeline's ``start`` is given in:

- outages: a 1000 packets/s one-way UDP stream VM → inet under ``{2 s: nothing, 0.5 s: 100 %
  loss}`` repeated. Each run of lost sequence numbers is an outage; its start is the first lost
  packet's send time, its length reaches the first delivered one after it. Every packet is also
  checked against the schedule computed from ``start``: one handled by the wrong step (lost
  outside an outage or delivered inside one, further than the tolerance from a boundary) counts.
- ramp: RTT probes VM → the lab's UDP echo under ``latency_ms`` 0 → 200 over 10 s. Each probe's
  expected added RTT is half the ramp's value when it crosses the uplink plus half when its echo
  crosses the downlink; the residual is measured − the path's own RTT (measured before, same run)
  − expected.
"""

from __future__ import annotations

import argparse
import json
import select
import shutil
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.stats import median

HEADER = struct.Struct("!IQ")  # sequence number, send time (CLOCK_REALTIME, ns)
TIMESPEC = struct.Struct("@qq")
SO_TIMESTAMPNS = 35
_CMSG_SPACE = socket.CMSG_SPACE(TIMESPEC.size)
MS = 1_000_000
PROBE_PORT = 9410

UP_MS, DOWN_MS = 2000, 500  # the outage timeline's two steps
RAMP_S, RAMP_TO_MS = 10, 200  # the ramp: latency_ms 0 → 200 over 10 s


def outage_skin(start_unix_s: float | None = None) -> dict:
    timeline: dict = {"steps": [{"for": UP_MS / 1000}, {"for": f"{DOWN_MS}ms", "set": {"packet_loss_percent": 100}}],
                      "repeat": "forever"}
    if start_unix_s is not None:
        timeline["start"] = start_unix_s
    return {"name": "timeline-outages", "timeline": timeline}


def ramp_skin(start_unix_s: float | None = None) -> dict:
    timeline: dict = {"steps": [{"for": RAMP_S, "set": {"latency_ms": RAMP_TO_MS}, "ramp": ["latency_ms"]},
                                {"for": 1, "set": {"latency_ms": RAMP_TO_MS}}], "repeat": 1}
    if start_unix_s is not None:
        timeline["start"] = start_unix_s
    return {"name": "timeline-ramp", "timeline": timeline}


def _received_ns(ancdata) -> int:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            seconds, nanoseconds = TIMESPEC.unpack_from(data)
            return seconds * 1_000_000_000 + nanoseconds
    return time.time_ns()


# --- probes ---------------------------------------------------------------------------------------


@dataclass
class Stream:
    sent_ns: list[int]  # send time of each sequence number (wall clock)
    delivered: list[bool]


def one_way_stream(lab, seconds: float, rate_pps: float = 1000, src: str = "vm1", port: int = PROBE_PORT,
                   settle_s: float = 1.0) -> Stream:
    """Numbered datagrams ``src`` → inet at ``rate_pps``; which arrived, and when each was sent."""
    count = int(seconds * rate_pps)
    interval_ns = int(1e9 / rate_pps)
    receiver = lab.socket("inet", socket.AF_INET, socket.SOCK_DGRAM)
    sender = lab.socket(src, socket.AF_INET, socket.SOCK_DGRAM)
    sent_ns = [0] * count
    delivered = [False] * count
    try:
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        receiver.bind((lab.inet_address, port))
        receiver.setblocking(False)
        sender.connect((lab.inet_address, port))

        def drain() -> None:
            while True:
                try:
                    data = receiver.recv(2048)
                except BlockingIOError:
                    return
                if len(data) >= HEADER.size:
                    seq = HEADER.unpack_from(data)[0]
                    if seq < count:
                        delivered[seq] = True

        # Send times are wall-clock ns read once here and advanced by the monotonic clock: the
        # daemon turns a timeline's wall-clock start into a monotonic one when the skin is
        # applied and runs the steps on that, so a wall clock that moves against the monotonic
        # one during the probe (it is stepped or corrected) must not show as a timeline error.
        wall_offset_ns = time.time_ns() - time.monotonic_ns()
        start = time.monotonic_ns()
        seq = 0
        while seq < count:
            now = time.monotonic_ns()
            while seq < count and now >= start + seq * interval_ns:
                at = wall_offset_ns + time.monotonic_ns()
                sent_ns[seq] = at
                sender.send(HEADER.pack(seq, at) + bytes(36))
                seq += 1
            drain()
            select.select([receiver], [], [], max(0.0, (start + seq * interval_ns - time.monotonic_ns()) / 1e9))
        quiet_until = time.monotonic() + settle_s
        while time.monotonic() < quiet_until:
            select.select([receiver], [], [], 0.05)
            drain()
    finally:
        sender.close()
        receiver.close()
    return Stream(sent_ns, delivered)


def rtt_probe(lab, seconds: float, rate_pps: float = 200, src: str = "vm1", grace_s: float = 1.0
              ) -> list[tuple[int, int | None]]:
    """(send time, RTT ns or None) of probes ``src`` → the lab's UDP echo."""
    count = int(seconds * rate_pps)
    interval_ns = int(1e9 / rate_pps)
    sock = lab.socket(src, socket.AF_INET, socket.SOCK_DGRAM)
    sent_ns = [0] * count
    rtt_ns: list[int | None] = [None] * count
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.connect((lab.inet_address, lab.echo_port))
        sock.setblocking(False)
        start = time.monotonic_ns()
        seq = 0
        end = None
        while True:
            now = time.monotonic_ns()
            while seq < count and now >= start + seq * interval_ns:
                at = time.time_ns()
                sent_ns[seq] = at
                sock.send(HEADER.pack(seq, at) + bytes(20))
                seq += 1
            if seq == count and end is None:
                end = now + int(grace_s * 1e9)
            if end is not None and now >= end:
                break
            wake = end if seq == count else start + seq * interval_ns
            readable, _, _ = select.select([sock], [], [], max(0, wake - now) / 1e9)
            while readable:
                try:
                    data, ancdata, _, _ = sock.recvmsg(2048, _CMSG_SPACE)
                except BlockingIOError:
                    break
                if len(data) >= HEADER.size:
                    number, sent = HEADER.unpack_from(data)
                    if number < count and rtt_ns[number] is None:
                        rtt_ns[number] = _received_ns(ancdata) - sent
    finally:
        sock.close()
    return list(zip(sent_ns, rtt_ns))


# --- analysis -----------------------------------------------------------------------------------


def in_outage(t_ns: int, start_ns: int, up_ns: int = UP_MS * MS, down_ns: int = DOWN_MS * MS) -> bool:
    return t_ns >= start_ns and (t_ns - start_ns) % (up_ns + down_ns) >= up_ns


def boundary_distance_ns(t_ns: int, start_ns: int, up_ns: int = UP_MS * MS, down_ns: int = DOWN_MS * MS) -> int:
    phase = (t_ns - start_ns) % (up_ns + down_ns)
    return min(abs(phase - up_ns), phase, up_ns + down_ns - phase)


def outages(stream: Stream, start_ns: int, tolerance_ns: int = MS, up_ns: int = UP_MS * MS,
            down_ns: int = DOWN_MS * MS) -> dict:
    """Outages as the probe saw them against the schedule from ``start_ns``."""
    runs = []  # (first lost seq, first delivered seq after it)
    i, n = 0, len(stream.sent_ns)
    while i < n:
        if not stream.delivered[i]:
            j = i
            while j < n and not stream.delivered[j]:
                j += 1
            if j < n and i > 0:  # only outages seen whole
                runs.append((i, j))
            i = j
        else:
            i += 1
    period_ns = up_ns + down_ns
    found = []
    for first, after in runs:
        begin = stream.sent_ns[first]
        # The outage ended between the last lost packet and the first delivered one: midway.
        end = (stream.sent_ns[after - 1] + stream.sent_ns[after]) // 2
        begin_guess = (stream.sent_ns[first - 1] + begin) // 2
        cycle = round((begin_guess - start_ns - up_ns) / period_ns)
        scheduled = start_ns + cycle * period_ns + up_ns
        found.append({"start_ns": begin_guess, "length_ns": end - begin_guess, "packets": after - first,
                      "start_error_ns": begin_guess - scheduled})
    starts = [o["start_ns"] for o in found]
    periods = [b - a for a, b in zip(starts, starts[1:])]
    wrong_lost = wrong_delivered = boundary = 0
    # A packet handled by the wrong step, by where it was sent: just before a boundary and judged
    # by the step after it (it reached the daemon late: queued in the kernel while the daemon was
    # busy), or after a boundary and judged by the step before it (impossible unless the step
    # clock is wrong: the engine cannot see a packet before it is sent).
    late_ms: list[float] = []
    early_ms: list[float] = []
    for t, ok in zip(stream.sent_ns, stream.delivered):
        if boundary_distance_ns(t, start_ns, up_ns, down_ns) <= tolerance_ns:
            boundary += 1
            continue
        outage = in_outage(t, start_ns, up_ns, down_ns)
        if ok == outage:
            if outage:
                wrong_delivered += 1
            else:
                wrong_lost += 1
            phase = (t - start_ns) % period_ns
            to_next = (up_ns if phase < up_ns else period_ns) - phase
            since_last = phase - (up_ns if phase >= up_ns else 0)
            if to_next <= since_last:
                late_ms.append(to_next / MS)
            else:
                early_ms.append(since_last / MS)
    length_errors = [abs(o["length_ns"] - down_ns) for o in found]
    period_errors = [abs(p - period_ns) for p in periods]
    return {
        "outages": len(found),
        "packets": len(stream.sent_ns),
        "lost": stream.delivered.count(False),
        "period_ms_median": median(periods) / MS if periods else None,
        "period_error_ms_median": median(period_errors) / MS if periods else None,
        "period_error_ms_worst": max(period_errors) / MS if periods else None,
        "length_ms_median": median([o["length_ns"] for o in found]) / MS if found else None,
        "length_error_ms_median": median(length_errors) / MS if found else None,
        "length_error_ms_worst": max(length_errors) / MS if found else None,
        "start_error_ms_median": median([abs(o["start_error_ns"]) for o in found]) / MS if found else None,
        "start_error_ms_worst": max(abs(o["start_error_ns"]) for o in found) / MS if found else None,
        "lost_outside_outages": wrong_lost,
        "judged_by_next_step": len(late_ms),  # sent this long before the boundary: reached the daemon late
        "judged_by_next_step_ms_max": max(late_ms) if late_ms else 0.0,
        "judged_by_previous_step": len(early_ms),  # sent after the boundary: must be 0
        "delivered_inside_outages": wrong_delivered,
        "boundary_packets": boundary,
        "tolerance_ms": tolerance_ns / MS,
    }


def ramp_latency_ms(t_ns: int, start_ns: int) -> float:
    """The asked latency_ms at ``t_ns``: 0 before, rising linearly to RAMP_TO_MS, then held."""
    progress = min(max((t_ns - start_ns) / (RAMP_S * 1e9), 0.0), 1.0)
    return RAMP_TO_MS * progress


def ramp_tracking(samples: list[tuple[int, int | None]], start_ns: int, path_rtt_ms: float) -> dict:
    """Residuals of measured RTT against the asked ramp, over the probes sent during the ramp."""
    residuals = []
    for sent, rtt in samples:
        if rtt is None or not start_ns <= sent < start_ns + RAMP_S * 1_000_000_000:
            continue
        up = ramp_latency_ms(sent, start_ns) / 2
        # The echo meets the downlink about one uplink delay (plus the path) later.
        back_at = sent + int((up + path_rtt_ms / 2) * MS)
        expected = up + ramp_latency_ms(back_at, start_ns) / 2
        residuals.append(rtt / MS - path_rtt_ms - expected)
    absolute = sorted(abs(r) for r in residuals)
    return {
        "probes": len(residuals),
        "residual_ms_median": median(residuals) if residuals else None,
        "abs_residual_ms_median": median(absolute) if absolute else None,
        "abs_residual_ms_p95": absolute[int(0.95 * (len(absolute) - 1))] if absolute else None,
        "abs_residual_ms_worst": absolute[-1] if absolute else None,
        "path_rtt_ms": path_rtt_ms,
    }


# --- the bench rows -------------------------------------------------------------------------------


def measure(lab, request, write_skin, seconds: float = 60.0) -> dict:
    """Both probes against a running daemon: ``request(cmd, **args)`` speaks to its control socket,
    ``write_skin(doc)`` drops a skin into its skins_dir."""
    out: dict = {"seconds": seconds}
    request("revert", vm="vm1")
    # Outages: the timeline starts on the wall clock 1.5 s from now; the probe starts before it.
    start_s = round(time.time() + 1.5, 3)
    write_skin(outage_skin(start_s))
    _apply(request, "timeline-outages")
    stream = one_way_stream(lab, seconds + 1.5)
    out["outages"] = outages(stream, int(start_s * 1e9))
    request("revert", vm="vm1")
    # The ramp: the path's own RTT first, then the ramp from the moment it is applied.
    path = [rtt for _, rtt in rtt_probe(lab, 2.0) if rtt is not None]
    path_rtt_ms = median(path) / MS
    start_s = round(time.time() + 1.5, 3)
    write_skin(ramp_skin(start_s))
    _apply(request, "timeline-ramp")
    samples = rtt_probe(lab, max(0.0, start_s - time.time()) + RAMP_S + 1.0)
    start_ns = round(start_s * 1e9)
    out["ramp"] = ramp_tracking(samples, start_ns, path_rtt_ms)
    request("revert", vm="vm1")
    return out


def _apply(request, name: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:  # a freshly written file is picked up by the daemon's library scan
        try:
            request("apply", vm="vm1", skin=name)
            return
        except Exception:  # noqa: BLE001 - unknown skin until the scan sees it
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def rows(result: dict) -> list[dict]:
    """The summary rows of bench.run: outage start period and length error, ramp tracking."""
    o, r = result["outages"], result["ramp"]
    wrong = o["lost_outside_outages"] + o["delivered_inside_outages"]
    return [
        {"metric": f"timeline outage period (2 s up + 0.5 s 100 % loss, {o['outages']} outages, 1000 pkt/s)",
         "measured": f"median error {o['period_error_ms_median']:.2f} ms, worst {o['period_error_ms_worst']:.2f} ms",
         "goal": "±10 ms", "met": o["period_error_ms_worst"] is not None and o["period_error_ms_median"] <= 10,
         "value": o["period_error_ms_median"]},
        {"metric": "timeline outage length (asked 500 ms)",
         "measured": f"median error {o['length_error_ms_median']:.2f} ms, worst {o['length_error_ms_worst']:.2f} ms",
         "goal": "±10 ms", "met": o["length_error_ms_median"] is not None and o["length_error_ms_median"] <= 10,
         "value": o["length_error_ms_median"]},
        {"metric": "timeline packets handled by the wrong step (beyond ±1 ms of a boundary)",
         "measured": f"{wrong} of {o['packets']}: {o['judged_by_previous_step']} after a boundary, "
                     f"{o['judged_by_next_step']} up to {o['judged_by_next_step_ms_max']:.1f} ms before one "
                     f"({o['boundary_packets']} within ±1 ms)",
         "goal": "0", "met": wrong == 0, "value": wrong},
        {"metric": f"timeline ramp latency_ms 0 → {RAMP_TO_MS} over {RAMP_S} s: RTT tracking",
         "measured": f"median |residual| {r['abs_residual_ms_median']:.2f} ms, p95 {r['abs_residual_ms_p95']:.2f}, "
                     f"worst {r['abs_residual_ms_worst']:.2f} ms",
         "goal": "median ≤ 5 ms", "met": r["abs_residual_ms_median"] is not None and r["abs_residual_ms_median"] <= 5,
         "value": r["abs_residual_ms_median"]},
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.timeline", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the outage probe")
    args = parser.parse_args(argv)
    import secrets

    from manager.lab import lab_down, lab_up
    from manager.process import DaemonProcess

    from interceptor.schema import load_host_config

    prefix = "nskt" + secrets.token_hex(3)
    workdir = Path(tempfile.mkdtemp(prefix=f"netskin-bench-{prefix}-"))
    try:
        lab = lab_up(prefix, 1, workdir)
        skins_dir = Path(load_host_config(lab.config_path).skins_dir)
        skins_dir.mkdir(parents=True, exist_ok=True)

        def write_skin(doc: dict) -> None:
            (skins_dir / f"{doc['name']}.json").write_text(json.dumps(doc))

        with DaemonProcess(lab.config_path) as daemon:
            result = measure(lab, daemon.request, write_skin, args.seconds)
    finally:
        lab_down(prefix)
        shutil.rmtree(workdir, ignore_errors=True)
    json.dump(result, sys.stdout, indent=2)
    print()
    for row in rows(result):
        print(f"{row['metric']}: {row['measured']} (goal {row['goal']}: {'met' if row['met'] else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
