"""One engine worker against two (``python -m bench.run --only workers``).

A lab with two VMs. Four sweeps of the highest rate of 64-byte UDP with < 0.1 % loss:

- the bare netfilterqueue loop, one VM flooding (one process on one core: the baseline);
- two bare loops, one per VM, each on its own queue pair (``bench.bare_loop --workers 2``), both
  VMs flooding at once: what this machine gives two queue processes at all;
- the daemon with ``workers = 1``, both VMs flooding at once (half the rate each);
- the daemon with ``workers = 2``, both VMs flooding at once: each VM owned by its own worker.

The two floods run concurrently from the VMs' namespaces to the two iperf3 servers; their sum is
the rate. Loss counts what did not arrive plus the queues' backlog late in the run (the excess a
too-slow consumer would lose in a longer run; see ``Harness.udp_flood``). The whole daemon's CPU
(every thread and child process) per packet is read at a fixed total rate in each setting, so
the cost of a second process shows. On a two-core machine the senders, the kernel's softirqs
and the workers share the same two cores, so the two-worker figure is the machine's, not the
design's ceiling.
"""

from __future__ import annotations

import json
import math
import subprocess
import threading
import time
from pathlib import Path

from bench.harness import BACKLOG_SAMPLE_S, BenchError, Harness, machine_cpu_seconds, tree_cpu_seconds
from bench.stats import median

VMS = ("vm1", "vm2")
CPU_PPS = 20_000


