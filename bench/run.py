"""netskin's benchmark: speed against a bare NFQUEUE loop, and fidelity against what a skin asks.

    python -m bench.run [--quick] [--only pause|trace|vms|tcp|fleet] [--json FILE]

Builds a private lab (``manager.lab``, a random prefix, removed at the end), then measures in one
run, so every ratio compares numbers taken on the same machine minutes apart:

- speed (issue 2): CPU per packet of the queue-serving process and the highest 64-byte UDP rate
  with under 0.1 % loss, for the bare netfilterqueue accept loop (``bench.bare_loop``, the
  baseline), the daemon in pass-through and, for context, no queue at all;
- fidelity (issue 3): added-delay error, the engine's own delay floor, UDP and TCP rates against
  ``bandwidth_limit_kbps``, loss against its binomial interval, CPU per packet with a full skin;
- the data path's longest pause while skin files are rewritten and applies run (``bench.pause``;
  in the full run, or alone with ``--only pause``);
- trace-driven links: saturating UDP per one-second window through shipped Mahimahi traces
  against each trace's capacity (``bench.trace``; in every run, or alone with ``--only trace``);
- cost against the number of VMs: CPU per packet of the whole machine and of the daemon with 1,
  100 and 500 configured VMs, the measured one listed last (``bench.vms``; alone with
  ``--only vms``);
- TCP goodput with no queue, through the bare loop and through the daemon in pass-through, with
  ``latency_ms`` 1 and with ``bandwidth_limit_kbps`` 1 000 000, and the queue process's CPU per
  GB moved (``bench.tcp``; in the full and quick runs, or alone with ``--only tcp``);
- the fleet: assignments/s and apply → enforced on every host for 10, 100 and 1000 VMs, and the
  swap spread across hosts (``bench.fleet``; alone, with ``--only fleet``: it builds a fleet lab).

The daemon runs with ``fail_mode = closed`` here: when it cannot keep up the kernel drops, and
the drop is measured, instead of letting packets bypass it unseen.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from bench import jitter, tcp
from bench.harness import Harness, tree_cpu_seconds, wakeups
from bench.pause import PausePlan, measure_pause
from bench.trace import TracePlan, measure_trace
from bench.stats import binomial_interval, median, percentile
from manager.lab import lab_down, lab_up

LOSS_LIMIT = 0.001  # "unintended loss" allowed at a sustained rate
SENDER_PLATEAU = 1.1  # doubling the offered rate sent less than this much more: the sender is the limit
UDP_OVERSUBSCRIPTION = 1.05  # UDP throughput tests offer this much above the asked rate


@dataclass(frozen=True)
class Plan:
    quick: bool
    cpu_pps: int = 20_000
    cpu_other_pps: tuple[int, ...] = (5_000, 40_000)  # pass-through CPU per packet at more rates
    cpu_seconds: float = 4.0
    cpu_repeats: int = 3
    sweep_seconds: float = 2.0
    sweep_start_pps: int = 20_000
    sweep_max_pps: int = 320_000
    bisect_steps: int = 4
    sweep_repeats: int = 3
    rtt_pps: int = 1000
    rtt_seconds: float = 2.5
    rtt_repeats: int = 4
    delay_latency_ms: float = 100.0
    rates_kbps: tuple[int, ...] = (64, 1_000, 10_000, 100_000)
    downlink_rate_kbps: int = 10_000
    rate_seconds: float = 4.0
    # At 1 Mbit/s and below few packets fit in a short run, and TCP's recovery from the drops
    # that end slow start (out-of-order data handed to iperf3 in one burst) lasts seconds.
    low_rate_seconds: float = 10.0
    lowest_rate_tcp_seconds: float = 15.0  # 64 kbit/s: about 80 segments
    tcp_skip_s: float = 1.0
    low_rate_tcp_skip_s: float = 3.0
    lowest_rate_tcp_skip_s: float = 6.0
    loss_percent: float = 5.0
    loss_count: int = 10_000
    loss_pps: int = 5_000
    # Held-packet lateness under control-plane churn; None leaves the row out. The 50 CLI
    # applies alone take about 30 s here, too long for the quick run.
    pause: PausePlan | None = PausePlan()
    # Trace-driven links (uplink.trace): throughput per second against the trace's capacity.
    trace: TracePlan | None = TracePlan()
    # TCP goodput through no queue, the bare loop and the daemon (bench.tcp).
    tcp: tcp.TcpPlan = tcp.TcpPlan()


FULL = Plan(quick=False)
QUICK = Plan(
    quick=True, pause=None, cpu_seconds=2.0, cpu_repeats=2, sweep_seconds=1.5, bisect_steps=2, sweep_repeats=1,
    rtt_seconds=2.0, rtt_repeats=2, rates_kbps=(1_000, 10_000), rate_seconds=3.0, low_rate_seconds=5.0,
    tcp=tcp.QUICK,
)

EMPTY_SKIN = {"name": "bench-empty"}
FULL_SKIN = {"name": "bench-full", "packet_loss_percent": 1, "latency_ms": 20, "bandwidth_limit_kbps": 50_000}
# The same plus the stages that read headers: every packet is parsed and meets the stateful
# firewall (the bench's stream is one flow, so this is the established-flow path).
FIREWALL_SKIN = {**FULL_SKIN, "name": "bench-firewall", "security_profile": "standard"}


def delay_skin(plan: Plan) -> dict:
    return {"name": "bench-delay", "latency_ms": plan.delay_latency_ms}


def rate_skin(kbps: int) -> dict:
    return {"name": f"bench-rate-{kbps}", "bandwidth_limit_kbps": kbps}


def loss_skin(plan: Plan) -> dict:
    return {"name": "bench-loss", "packet_loss_percent": plan.loss_percent}


def all_skins(plan: Plan) -> list[dict]:
    rates = sorted({*plan.rates_kbps, plan.downlink_rate_kbps})
    return [EMPTY_SKIN, delay_skin(plan), *map(rate_skin, rates), loss_skin(plan), FULL_SKIN, FIREWALL_SKIN]

out = Console(width=120, highlight=False)
progress = Console(stderr=True, highlight=False)


def step(message: str) -> None:
    progress.print(f"[dim]· {message}[/dim]")


# --- speed -----------------------------------------------------------------------------------


def measure_cpu(h: Harness, pid: int, plan: Plan, pps: int | None = None) -> dict:
    """CPU µs per queued packet of process pid at ``pps`` (default plan.cpu_pps; median of repeats)."""
    runs = []
    for _ in range(plan.cpu_repeats):
        cpu0, queues0, woke0 = tree_cpu_seconds(pid), h.queue_counters(), wakeups(pid)
        flood = h.udp_flood(pps or plan.cpu_pps, plan.cpu_seconds)
        cpu1, queues1, woke1 = tree_cpu_seconds(pid), h.queue_counters(), wakeups(pid)
        queued = sum(c.queued - queues0[q].queued for q, c in queues1.items() if q in queues0)
        runs.append({"cpu_us_per_packet": 1e6 * (cpu1 - cpu0) / queued if queued else math.nan,
                     "packets_per_wakeup": queued / (woke1 - woke0) if woke1 > woke0 else math.nan,
                     "queued": queued, "cpu_s": cpu1 - cpu0, "loss": flood["loss"]})
    return {"cpu_us_per_packet": median([r["cpu_us_per_packet"] for r in runs]),
            "packets_per_wakeup": median([r["packets_per_wakeup"] for r in runs]), "cpu_runs": runs}


def sweep(h: Harness, plan: Plan, flood=None) -> dict:
    """The highest received rate with loss under LOSS_LIMIT: doubling, then geometric bisection.
    ``flood(pps, seconds)``: the load (default ``h.udp_flood``, the measured VM's uplink)."""
    trials = []
    sender_limited = False
    flood = flood or h.udp_flood

    def trial(pps: float) -> bool:
        result = flood(pps, plan.sweep_seconds)
        result["ok"] = result["loss"] < LOSS_LIMIT
        trials.append(result)
        return result["ok"]

    passed, failed = None, None
    pps = plan.sweep_start_pps
    while pps <= plan.sweep_max_pps:
        if not trial(pps):
            failed = pps
            break
        good = [t for t in trials if t["ok"]]
        if len(good) >= 2 and good[-1]["sent_pps"] < SENDER_PLATEAU * good[-2]["sent_pps"]:
            sender_limited = True  # offering more no longer sends more: the sender is the limit
            passed = pps
            break
        passed = pps
        pps *= 2
    while passed is None and failed > 1000:  # even the start rate lost packets: go down
        pps = failed / 2
        if trial(pps):
            passed = pps
        else:
            failed = pps
    for _ in range(plan.bisect_steps):
        if passed is None or failed is None:
            break
        middle = math.sqrt(passed * failed)
        if trial(middle):
            passed = middle
        else:
            failed = middle
    good = [t for t in trials if t["ok"]]
    best = max(good, key=lambda t: t["received_pps"]) if good else None
    return {
        "max_pps": best["received_pps"] if best else 0.0,
        "sent_pps_at_max": best["sent_pps"] if best else 0.0,
        "sender_limited": sender_limited,
        "first_failing_offered_pps": failed,
        "trials": trials,
    }


def sweeps(h: Harness, plan: Plan, repeats: int) -> dict:
    runs = [sweep(h, plan) for _ in range(repeats)]
    return {"max_pps": median([r["max_pps"] for r in runs]),
            "sender_limited": any(r["sender_limited"] for r in runs), "sweeps": runs}


# --- fidelity --------------------------------------------------------------------------------


def rtt_run(h: Harness, plan: Plan) -> list[float]:
    """One run's RTTs in ms."""
    return [v / 1000 for v in h.rtt(plan.rtt_pps, plan.rtt_seconds)]


def rtt_summary(runs: list[list[float]]) -> dict:
    return {
        "p50_ms": median([percentile(r, 50) for r in runs]),
        "p99_ms": median([percentile(r, 99) for r in runs]),
        "received": [len(r) for r in runs],
    }


def delay_error(with_skin: list[list[float]], without: list[list[float]], asked_ms: float) -> dict:
    """Percentiles of RTT_with − median(RTT_without) − asked, each run against the run without
    the skin taken just before it, then the median over the repeats."""
    errors = []
    for run, base_run in zip(with_skin, without):
        base = median(base_run)
        errors.append([v - base - asked_ms for v in run])
    return {
        "p1_ms": median([percentile(e, 1) for e in errors]),
        "p50_ms": median([percentile(e, 50) for e in errors]),
        "p99_ms": median([percentile(e, 99) for e in errors]),
        "baseline_rtt_ms": median([median(r) for r in without]),
    }


def udp_rate(h: Harness, plan: Plan, kbps: int, direction: str) -> dict:
    payload = 1000 if kbps <= 1_000 else 1400
    seconds = plan.low_rate_seconds if kbps <= 1_000 else plan.rate_seconds
    pps = UDP_OVERSUBSCRIPTION * kbps * 1000 / ((payload + 28) * 8)
    result = h.one_way(direction, max(10, int(pps * seconds)), pps, payload, warmup_s=0.2)
    measured = result["ip_bits_per_second"] or 0.0
    return {"asked_kbps": kbps, "direction": direction, "measured_kbps": measured / 1000,
            "ratio": measured / (kbps * 1000), "payload_bytes": payload, "window_s": result["window_s"]}


def tcp_rate(h: Harness, plan: Plan, kbps: int, direction: str) -> dict:
    if kbps < 1_000:
        seconds, skip = plan.lowest_rate_tcp_seconds, plan.lowest_rate_tcp_skip_s
    elif kbps <= 1_000:
        seconds, skip = plan.low_rate_seconds, plan.low_rate_tcp_skip_s
    else:
        seconds, skip = plan.rate_seconds, plan.tcp_skip_s
    goodput = h.tcp_goodput(seconds, skip, reverse=direction == "downlink")
    bps = goodput["bits_per_second"]
    return {"asked_kbps": kbps, "direction": direction, "measured_kbps": bps / 1000,
            "ratio": bps / (kbps * 1000), "window_s": goodput["seconds"], "skip_s": skip,
            "interval_kbps": [round(v / 1000, 1) for v in goodput["interval_bits_per_second"]]}


def one_way_loss(h: Harness, plan: Plan, direction: str) -> dict:
    result = h.one_way(direction, plan.loss_count, plan.loss_pps, 64)
    sent = result["sent"] - result["send_errors"]
    lost = sent - result["received"]
    low, high = binomial_interval(sent, plan.loss_percent / 100, 0.999)
    return {"direction": direction, "sent": sent, "lost": lost, "measured_percent": 100 * lost / sent,
            "interval_lost": [low, high], "met": low <= lost <= high}


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Results:
    plan: dict
    speed: dict = field(default_factory=dict)
    fidelity: dict = field(default_factory=dict)
    pause: dict = field(default_factory=dict)
    jitter: dict = field(default_factory=dict)
    trace: dict = field(default_factory=dict)
    timeline: dict = field(default_factory=dict)
    vms: dict = field(default_factory=dict)
    tcp: dict = field(default_factory=dict)
    conditions: dict = field(default_factory=dict)
    workers: dict = field(default_factory=dict)
    summary: list = field(default_factory=list)
    summary_markdown: str = ""
    notes: list = field(default_factory=list)
    runtime_s: float = 0.0


def measure(h: Harness, plan: Plan, results: Results) -> None:
    speed, fidelity = results.speed, results.fidelity
    h.start_reflector()

    step("RTT with no queue at all")
    rtt = {"none": [rtt_run(h, plan) for _ in range(plan.rtt_repeats)]}
    step("no queue: highest 64-byte UDP rate (the sender/receiver ceiling)")
    speed["no_queue"] = sweeps(h, plan, 1)

    step("bare netfilterqueue loop: CPU per packet and highest rate")
    bare = h.start_bare_loop()
    try:
        speed["bare_loop"] = measure_cpu(h, bare.pid, plan)
        speed["bare_loop"]["cpu_at"] = {pps: measure_cpu(h, bare.pid, plan, pps) for pps in plan.cpu_other_pps}
        speed["bare_loop"].update(sweeps(h, plan, plan.sweep_repeats))
        step("RTT through the bare loop (the floor of any NFQUEUE user-space path)")
        rtt["bare"] = [rtt_run(h, plan) for _ in range(plan.rtt_repeats)]
    finally:
        h.stop(bare)

    step("netskin daemon, pass-through: CPU per packet and highest rate")
    h.add_skins(all_skins(plan))
    daemon = h.start_daemon()
    try:
        speed["daemon"] = measure_cpu(h, daemon.pid, plan)
        speed["daemon"]["cpu_at"] = {pps: measure_cpu(h, daemon.pid, plan, pps) for pps in plan.cpu_other_pps}
        speed["daemon"].update(sweeps(h, plan, plan.sweep_repeats))

        step(f"RTT through the daemon: no skin, empty skin, latency_ms {plan.delay_latency_ms:g}")
        for key in ("no_skin", "empty", "delay"):
            rtt[key] = []
        # A plain timer loop beside the runs shows how much of the delay error's tail is the
        # machine's own scheduling stalls.
        timer_probe = h.start_timer_probe(3 * plan.rtt_repeats * (plan.rtt_seconds + 1.5))
        for _ in range(plan.rtt_repeats):  # interleaved, so each delay run has its own baseline
            h.revert()
            rtt["no_skin"].append(rtt_run(h, plan))
            h.apply(EMPTY_SKIN)
            rtt["empty"].append(rtt_run(h, plan))
            h.apply(delay_skin(plan))
            rtt["delay"].append(rtt_run(h, plan))
        fidelity["timer_probe"] = h.stop_timer_probe(timer_probe)
        fidelity["rtt"] = {k: rtt_summary(v) for k, v in rtt.items()}
        fidelity["delay_error"] = delay_error(rtt["delay"], rtt["no_skin"], plan.delay_latency_ms)
        fidelity["floor_ms"] = fidelity["rtt"]["empty"]["p50_ms"] - fidelity["rtt"]["none"]["p50_ms"]

        rates = []
        checks = [(kbps, "uplink") for kbps in plan.rates_kbps] + [(plan.downlink_rate_kbps, "downlink")]
        for kbps, direction in checks:
            step(f"rate {kbps} kbit/s {direction}: UDP and TCP")
            h.apply(rate_skin(kbps))
            rates.append({"protocol": "UDP", **udp_rate(h, plan, kbps, direction)})
            rates.append({"protocol": "TCP", **tcp_rate(h, plan, kbps, direction)})
        fidelity["rates"] = rates

        step(f"loss {plan.loss_percent:g} % over {plan.loss_count} one-way packets, each direction")
        h.apply(loss_skin(plan))
        fidelity["loss"] = [one_way_loss(h, plan, d) for d in ("uplink", "downlink")]

        step("full skin (loss 1 % + latency 20 ms + 50 Mbit/s): CPU per packet")
        h.apply(FULL_SKIN)
        speed["full_skin"] = measure_cpu(h, daemon.pid, plan)

        step("full skin + firewall profile 'standard': CPU per packet")
        h.apply(FIREWALL_SKIN)
        speed["firewall_skin"] = measure_cpu(h, daemon.pid, plan)
    finally:
        h.stop_daemon(daemon)

    step("jitter: one-way delay p10/p50/p90 of delay 20 ± 10 ms, uniform uplink and normal downlink, "
         f"at {', '.join(map(str, jitter.RATES_PPS))} pkt/s (fresh daemon)")
    results.jitter = jitter.measure(h, plan.quick)
    measure_conditions_rows(h, plan, results)
    if plan.pause:
        measure_pause_row(h, plan.pause, results)
    if plan.trace:
        measure_trace_row(h, plan.trace, results)
    measure_timeline_rows(h, plan, results)
    results.tcp = tcp.measure(h, plan.tcp, step)


def measure_conditions_rows(h: Harness, plan: Plan, results: Results) -> None:
    from bench import conditions

    step("asked versus measured: status → conditions against a one-way probe (uplink delay 20 ms and "
         "10 % loss, downlink 4 Mbit/s offered 8.3; fresh daemon)")
    results.conditions = conditions.measure(h, plan.quick)


def measure_timeline_rows(h: Harness, plan: Plan, results: Results) -> None:
    from bench import timeline

    seconds = 20.0 if plan.quick else 60.0
    step(f"timeline: outages (2 s up, 0.5 s 100 % loss) probed at 1000 pkt/s for {seconds:.0f} s, then a "
         f"latency ramp 0 → {timeline.RAMP_TO_MS} ms over {timeline.RAMP_S} s probed by RTT (fresh daemon)")
    daemon = h.start_daemon()
    try:
        results.timeline = timeline.measure(h.lab, h.request, lambda doc: h.add_skins([doc]), seconds)
    finally:
        h.stop_daemon(daemon)


def measure_pause_row(h: Harness, plan: PausePlan, results: Results) -> None:
    step(f"data-path pause: lateness of held packets at {plan.rate_pps} pkt/s, alone, then while "
         f"{plan.file_rewrites} skin files are rewritten and {plan.applies} applies run (fresh daemon)")
    results.pause = measure_pause(h, plan)


def measure_trace_row(h: Harness, plan: TracePlan, results: Results) -> None:
    step(f"trace-driven uplink: saturating UDP per second through {', '.join(plan.traces)} (fresh daemon)")
    results.trace = measure_trace(h, plan)


# --- judging and printing --------------------------------------------------------------------


def _pps(value: float) -> str:
    return f"{value / 1000:.1f}k"


# Whole-daemon CPU per packet against the bare loop's, and the max rate against its max rate.
PASS_CPU_GOAL = 1.2
FULL_CPU_GOAL = 2.0
MAX_RATE_GOAL = 1.0


def summarize(results: Results, plan: Plan) -> None:
    speed, fidelity, rows, notes = results.speed, results.fidelity, results.summary, results.notes

    def row(metric: str, measured: str, goal: str, met: bool, value: float | None = None) -> None:
        rows.append({"metric": metric, "measured": measured, "goal": goal, "met": bool(met), "value": value})

    bare, daemon, full = speed["bare_loop"], speed["daemon"], speed["full_skin"]
    cpu_ratio = daemon["cpu_us_per_packet"] / bare["cpu_us_per_packet"]
    rate_ratio = daemon["max_pps"] / bare["max_pps"] if bare["max_pps"] else math.nan
    full_ratio = full["cpu_us_per_packet"] / bare["cpu_us_per_packet"]
    row("pass-through CPU per packet vs bare loop",
        f"{cpu_ratio:.2f}× ({daemon['cpu_us_per_packet']:.1f} vs {bare['cpu_us_per_packet']:.1f} µs)",
        f"≤ {PASS_CPU_GOAL:g}×", cpu_ratio <= PASS_CPU_GOAL, cpu_ratio)
    at = sorted(set(bare.get("cpu_at", {})) & set(daemon.get("cpu_at", {})), key=float)
    if at:
        ratios = {pps: daemon["cpu_at"][pps]["cpu_us_per_packet"] / bare["cpu_at"][pps]["cpu_us_per_packet"]
                  for pps in at}
        row(f"pass-through CPU per packet vs bare loop at {' / '.join(_pps(float(p)) for p in at)} pkt/s",
            " / ".join(f"{ratios[p]:.2f}× ({daemon['cpu_at'][p]['cpu_us_per_packet']:.1f} vs "
                       f"{bare['cpu_at'][p]['cpu_us_per_packet']:.1f} µs)" for p in at),
            f"≤ {PASS_CPU_GOAL:g}× each", all(r <= PASS_CPU_GOAL for r in ratios.values()), max(ratios.values()))
    row("pass-through max rate (<0.1 % loss) vs bare loop",
        f"{100 * rate_ratio:.0f} % ({_pps(daemon['max_pps'])} vs {_pps(bare['max_pps'])} pkt/s)",
        f"≥ {100 * MAX_RATE_GOAL:.0f} %", rate_ratio >= MAX_RATE_GOAL, rate_ratio)

    error = fidelity["delay_error"]
    row(f"added-delay error p50 (latency_ms {plan.delay_latency_ms:g}, {plan.rtt_pps} pkt/s)",
        f"{error['p50_ms']:+.3f} ms", "|p50| ≤ 0.2 ms", abs(error["p50_ms"]) <= 0.2, error["p50_ms"])
    row("added-delay error p99", f"{error['p99_ms']:+.3f} ms", "≤ 1 ms", error["p99_ms"] <= 1.0, error["p99_ms"])
    floor = fidelity["floor_ms"]
    row("engine floor: RTT p50, empty skin − no queue", f"{floor:+.3f} ms", "≤ 0.1 ms", floor <= 0.1, floor)

    for r in fidelity["rates"]:
        tolerance = 0.02 if r["protocol"] == "UDP" else 0.05
        what = "UDP throughput (IP bytes)" if r["protocol"] == "UDP" else "TCP goodput"
        row(f"{what} {r['direction']} at {_rate(r['asked_kbps'])}",
            f"{_rate(r['measured_kbps'], r['asked_kbps'])} ({100 * (r['ratio'] - 1):+.1f} %)",
            f"±{100 * tolerance:g} %", abs(r["ratio"] - 1) <= tolerance, r["ratio"])

    for r in fidelity["loss"]:
        low, high = r["interval_lost"]
        row(f"loss {r['direction']}, packet_loss_percent {plan.loss_percent:g}",
            f"{r['measured_percent']:.2f} % ({r['lost']}/{r['sent']})",
            f"{100 * low / r['sent']:.2f}–{100 * high / r['sent']:.2f} % (99.9 %)", r["met"], r["measured_percent"])

    row("full skin CPU per packet vs bare loop",
        f"{full_ratio:.2f}× ({full['cpu_us_per_packet']:.1f} vs {bare['cpu_us_per_packet']:.1f} µs)",
        f"≤ {FULL_CPU_GOAL:g}×", full_ratio <= FULL_CPU_GOAL, full_ratio)
    firewall = speed.get("firewall_skin")
    if firewall:
        ratio = firewall["cpu_us_per_packet"] / bare["cpu_us_per_packet"]
        row("full skin + firewall CPU per packet vs bare loop",
            f"{ratio:.2f}× ({firewall['cpu_us_per_packet']:.1f} vs {bare['cpu_us_per_packet']:.1f} µs)",
            f"≤ {FULL_CPU_GOAL:g}×", ratio <= FULL_CPU_GOAL, ratio)

    probe = fidelity["timer_probe"]
    if error["p99_ms"] > 1.0 and probe.get("over_1ms"):
        notes.append(
            f"Delay tail: a plain timerfd loop in its own process, run beside the RTT runs, also woke more than "
            f"1 ms late {probe['over_1ms']} times (max {probe['max_ms']:.1f} ms): this machine's own scheduling "
            "stalls (2 shared vCPUs) delay held packets too, and each RTT probe is held twice.")
    ceiling = speed["no_queue"]["max_pps"]
    highest = max(bare["max_pps"], daemon["max_pps"])
    closeness = "close to" if ceiling < 1.25 * highest else "above"
    notes.append(
        f"With no queue the iperf3 sender and receiver reach {_pps(ceiling)} pkt/s ({closeness} the max rates "
        "measured with a queue). With a queue process they compete with it for the 2 cores, so a max rate is a "
        "figure of the whole machine, not of the queue process alone; CPU per packet compares the two queue "
        "processes more cleanly.")
    for name in ("bare_loop", "daemon"):
        if speed[name]["sender_limited"]:
            notes.append(f"{name}: the iperf3 sender could not offer more than it did; its max rate is a lower bound.")


def summarize_pause(results: Results) -> None:
    pause, notes = results.pause, results.notes
    churn, alone = pause["churn"], pause["baseline"]
    results.summary.append({
        "metric": f"longest data-path pause while {churn['file_rewrites']} skin files are rewritten and "
                  f"{churn['applies']} applies run (held-packet lateness)",
        "measured": f"p99 {churn['p99_ms']:.2f} ms, max {churn['max_ms']:.1f} ms "
                    f"(alone: p99 {alone['p99_ms']:.2f}, max {alone['max_ms']:.1f}; from the sender's "
                    f"clock: p99 {churn['from_send_call']['p99_ms']:.2f})",
        "goal": "p99 < 2 ms", "met": churn["p99_ms"] < 2.0, "value": churn["p99_ms"]})
    probe = churn.get("timer_probe") or {}
    if churn["p99_ms"] >= 2.0 and probe.get("wakeups"):
        notes.append(
            f"Pause row: a plain 1 kHz timerfd loop in its own process beside the churn woke late by p99 "
            f"{probe['p99_ms']:.2f} ms, max {probe['max_ms']:.1f} ms; held packets were released late by p99 "
            f"{churn['p99_ms']:.2f} ms, max {churn['max_ms']:.1f} ms. Lateness beyond the timer loop's is the "
            "daemon's own: its event loop busy with the reloads and applies.")
    if not pause["send_stamps"]:
        notes.append("Pause row: the sender's kernel stamps did not come back (a send failed), so lateness "
                     "is taken from the sender's clock read before its send call.")
    if churn["apply_failures"]:
        notes.append(f"Pause row: {len(churn['apply_failures'])} applies failed, first: {churn['apply_failures'][0]}")


def summarize_trace(results: Results) -> None:
    for run in results.trace["runs"]:
        median_error, worst = run["median_error"], run["worst_error"]
        results.summary.append({
            "metric": f"UDP per 1 s window through trace {run['trace']} (uplink, of its {run['peak_mbit_s']:g} Mbit/s peak)",
            "measured": f"median {100 * median_error:+.2f} %, worst {100 * worst:+.2f} % ({len(run['windows'])} windows)",
            "goal": "±3 %", "met": abs(median_error) <= 0.03 and abs(worst) <= 0.03, "value": median_error})


def print_pause(pause: dict) -> None:
    churn = pause["churn"]
    table = Table(title=f"Pause: held packets' release lateness, UDP vm1 → inet at {pause['rate_pps']} pkt/s, "
                        f"latency_ms {2 * pause['asked_one_way_ms']:g} ({pause['asked_one_way_ms']:g} ms one way)",
                  title_justify="left",
                  caption=f"lateness = one-way delay (the kernel's stamp as a datagram leaves vm1 to its stamp "
                          f"on arrival in inet) − {pause['path_one_way_ms']:.3f} ms (the path without a skin) − "
                          f"{pause['asked_one_way_ms']:g} ms asked. Churn: {churn['file_rewrites']} drop-in files "
                          f"rewritten and {churn['applies']} `netskin apply` calls (median {churn['apply_s_median']:.2f} s "
                          f"each) over {churn['window_s']:.1f} s. Timer loop: how late a plain 1 kHz timerfd loop in "
                          "its own process woke beside the probe.",
                  caption_justify="left")
    for column in ("probe", "packets", "lost", "p50 ms", "p99 ms", "max ms", "> 2 ms", "timer loop p99 / max ms"):
        table.add_column(column, justify="left" if column == "probe" else "right")
    for key, label in (("baseline", "alone"), ("churn", "rewrites + applies")):
        r = pause[key]
        probe = r.get("timer_probe") or {}
        timer = f"{probe['p99_ms']:.2f} / {probe['max_ms']:.1f}" if probe.get("wakeups") else "—"
        for stamp, figures in (("", r), (", from the sender's clock", r["from_send_call"])):
            table.add_row(label + stamp, str(figures["packets"]), str(r["lost"]), f"{figures['p50_ms']:.3f}",
                          f"{figures['p99_ms']:.3f}", f"{figures['max_ms']:.2f}", str(figures["over_2ms"]),
                          timer if not stamp else "")
    out.print(table)


def print_tcp(result: dict) -> None:
    plan = result["plan"]
    table = Table(title="TCP: one iperf3 stream vm1 → inet", title_justify="left",
                  caption=f"Goodput: the receiver's payload per second over {plan['seconds']:g} s after "
                          f"{plan['skip_s']:g} s of slow start, median of {plan['repeats']} runs. CPU: utime+stime "
                          "of the queue process (all threads, and the daemon's helper worker) over the whole run, "
                          "in % of one core, per GB received and per packet through either queue. Queued: packets through the uplink / downlink "
                          "queue per second; segments/s: bytes received / 1448. Machine: busy share of all cores, "
                          "and its CPU s per GB (other tenants included). Retrans.: the sender's retransmitted segments per run. Host segments: no queue, gso_max_segs 1 on the host's device to "
                          "inet (every GSO packet segmented there, as before a queue). Rows: "
                          + "; ".join(f"{label}" for label in tcp.PATHS.values()) + ".",
                  caption_justify="left")
    for column in tcp.TABLE_COLUMNS:
        table.add_column(column, justify="left" if column == "path" else "right")
    for row in tcp.table_rows(result):
        table.add_row(*row)
    out.print(table)


def _rate(kbps: float, unit_of: float | None = None) -> str:
    """A rate in kbit/s or Mbit/s, whichever suits unit_of (default: the rate itself)."""
    if (unit_of if unit_of is not None else kbps) >= 1000:
        return f"{kbps / 1000:.4g} Mbit/s"
    return f"{kbps:.4g} kbit/s"


def _per_wakeup(entry: dict) -> str:
    value = entry.get("packets_per_wakeup", math.nan)
    return "—" if math.isnan(value) else f"{value:.1f}"


def print_cpu_at_rates(speed: dict, plan: Plan) -> None:
    """Pass-through CPU per packet at each measured rate, with the packets each wake-up found."""
    bare, daemon = speed["bare_loop"], speed.get("daemon")
    if daemon is None:
        return
    at = {plan.cpu_pps: (bare, daemon)}
    at.update({float(pps): (bare["cpu_at"][pps], daemon["cpu_at"][pps])
               for pps in set(bare.get("cpu_at", {})) & set(daemon.get("cpu_at", {}))})
    table = Table(title="Pass-through CPU per packet by rate", title_justify="left",
                  caption="Packets per wake-up: packets queued / voluntary context switches of every thread of "
                          "the queue process. A process that wakes for every packet pays the wake-up (the "
                          "scheduler, cold caches) per packet; one that finds several waiting shares it.",
                  caption_justify="left")
    for column in ("pkt/s", "bare µs/pkt", "bare pkts/wake-up", "daemon µs/pkt", "daemon pkts/wake-up",
                   "× bare"):
        table.add_column(column, justify="right")
    for pps in sorted(at, key=float):
        b, d = at[pps]
        table.add_row(_pps(float(pps)), f"{b['cpu_us_per_packet']:.1f}", _per_wakeup(b),
                      f"{d['cpu_us_per_packet']:.1f}", _per_wakeup(d),
                      f"{d['cpu_us_per_packet'] / b['cpu_us_per_packet']:.2f}")
    out.print(table)


def print_tables(results: Results, plan: Plan) -> None:
    speed, fidelity = results.speed, results.fidelity
    bare = speed["bare_loop"]

    table = Table(title="Speed: 64-byte UDP payload, vm1 → inet", title_justify="left",
                  caption=f"CPU: utime+stime of the queue process per queued packet at {_pps(plan.cpu_pps)} pkt/s, "
                          f"median of {plan.cpu_repeats}. Max: highest received pkt/s with < 0.1 % of packets lost "
                          f"or still queued near the end of a {plan.sweep_seconds:g} s run, median of "
                          f"{plan.sweep_repeats} sweep(s); + = the sender could not offer more.",
                  caption_justify="left")
    for column in ("path", "CPU µs/pkt", "× bare", "max pkt/s", "% of bare"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for key, label in (("no_queue", "no queue (sender/receiver ceiling)"), ("bare_loop", "bare netfilterqueue loop"),
                       ("daemon", "netskin pass-through"), ("full_skin", "netskin full skin"),
                       ("firewall_skin", "netskin full skin + firewall")):
        entry = speed.get(key)
        if entry is None:
            continue
        cpu = entry.get("cpu_us_per_packet")
        rate = entry.get("max_pps")
        table.add_row(
            label,
            f"{cpu:.2f}" if cpu is not None else "—",
            f"{cpu / bare['cpu_us_per_packet']:.2f}" if cpu is not None else "—",
            (_pps(rate) + ("+" if entry.get("sender_limited") else "")) if rate is not None else "—",
            f"{100 * rate / bare['max_pps']:.0f} %" if rate is not None and key != "no_queue" else "—",
        )
    out.print(table)
    print_cpu_at_rates(speed, plan)

    table = Table(title=f"RTT: UDP echo vm1 ↔ inet at {plan.rtt_pps} pkt/s", title_justify="left",
                  caption=f"median of {plan.rtt_repeats} runs of {plan.rtt_seconds:g} s", caption_justify="left")
    for column in ("path", "p50 ms", "p99 ms"):
        table.add_column(column, justify="left" if column == "path" else "right")
    labels = {"none": "no queue", "bare": "bare netfilterqueue loop", "no_skin": "daemon, no skin",
              "empty": "daemon, empty skin",
              "delay": f"daemon, latency_ms {plan.delay_latency_ms:g}"}
    for key, label in labels.items():
        r = fidelity["rtt"][key]
        table.add_row(label, f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}")
    out.print(table)
    e = fidelity["delay_error"]
    out.print(f"added-delay error (RTT − {e['baseline_rtt_ms']:.3f} ms − {plan.delay_latency_ms:g} ms): "
              f"p1 {e['p1_ms']:+.3f}  p50 {e['p50_ms']:+.3f}  p99 {e['p99_ms']:+.3f} ms")
    probe = fidelity["timer_probe"]
    if probe.get("wakeups"):
        out.print(f"a plain 1 kHz timerfd loop in its own process during these runs woke late by: p50 "
                  f"{probe['p50_ms']:.3f}  p99 {probe['p99_ms']:.3f}  max {probe['max_ms']:.2f} ms "
                  f"({probe['over_1ms']} of {probe['wakeups']} wake-ups over 1 ms)")
    rtt = fidelity["rtt"]
    out.print(f"RTT p50 over no queue (each RTT crosses the queue twice): empty skin "
              f"{fidelity['floor_ms']:+.3f} ms, bare loop {rtt['bare']['p50_ms'] - rtt['none']['p50_ms']:+.3f} ms")

    table = Table(title="Rate: bandwidth_limit_kbps", title_justify="left",
                  caption=f"UDP: offered at {UDP_OVERSUBSCRIPTION:g}× the limit, receiver's rate in IP bytes. "
                          "TCP: iperf3 goodput (payload; 1448 of 1500 IP bytes at most, i.e. −3.5 %).",
                  caption_justify="left")
    for column in ("direction", "protocol", "asked", "measured", "error"):
        table.add_column(column, justify="right")
    for r in fidelity["rates"]:
        table.add_row(r["direction"], r["protocol"], _rate(r["asked_kbps"]), _rate(r["measured_kbps"], r["asked_kbps"]),
                      f"{100 * (r['ratio'] - 1):+.2f} %")
    out.print(table)


def summary_text(results: Results) -> str:
    """The final table as a Markdown table (for the README), one line per metric, no wrapping."""
    table = Table(box=box.MARKDOWN)
    for column in ("metric", "measured", "goal", "met?"):
        table.add_column(column, no_wrap=True)
    for r in results.summary:
        met = "—" if r["met"] is None else "yes" if r["met"] else "**no**"  # None: context, no goal
        # A "|" inside a cell (|p50|, |residual|) would end the cell in Markdown.
        table.add_row(*(text.replace("|", "\\|") for text in (r["metric"], r["measured"], r["goal"])), met)
    wide = Console(width=300, color_system=None, highlight=False)
    with wide.capture() as captured:
        wide.print(table)
    return "\n".join(line.rstrip() for line in captured.get().splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and rates (about 6 minutes)")
    parser.add_argument("--json", type=Path, help="also write every measurement to this file")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the lab's logs and configs")
    parser.add_argument("--only", choices=["pause", "trace", "vms", "tcp", "conditions", "fleet", "workers"],
                        help="run only this row: pause = the data path's longest pause under skin churn, "
                             "trace = throughput per second through the shipped traces, "
                             "vms = CPU per packet with 1, 100 and 500 configured VMs, "
                             "workers = max rate and CPU with 1 and 2 engine workers (two VMs), "
                             "tcp = TCP goodput through no queue, the bare loop and the daemon, "
                             "conditions = status's measured delay, loss and rate against an outside probe, "
                             "fleet = the fleet lab's apply rows (python -m bench.fleet, its defaults)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="--only vms: rounds over the VM counts (default 5, quick 2)")
    parser.add_argument("--profiles", action="store_true",
                        help="--only vms: every VM configured with a skin that has a firewall profile")
    args = parser.parse_args(argv)
    if args.only == "fleet":  # a lab of its own (etcd, hosts, agents): not the one-VM lab below
        from bench import fleet

        return fleet.main(["--json", str(args.json)] if args.json else [])
    plan = QUICK if args.quick else FULL
    if args.only == "pause":
        plan = replace(plan, pause=plan.pause or PausePlan())
    if args.only == "trace":
        plan = replace(plan, trace=plan.trace or TracePlan())

    started = time.monotonic()
    prefix = "nskb" + secrets.token_hex(4)
    workdir = Path(tempfile.mkdtemp(prefix=f"netskin-bench-{prefix}-"))
    results = Results(plan=asdict(plan))
    failed = True
    step(f"lab {prefix} in {workdir}")
    try:
        lab = lab_up(prefix, 2 if args.only == "workers" else 1, workdir)
        harness = Harness(lab, workdir)
        try:
            if args.only == "pause":
                measure_pause_row(harness, plan.pause, results)
            elif args.only == "trace":
                measure_trace_row(harness, plan.trace, results)
            elif args.only == "tcp":
                results.tcp = tcp.measure(harness, plan.tcp, step)
            elif args.only == "conditions":
                measure_conditions_rows(harness, plan, results)
            elif args.only == "workers":
                from bench import workers

                # The same sweep in every mode (two VMs reach twice one VM's rate).
                sweep_plan = replace(plan, sweep_seconds=2.0, sweep_start_pps=20_000, sweep_max_pps=640_000,
                                     bisect_steps=4)
                results.workers = workers.measure(harness, sweep_plan, repeats=1 if plan.quick else 2, step=step)
            elif args.only == "vms":
                from bench import vms

                results.vms = vms.measure(harness, plan.cpu_pps, plan.cpu_seconds,
                                          args.rounds or (2 if plan.quick else 5), step, args.profiles)
            else:
                measure(harness, plan, results)
        finally:
            harness.close()
        failed = False
    finally:
        lab_down(prefix)
        if failed or args.keep_workdir:
            progress.print(f"logs and configs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    if results.speed:
        summarize(results, plan)
    if results.jitter:
        results.summary.extend(jitter.rows(results.jitter))
    if results.conditions:
        from bench import conditions

        results.summary.extend(conditions.rows(results.conditions))
    if results.pause:
        summarize_pause(results)
    if results.trace:
        summarize_trace(results)
    if results.vms:
        from bench import vms

        results.summary.extend(vms.rows(results.vms))
    if results.workers:
        from bench import workers

        results.summary.extend(workers.rows(results.workers))
    if results.timeline:
        from bench import timeline

        results.summary.extend(timeline.rows(results.timeline))
    if results.tcp:
        results.summary.extend(tcp.rows(results.tcp))
        results.notes.extend(tcp.notes(results.tcp))
    results.runtime_s = time.monotonic() - started
    if results.speed:
        print_tables(results, plan)
    if results.pause:
        print_pause(results.pause)
    if results.tcp:
        print_tcp(results.tcp)
    out.print()
    results.summary_markdown = summary_text(results)
    print(results.summary_markdown, flush=True)
    for note in results.notes:
        out.print(f"Note: {note}")
    kind = f"{args.only} row" if args.only else "quick" if plan.quick else "full"
    out.print(f"{kind} run, {results.runtime_s:.0f} s, "
              f"daemon fail_mode = closed, {'1, 100 and 500 VMs' if args.only == 'vms' else '2 VMs' if args.only == 'workers' else '1 VM'}, "
              f"{os.cpu_count()} cores")
    if args.json:
        args.json.write_text(json.dumps(asdict(results), indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
