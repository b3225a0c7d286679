"""TCP goodput through the queue (``python -m bench.run --only tcp``; also in the full run).

One iperf3 TCP stream vm1 → inet, repeated, through: no queue (no netskin rules), no queue with
the host segmenting every packet, the bare netfilterqueue accept loop (segments, then with the
GSO flag), and the daemon in pass-through, with a delay-only skin (``latency_ms`` 1) and with
``bandwidth_limit_kbps`` 1 000 000 (all three on its GSO queue pair), and, restarted with
``gso = false``, with the delay-only skin again: the same skin with every segment crossing. Goodput is the receiver's per-second payload, slow start
skipped (``Harness.tcp_goodput``); medians over the repeats. For each run it also reads the CPU of
the whole queue process (every thread and the daemon's helper worker) and the packets that crossed
each queue.

Without the GSO flag the kernel cuts every GSO packet into 1448-byte segments before queueing it:
the queue sees one packet per segment (``uplink packets per segment``), where without a queue a
64 KB GSO packet crosses the host's forwarding path once. With it (the daemon's GSO pair, which
the three skins here qualify for) a super-packet crosses whole. The "host segments" row sets
``gso_max_segs`` 1 on the host's egress device toward inet, so the kernel segments each GSO
packet in software at that point, in the same namespace as the queue would, and everything
after it is per segment, as after the queue: what that costs with no user space in the path
is the share of the bare loop's gap that segmentation explains.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from bench.harness import Harness, machine_cpu_seconds, tree_cpu_seconds
from bench.stats import median
from manager.lab import QUEUE_BASE

MSS_BYTES = 1448  # payload of a 1500-byte segment with TCP timestamps
RATE_KBPS = 1_000_000
DELAY_MS = 1
DELAY_SKIN = {"name": "bench-tcp-delay", "latency_ms": DELAY_MS}
RATE_SKIN = {"name": "bench-tcp-rate-1g", "bandwidth_limit_kbps": RATE_KBPS}
DELAY_GOAL = 0.5  # of the no-queue goodput
RATE_TOLERANCE = 0.05  # of the asked rate, as the other TCP rate rows
ONE_SEGMENT_GSO = 1  # gso_max_segs: every GSO packet is segmented in software before this device
GSO_RESTORE_SEGS = 65535  # a veth's default
EGRESS_DEVICE = "up0"  # the hv namespace's link to inet

PATHS = {
    "no_queue": "no queue",
    "host_segments": "no queue, host segments",
    "bare_loop": "bare loop",
    "bare_loop_gso": "bare loop, GSO flag",
    "pass_through": "daemon, pass-through",
    "delay": f"daemon, latency_ms {DELAY_MS}",
    "rate": f"daemon, {RATE_KBPS // 1000} Mbit/s",
    "delay_segments": f"daemon, latency_ms {DELAY_MS}, gso = false",
}


@dataclass(frozen=True)
class TcpPlan:
    seconds: float = 5.0  # counted, after skip_s
    skip_s: float = 1.0
    repeats: int = 3


QUICK = TcpPlan(seconds=3.0, repeats=2)


def run_once(h: Harness, plan: TcpPlan, pid: int | None) -> dict:
    """One TCP run; CPU and queue counters over the whole run (slow start included)."""
    started, machine0 = time.monotonic(), machine_cpu_seconds()
    cpu0 = tree_cpu_seconds(pid) if pid else None
    queues0 = h.queue_counters()
    goodput = h.tcp_goodput(plan.seconds, plan.skip_s)
    queues1 = h.queue_counters()
    cpu1 = tree_cpu_seconds(pid) if pid else None
    wall_s, machine1 = time.monotonic() - started, machine_cpu_seconds()
    crossed = {"uplink": 0, "downlink": 0}
    for number, counters in queues1.items():
        if number in queues0:
            crossed["uplink" if (number - QUEUE_BASE) % 2 == 0 else "downlink"] += \
                counters.queued - queues0[number].queued
    return per_run_figures(goodput, wall_s, machine1 - machine0,
                           None if pid is None else cpu1 - cpu0, crossed if queues1 else None)


def per_run_figures(goodput: dict, wall_s: float, machine_cpu_s: float, queue_cpu_s: float | None,
                    crossed: dict | None) -> dict:
    """The figures of one run from its raw measurements (pure: tested without traffic)."""
    run_bytes = goodput["run_bytes"]
    segments = run_bytes / MSS_BYTES
    figures = {
        "goodput_bps": goodput["bits_per_second"], "run_bytes": run_bytes, "wall_s": wall_s,
        "interval_mbps": [round(v / 1e6, 1) for v in goodput["interval_bits_per_second"]],
        "machine_busy_percent": 100 * machine_cpu_s / wall_s / (os.cpu_count() or 1),
        "machine_cpu_s_per_gb": machine_cpu_s / (run_bytes / 1e9) if run_bytes else math.nan,
        "segments_per_s": segments / wall_s,
        "retransmits": goodput.get("retransmits"),
    }
    if queue_cpu_s is not None:
        figures.update({"cpu_s": queue_cpu_s, "cpu_percent_of_core": 100 * queue_cpu_s / wall_s,
                        "cpu_s_per_gb": queue_cpu_s / (run_bytes / 1e9) if run_bytes else math.nan})
    if crossed is not None:
        figures.update({"uplink_packets_per_s": crossed["uplink"] / wall_s,
                        "downlink_packets_per_s": crossed["downlink"] / wall_s,
                        "uplink_packets_per_segment": crossed["uplink"] / segments if segments else math.nan})
        if queue_cpu_s is not None and crossed["uplink"] + crossed["downlink"]:
            # ACKs cross the downlink queue and cost as much as a segment: per packet, not per byte,
            # is what stays put when the receiver's ACK rate changes with the machine's load.
            figures["cpu_us_per_packet"] = 1e6 * queue_cpu_s / (crossed["uplink"] + crossed["downlink"])
    return figures


def summarize_runs(runs: list[dict]) -> dict:
    """Medians over the repeats of every figure the runs share."""
    keys = [k for k in runs[0] if all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                                      for r in runs)]
    return {k: median([r[k] for r in runs]) for k in keys}


def _set_egress_gso_segs(h: Harness, segs: int) -> None:
    h.lab.exec("hv", ["ip", "link", "set", "dev", EGRESS_DEVICE, "gso_max_segs", segs], check=True)


def measure(h: Harness, plan: TcpPlan, step=print) -> dict:
    runs: dict[str, list[dict]] = {key: [] for key in PATHS}

    def repeat(key: str, pid: int | None) -> None:
        runs[key].append(run_once(h, plan, pid))

    step(f"TCP: no queue, {plan.repeats} runs of {plan.skip_s + plan.seconds:g} s, then with the host segmenting")
    for _ in range(plan.repeats):
        repeat("no_queue", None)
    gso_error = None
    try:
        _set_egress_gso_segs(h, ONE_SEGMENT_GSO)
        for _ in range(plan.repeats):
            repeat("host_segments", None)
    except Exception as error:  # an old iproute2 or kernel: the row is left out, said why
        gso_error = str(error)
    finally:
        _set_egress_gso_segs(h, GSO_RESTORE_SEGS)

    for key, gso in (("bare_loop", False), ("bare_loop_gso", True)):
        step(f"TCP: bare netfilterqueue loop{', GSO flag' if gso else ''}")
        bare = h.start_bare_loop(gso=gso)
        try:
            for _ in range(plan.repeats):
                repeat(key, bare.pid)
        finally:
            h.stop(bare)

    step(f"TCP: daemon, pass-through / latency_ms {DELAY_MS} / {RATE_KBPS // 1000} Mbit/s, interleaved")
    h.add_skins([DELAY_SKIN, RATE_SKIN])
    daemon = h.start_daemon()
    try:
        for _ in range(plan.repeats):
            h.revert()
            repeat("pass_through", daemon.pid)
            h.apply(DELAY_SKIN)
            repeat("delay", daemon.pid)
            h.apply(RATE_SKIN)
            repeat("rate", daemon.pid)
        h.revert()
    finally:
        h.stop_daemon(daemon)

    step(f"TCP: daemon with gso = false, latency_ms {DELAY_MS}")
    config = h.daemon_config
    h.daemon_config = config.with_name("bench-segments.toml")
    h.daemon_config.write_text("gso = false\n" + config.read_text())
    try:
        daemon = h.start_daemon()
        try:
            h.apply(DELAY_SKIN)
            for _ in range(plan.repeats):
                repeat("delay_segments", daemon.pid)
            h.revert()
        finally:
            h.stop_daemon(daemon)
    finally:
        h.daemon_config = config

    return {"plan": {"seconds": plan.seconds, "skip_s": plan.skip_s, "repeats": plan.repeats},
            "gso_error": gso_error, "runs": runs,
            "summary": {key: summarize_runs(r) for key, r in runs.items() if r}}


# --- judging and printing --------------------------------------------------------------------


def judge(summary: dict) -> dict:
    """Ratios and the two goals from the medians (pure)."""
    gbps = {key: s["goodput_bps"] / 1e9 for key, s in summary.items()}
    none, bare = gbps["no_queue"], gbps["bare_loop"]
    asked_gbps = RATE_KBPS / 1e6
    reachable = gbps["pass_through"] >= (1 - RATE_TOLERANCE) * asked_gbps
    rate_error = gbps["rate"] / asked_gbps - 1
    verdict = {
        "gbps": gbps,
        "vs_no_queue": {key: v / none for key, v in gbps.items()},
        "vs_bare_loop": {key: v / bare for key, v in gbps.items()},
        "delay_ratio": gbps["delay"] / none,
        "delay_met": gbps["delay"] >= DELAY_GOAL * none,
        "rate_error": rate_error,
        "rate_reachable": reachable,
        "rate_met": reachable and abs(rate_error) <= RATE_TOLERANCE,
    }
    if "delay_segments" in gbps:
        verdict["super_packet_gain"] = gbps["delay"] / gbps["delay_segments"]
    if "host_segments" in gbps:
        # Per GB moved, time and the machine's CPU add up along the path where rates do not: the
        # share of what the bare loop adds over no queue that segmenting alone already adds.
        def share(cost: dict) -> float:
            extra = cost["bare_loop"] - cost["no_queue"]
            return (cost["host_segments"] - cost["no_queue"]) / extra if extra > 0 else math.nan

        verdict["segmentation_share_time"] = share({k: 1 / gbps[k] for k in gbps})
        verdict["segmentation_share_cpu"] = share({k: s["machine_cpu_s_per_gb"] for k, s in summary.items()})
    return verdict


def rows(result: dict) -> list[dict]:
    v = judge(result["summary"])
    g = v["gbps"]
    rate_measured = f"{g['rate']:.3f} Gbit/s ({100 * v['rate_error']:+.1f} %; pass-through {g['pass_through']:.3f})"
    if not v["rate_reachable"]:
        rate_measured += f"; cannot be met here: pass-through itself delivers {g['pass_through']:.3f} Gbit/s"
    # The daemon's pass-through takes super-packets: the bare loop with the GSO flag is its peer.
    bare_key = "bare_loop_gso" if "bare_loop_gso" in g else "bare_loop"
    bare_label = "bare loop, GSO flag" if bare_key == "bare_loop_gso" else "bare loop"
    return [
        {"metric": f"TCP goodput uplink, pass-through vs no queue / vs {bare_label}",
         "measured": f"{100 * v['vs_no_queue']['pass_through']:.0f} % / "
                     f"{100 * g['pass_through'] / g[bare_key]:.0f} % "
                     f"({g['pass_through']:.2f} vs {g['no_queue']:.2f} / {g[bare_key]:.2f} Gbit/s)",
         "goal": "—", "met": None, "value": v["vs_no_queue"]["pass_through"]},
        {"metric": f"TCP goodput uplink, latency_ms {DELAY_MS} vs no queue",
         "measured": f"{100 * v['delay_ratio']:.0f} % ({g['delay']:.2f} vs {g['no_queue']:.2f} Gbit/s)",
         "goal": f"≥ {100 * DELAY_GOAL:.0f} %", "met": v["delay_met"], "value": v["delay_ratio"]},
        {"metric": f"TCP goodput uplink at {RATE_KBPS // 1000} Mbit/s (bandwidth_limit_kbps {RATE_KBPS})",
         "measured": rate_measured, "goal": f"±{100 * RATE_TOLERANCE:g} %", "met": v["rate_met"],
         "value": v["rate_error"]},
    ] + ([
        {"metric": f"TCP goodput uplink, latency_ms {DELAY_MS}: GSO super-packets vs segments (gso = false)",
         "measured": f"{v['super_packet_gain']:.1f}× ({g['delay']:.2f} vs {g['delay_segments']:.2f} Gbit/s)",
         "goal": "—", "met": None, "value": v["super_packet_gain"]},
    ] if "super_packet_gain" in v else [])


def notes(result: dict) -> list[str]:
    v, summary = judge(result["summary"]), result["summary"]
    out = []
    bare = summary["bare_loop"]
    if "uplink_packets_per_segment" in bare:
        out.append(
            f"TCP: {bare['uplink_packets_per_segment']:.2f} uplink queue packets per 1448-byte segment through the bare "
            f"loop ({bare['uplink_packets_per_s'] / 1000:.0f}k pkt/s, plus {bare['downlink_packets_per_s'] / 1000:.0f}k "
            f"ACKs/s on the downlink queue): every segment crosses the queue. The bare loop used "
            f"{bare['cpu_percent_of_core']:.0f} % of a core, the daemon in pass-through "
            f"{summary['pass_through'].get('cpu_percent_of_core', math.nan):.0f} % "
            f"({summary['pass_through'].get('cpu_us_per_packet', math.nan):.1f} µs per queued packet, ACKs included).")
    if "segmentation_share_time" in v:
        m = {k: summary[k]["machine_cpu_s_per_gb"] for k in ("no_queue", "host_segments", "bare_loop")}
        out.append(
            f"TCP: with no queue and the host segmenting every GSO packet the kernel alone moves "
            f"{v['gbps']['host_segments']:.2f} Gbit/s (not segmenting: {v['gbps']['no_queue']:.2f}; bare loop: "
            f"{v['gbps']['bare_loop']:.2f}). Of what the bare loop adds per GB over no queue, segmentation and the "
            f"per-segment path after it explain {100 * v['segmentation_share_time']:.0f} % of the time and "
            f"{100 * v['segmentation_share_cpu']:.0f} % of the machine's CPU (machine CPU s/GB: no queue "
            f"{m['no_queue']:.2f}, host segments {m['host_segments']:.2f}, bare loop {m['bare_loop']:.2f}); the rest "
            "is the crossing to user space and back.")
    if result.get("gso_error"):
        out.append(f"TCP: the no-GSO row could not be measured: {result['gso_error']}")
    delay = summary["delay"]
    if "uplink_packets_per_segment" in delay and delay["uplink_packets_per_segment"] > 0:
        out.append(
            f"TCP: through the daemon's GSO pair (latency_ms {DELAY_MS}) one uplink queue packet carried "
            f"{1 / delay['uplink_packets_per_segment']:.1f} segments on average "
            f"({delay['uplink_packets_per_s'] / 1000:.1f}k pkt/s); the daemon used "
            f"{delay.get('cpu_percent_of_core', math.nan):.0f} % of a core.")
    rate = summary["rate"]
    if not v["rate_met"] and "cpu_us_per_packet" in rate:
        out.append(
            f"TCP: with bandwidth_limit_kbps {RATE_KBPS} the sender retransmitted a median {rate.get('retransmits', math.nan):.0f} "
            f"segments per run (the shaper dropped nothing it saw) while the daemon used {rate['cpu_percent_of_core']:.0f} % "
            f"of a core at {rate['cpu_us_per_packet']:.1f} µs per queued packet (pass-through: "
            f"{summary['pass_through'].get('cpu_us_per_packet', math.nan):.1f} µs); at 1 Gbit/s about 86k segments/s "
            "plus their ACKs cross the queues.")
    if not v["rate_reachable"]:
        out.append(f"TCP: the {RATE_KBPS // 1000} Mbit/s row cannot be met on this machine: pass-through delivers "
                   f"{v['gbps']['pass_through']:.3f} Gbit/s, under the {100 * (1 - RATE_TOLERANCE):.0f} % of the rate "
                   "the row needs.")
    return out


def table_rows(result: dict) -> list[tuple[str, ...]]:
    """The per-path table: label, Gbit/s, × no queue, × bare loop, CPU, CPU per GB, queue pkt/s."""
    v, summary = judge(result["summary"]), result["summary"]
    out = []
    for key, label in PATHS.items():
        s = summary.get(key)
        if s is None:
            continue
        cpu = s.get("cpu_percent_of_core")
        out.append((
            label, f"{v['gbps'][key]:.3f}", f"{v['vs_no_queue'][key]:.2f}", f"{v['vs_bare_loop'][key]:.2f}",
            f"{cpu:.0f} %" if cpu is not None else "—",
            f"{s['cpu_s_per_gb']:.2f}" if "cpu_s_per_gb" in s else "—",
            f"{s['cpu_us_per_packet']:.1f}" if "cpu_us_per_packet" in s else "—",
            f"{s['uplink_packets_per_s'] / 1000:.1f}k / {s['downlink_packets_per_s'] / 1000:.1f}k"
            if "uplink_packets_per_s" in s else "—",
            f"{s['segments_per_s'] / 1000:.1f}k",
            f"{s['machine_busy_percent']:.0f} %", f"{s['machine_cpu_s_per_gb']:.2f}",
            f"{s['retransmits']:.0f}" if "retransmits" in s else "—",
        ))
    return out


TABLE_COLUMNS = ("path", "Gbit/s", "× none", "× bare", "queue CPU", "CPU s/GB", "µs/pkt", "queued/s up/down",
                 "segments/s", "machine", "machine s/GB", "retrans.")