def flood_both(h: Harness, pps: float, seconds: float, payload_bytes: int = 64) -> dict:
    """``pps`` in total, half from each VM at once; the combined result in ``udp_flood``'s keys."""
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        start = time.monotonic()
        while not done.wait(BACKLOG_SAMPLE_S):
            samples.append((time.monotonic() - start, h.queue_backlog()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    procs = []
    try:
        for vm, port in zip(VMS, h.lab.iperf3_ports):
            procs.append(h.popen(vm, ["iperf3", "--json", "-c", h.lab.inet_address, "-p", port,
                                      "--connect-timeout", 3000, "-u", "-l", payload_bytes,
                                      "-b", int(pps / 2 * payload_bytes * 8), "-t", seconds, "-w", "4M"]))
        reports = []
        for proc in procs:
            try:
                stdout, stderr = proc.communicate(timeout=seconds + 15)
            except subprocess.TimeoutExpired:
                h.stop(proc)
                raise BenchError("a two-VM flood did not finish") from None
            report = json.loads(stdout) if stdout.strip() else {"error": stderr}
            if "error" in report:
                raise BenchError(f"iperf3: {report['error']}")
            reports.append(report)
    finally:
        done.set()
        sampler.join()
        for proc in procs:
            h.stop(proc)
    late = sorted(b for t, b in samples if seconds / 2 <= t <= 0.95 * seconds)
    backlog = late[len(late) // 2] if late else 0
    sent = sum(r["end"]["sum_sent"]["packets"] for r in reports)
    arrived = sum(r["end"]["sum_received"]["packets"] - r["end"]["sum_received"]["lost_packets"] for r in reports)
    duration = max(r["end"]["sum_sent"]["seconds"] for r in reports)
    return {"offered_pps": pps, "sent": sent, "received": arrived, "backlog": backlog, "seconds": duration,
            "sent_pps": sent / duration, "received_pps": arrived / duration,
            "loss": (sent - arrived + backlog) / sent if sent else 1.0}


def config_with_workers(h: Harness, workers: int) -> Path:
    path = h.workdir / f"bench-workers-{workers}.toml"
    path.write_text(f"workers = {workers}\n" + h.daemon_config.read_text())
    return path


def cpu_per_packet(h: Harness, pid: int | list, seconds: float) -> dict:
    """Per queued packet at CPU_PPS over both VMs: the CPU of ``pid``'s process tree (or of
    every process of a list of bare loops) and of the whole machine."""
    def cpu() -> float:
        return sum(tree_cpu_seconds(p.pid) for p in pid) if isinstance(pid, list) else tree_cpu_seconds(pid)

    cpu0, machine0, queues0 = cpu(), machine_cpu_seconds(), h.queue_counters()
    flood = flood_both(h, CPU_PPS, seconds)
    cpu1, machine1, queues1 = cpu(), machine_cpu_seconds(), h.queue_counters()
    queued = sum(c.queued - queues0[q].queued for q, c in queues1.items() if q in queues0)
    return {"daemon_us_per_packet": 1e6 * (cpu1 - cpu0) / queued if queued else math.nan,
            "machine_us_per_packet": 1e6 * (machine1 - machine0) / queued if queued else math.nan,
            "loss": flood["loss"]}


def measure(h: Harness, plan, *, repeats: int = 2, step=print) -> dict:
    """``plan``: bench.run's plan, for its sweep (``bench.run.sweep``)."""
    from bench.run import sweep  # bench.run imports this module when it runs this row
    out: dict = {"bare_loop": [], "bare_loops_2": [], "workers_1": [], "workers_2": [], "cpu": {}}
    base = h.daemon_config
    for round_ in range(repeats):
        step(f"workers: round {round_ + 1}/{repeats}: the bare loop, one VM")
        loop = h.start_bare_loop()
        try:
            out["bare_loop"].append(sweep(h, plan)["max_pps"])
        finally:
            h.stop(loop)
            h.hv_pid = None
        step(f"workers: round {round_ + 1}/{repeats}: two bare loops, a VM each (the machine's own scaling)")
        interfaces = [arg for vm in VMS for arg in ("--interface", h.lab.vm(vm).interface)]
        loops = []
        try:
            for k in (0, 1):
                loops.append(h.python("hv", "bench.bare_loop", *interfaces, "--queue-base", 7700,
                                      "--workers", 2, "--worker", k))
                h.wait_ready(loops[-1], f"bare loop {k}")
            h.hv_pid = loops[0].pid
            flood_both(h, 20_000, 1.0)  # warm-up
            if round_ == 0:
                out["cpu"]["bare_loops_2"] = cpu_per_packet(h, loops, 4.0)
            out["bare_loops_2"].append(sweep(h, plan, lambda pps, s: flood_both(h, pps, s))["max_pps"])
        finally:
            for loop in reversed(loops):
                h.stop(loop)
            h.hv_pid = None
        for workers in (1, 2):
            step(f"workers: round {round_ + 1}/{repeats}: the daemon with workers = {workers}, two VMs")
            h.daemon_config = config_with_workers(h, workers)
            try:
                daemon = h.start_daemon()
                try:
                    status = h.request("status")
                    placed = sorted(entry["worker"] for entry in status["vms"].values())
                    if placed != list(range(workers)) * (2 // workers):
                        raise BenchError(f"workers = {workers}: VMs placed on workers {placed}")
                    flood_both(h, 20_000, 1.0)  # warm-up
                    if round_ == 0:
                        out["cpu"][f"workers_{workers}"] = cpu_per_packet(h, daemon.pid, 4.0)
                    out[f"workers_{workers}"].append(
                        sweep(h, plan, lambda pps, s: flood_both(h, pps, s))["max_pps"])
                finally:
                    h.stop_daemon(daemon)
            finally:
                h.daemon_config = base
    return {key: (median(value) if isinstance(value, list) else value) for key, value in out.items()} | {
        "runs": {key: value for key, value in out.items() if isinstance(value, list)}}


def rows(result: dict) -> list[dict]:
    bare, one, two = result["bare_loop"], result["workers_1"], result["workers_2"]
    bare_two = result["bare_loops_2"]
    out = [
        {"metric": "max rate, 2 bare loops (2 VMs) vs 1 bare loop (1 VM): the machine's scaling",
         "measured": f"{bare_two:,.0f} pps = {bare_two / bare:.2f}×", "goal": "—", "met": None},
        {"metric": "max rate, 1 worker (2 VMs) vs bare loop (1 VM)", "measured": f"{one:,.0f} pps = {one / bare:.2f}×",
         "goal": "≥ 1.00×", "met": one >= bare},
        {"metric": "max rate, 2 workers (2 VMs) vs bare loop (1 VM)",
         "measured": f"{two:,.0f} pps = {two / bare:.2f}×", "goal": "≥ 1.70×", "met": two >= 1.7 * bare},
        {"metric": "max rate, 2 workers vs 1 worker", "measured": f"{two / one:.2f}×", "goal": "—", "met": None},
        {"metric": "max rate, 2 workers vs 2 bare loops", "measured": f"{two / bare_two:.2f}×", "goal": "—",
         "met": None},
    ]
    names = {"bare_loops_2": "2 bare loops", "workers_1": "daemon, 1 worker", "workers_2": "daemon, 2 workers"}
    for key, cpu in result["cpu"].items():
        out.append({"metric": f"CPU per packet, {names[key]}, 2 VMs, {CPU_PPS:,} pps in all",
                    "measured": f"{cpu['daemon_us_per_packet']:.1f} µs (machine {cpu['machine_us_per_packet']:.1f} µs)",
                    "goal": "—", "met": None})
    return out


