"""Benchmark rows: trace-driven links, throughput per one-second window against the trace's capacity.

vm1 sends UDP uplink at 1.05 × the trace's peak rate (1500-byte IP packets, one per Mahimahi
delivery opportunity) through a skin whose ``uplink.trace`` is a shipped trace; a receiver in
inet records each datagram's kernel arrival time. The trace starts at the first packet, and its
first delivery shows up at the receiver at the first opportunity, so the trace's phase is known
from the first arrival alone. Windows are one second long, laid on the trace's own clock, over
the time the link was saturated (from the first arrival to the last: the queue drains at the
trace's rate after the sender stops). Each window's error is (measured − capacity) / the
trace's peak one-second capacity; the first window is left out (the queue is still filling).

    python -m bench.trace receive 10.77.0.2:9103 --idle 1.0 --timeout 60   (in a namespace)
"""

from __future__ import annotations

import argparse
import array
import json
import sys
from dataclasses import dataclass

from bench.stats import median
from bench.udp_tool import IPV4_UDP_OVERHEAD_BYTES, datagrams
from interceptor import traces
from interceptor.engine.trace import CompiledTrace

RECEIVE_PORT = 9103
NS_PER_S = 1_000_000_000
PAYLOAD_BYTES = 1472  # 1500-byte IPv4 packets: one per opportunity
OVERSUBSCRIPTION = 1.05
WINDOW_NS = NS_PER_S


@dataclass(frozen=True)
class TracePlan:
    traces: tuple[str, ...] = ("constant-12mbps", "onoff-24mbps-1s")
    seconds: float = 8.0  # of sending; the last window ends when the queue has drained


def trace_skin(name: str) -> dict:
    return {"name": f"bench-trace-{name}", "uplink": {"trace": name}}


def peak_window_bytes(trace: CompiledTrace) -> int:
    """The most a one-second window laid on whole seconds of the trace can deliver."""
    seconds = max(1, trace.period_ns // WINDOW_NS)
    return max(trace.capacity_bytes(k * WINDOW_NS, (k + 1) * WINDOW_NS) for k in range(seconds))


def peak_rate_pps(trace: CompiledTrace) -> float:
    return peak_window_bytes(trace) / (PAYLOAD_BYTES + IPV4_UDP_OVERHEAD_BYTES)


def windows(trace: CompiledTrace, arrivals_ns: list[int], sizes: list[int]) -> list[dict]:
    """Per one-second window of the trace's clock: bytes measured and the trace's capacity.

    The first arrival is the first opportunity after the trace's origin (the first packet met an
    empty link), which fixes the origin (path latency included, so it cancels). Windows lie on
    whole seconds of the trace, moved half an opportunity gap later, so a release a little late
    or early never moves a packet across a window's edge.
    """
    if len(arrivals_ns) < 2:
        return []
    first_opportunity = trace.times_ns[0]
    origin = arrivals_ns[0] - first_opportunity
    gaps = [b - a for a, b in zip(trace.times_ns, trace.times_ns[1:]) if b > a]
    shift = (min(gaps) if gaps else trace.period_ns) // 2
    start = origin + shift
    last = arrivals_ns[-1]
    count = (last - start) // WINDOW_NS
    measured = [0] * count
    for when, size in zip(arrivals_ns, sizes):
        index = (when - start) // WINDOW_NS
        if 0 <= index < count:
            measured[index] += size
    peak = peak_window_bytes(trace)
    out = []
    for k in range(count):
        capacity = trace.capacity_bytes(k * WINDOW_NS + shift, (k + 1) * WINDOW_NS + shift)
        out.append({"window": k, "measured_bytes": measured[k], "capacity_bytes": capacity,
                    "error": (measured[k] - capacity) / peak})
    return out


def summary(trace: CompiledTrace, arrivals_ns: list[int], sizes: list[int]) -> dict:
    """Median and worst window error (the first window left out), in parts of the peak."""
    judged = windows(trace, arrivals_ns, sizes)[1:]
    errors = [w["error"] for w in judged]
    return {
        "windows": judged,
        "median_error": median(errors) if errors else float("nan"),
        "median_abs_error": median([abs(e) for e in errors]) if errors else float("nan"),
        "worst_error": max(errors, key=abs) if errors else float("nan"),
        "peak_mbit_s": 8 * peak_window_bytes(trace) / 1e6,
        "mean_mbit_s": 8e3 / trace.mean_ns_per_byte,
    }


# --- the receiver (runs in the inet namespace) ---------------------------------------------


def receive(bind: str, idle_s: float, timeout_s: float) -> dict:
    """Kernel arrival time and IP size of every datagram, until idle_s passes with none."""
    arrivals, sizes = array.array("q"), array.array("i")
    for data, arrived_ns in datagrams(bind, idle_s, timeout_s):
        arrivals.append(arrived_ns)
        sizes.append(len(data) + IPV4_UDP_OVERHEAD_BYTES)
    return {"arrivals_ns": arrivals.tolist(), "sizes": sizes.tolist()}


# --- the rows (driven by bench.run through its Harness) --------------------------------------


def run_one(h, name: str, seconds: float) -> dict:
    """Apply the trace skin to vm1's uplink and saturate it; the row's figures for this trace."""
    trace = traces.load_file(name)
    rate = OVERSUBSCRIPTION * peak_rate_pps(trace)
    count = int(rate * seconds)
    h.apply(trace_skin(name))
    address = f"{h.lab.inet_address}:{RECEIVE_PORT}"
    receiver = h.python("inet", "bench.trace", "receive", address, "--idle", 1.5, "--timeout", seconds + 30)
    h.wait_ready(receiver, "the trace receiver")
    sender = h.python("vm1", "bench.udp_tool", "send", address, "--count", count, "--rate", rate,
                      "--size", PAYLOAD_BYTES)
    sent = h.finish(sender, "the UDP sender", seconds + 30)
    got = h.finish(receiver, "the trace receiver", 40)
    return {"trace": name, "sent": sent["sent"], "received": len(got["sizes"]), "offered_pps": rate,
            **summary(trace, got["arrivals_ns"], got["sizes"])}


def measure_trace(h, plan: TracePlan) -> dict:
    """Every trace of the plan on one fresh daemon."""
    h.add_skins([trace_skin(name) for name in plan.traces])
    daemon = h.start_daemon()
    try:
        return {"seconds": plan.seconds, "runs": [run_one(h, name, plan.seconds) for name in plan.traces]}
    finally:
        h.stop_daemon(daemon)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trace", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("receive")
    p.add_argument("bind")
    p.add_argument("--idle", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    json.dump(receive(args.bind, args.idle, args.timeout), sys.stdout)
    print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
