"""Per-packet cost against the number of configured VMs (``python -m bench.run --only vms``).

The daemon runs with 1, 100 and 500 configured VMs: the lab's measured VM is listed last, after
idle VMs whose interfaces do not exist (configured, never applied to). For each count it floods
the measured VM's uplink at the CPU-measuring rate and reads, per queued packet, the CPU time of
the whole machine (every core, softirqs included), of the daemon process (which also pays, in
the kernel, for the packet's way on after its verdict: FORWARD and POSTROUTING, where the
downlink steering rules are walked) and the sender's time in the kernel (the packet's
PREROUTING, where the uplink steering rules are walked, runs in the softirq of its send call;
read over the send loop of a second run at the same rate, ``bench.udp_tool send``, since
iperf3's own CPU figure takes in its start-up and swings several-fold between identical runs),
and how long the daemon took from exec to answering its control socket. With ``--profiles``
every VM is configured with a skin that has the firewall profile ``standard``, so the filter
table holds every VM's jumps and chains as well. The whole-machine
figure takes in everything else the machine runs, so on a shared machine it is the noisiest;
the daemon's and the sender's are attributable. The counts are interleaved over the rounds so
drift spreads over all of them; medians are reported, with ratios against the 1-VM figure.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

from bench.harness import Harness, machine_cpu_seconds, tree_cpu_seconds
from bench.stats import median

COUNTS = (1, 100, 500)
KEYS = ("machine_us_per_packet", "daemon_us_per_packet", "sender_kernel_us_per_packet")
START_TIMEOUT_S = 120.0


FIREWALL_SKIN = {"name": "bench-vms-firewall", "security_profile": "standard"}


def config_with(h: Harness, count: int, profiled: bool = False) -> Path:
    """The bench's host config with only the measured VM, listed after ``count - 1`` idle VMs;
    ``profiled``: every VM configured with a skin that has a firewall profile."""
    text = h.daemon_config.read_text()
    head, _, tables = text.partition("\n[vms.")
    measured = re.search(rf"(?ms)^\[vms\.{re.escape(h.vm.name)}\]\n.*?(?=^\[|\Z)", "[vms." + tables)
    if measured is None:
        raise RuntimeError(f"{h.daemon_config}: no [vms.{h.vm.name}] table")
    skin = f'skin = "{FIREWALL_SKIN["name"]}"\n' if profiled else ""
    idle = "".join(f'[vms.idle{i}]\ninterface = "idle{i}"\naddress = "10.200.{i // 250}.{i % 250 + 1}"\n{skin}\n'
                   for i in range(count - 1))
    table = measured.group(0).replace("]\n", "]\n" + skin, 1)
    path = h.workdir / f"bench-{count}-vms{'-profiled' if profiled else ''}.toml"
    path.write_text(head + "\n\n" + idle + table)
    return path


def measure_one(h: Harness, count: int, pps: int, seconds: float, profiled: bool = False) -> dict:
    config, h.daemon_config = h.daemon_config, config_with(h, count, profiled)
    try:
        started = time.monotonic()
        daemon = h.start_daemon(timeout_s=START_TIMEOUT_S)
        start_s = time.monotonic() - started
        try:
            h.udp_flood(pps, min(1.0, seconds))  # warm-up: the first packets meet cold caches
            machine0, cpu0, queues0 = machine_cpu_seconds(), tree_cpu_seconds(daemon.pid), h.queue_counters()
            flood = h.udp_flood(pps, seconds)
            machine1, cpu1, queues1 = machine_cpu_seconds(), tree_cpu_seconds(daemon.pid), h.queue_counters()
            queued = sum(c.queued - queues0[q].queued for q, c in queues1.items() if q in queues0)
            # The sender's kernel time over its send loop alone, at the same rate: iperf3's own
            # figure covers its start and control connection, and read 0-9 µs per packet over
            # six runs of one configuration.
            sent = h.one_way("uplink", int(pps * seconds), pps, 64, idle_s=0.5)
            status = h.request("status")
        finally:
            h.stop_daemon(daemon)
    finally:
        h.daemon_config = config
    per_packet = (lambda s: 1e6 * s / queued if queued else float("nan"))
    return {"vms": count, "start_s": start_s, "queued": queued, "loss": flood["loss"],
            "machine_us_per_packet": per_packet(machine1 - machine0),
            "daemon_us_per_packet": per_packet(cpu1 - cpu0),
            "sender_kernel_us_per_packet": 1e6 * sent["send_kernel_s"] / sent["sent"] if sent["sent"] else float("nan"),
            "sender_loss": 1 - sent["received"] / sent["sent"] if sent["sent"] else float("nan"),
            "unclassified": status["host"].get("unclassified_packets")}


def measure(h: Harness, pps: int, seconds: float, rounds: int, step=print, profiled: bool = False) -> dict:
    if profiled:
        h.add_skins([FIREWALL_SKIN])
    runs: dict[int, list[dict]] = {count: [] for count in COUNTS}
    for round_ in range(rounds):
        for count in COUNTS:
            step(f"VM count {count}{', every VM with a firewall profile' if profiled else ''} "
                 f"(round {round_ + 1}/{rounds}): CPU per packet at {pps} pkt/s")
            runs[count].append(measure_one(h, count, pps, seconds, profiled))
    summary = {}
    for count, results in runs.items():
        # A run whose figure is missing (iperf3 reported no CPU use) is left out, not counted as 0.
        summary[count] = {key: median([r[key] for r in results if math.isfinite(r[key])] or [math.nan])
                          for key in ("start_s", *KEYS)}
    one = summary[COUNTS[0]]
    for count in COUNTS:
        for key in KEYS:
            summary[count][key.replace("us_per_packet", "ratio")] = summary[count][key] / one[key]
    return {"pps": pps, "seconds": seconds, "rounds": rounds, "profiled": profiled, "summary": summary,
            "runs": runs}


def rows(result: dict) -> list[dict]:
    """Summary rows: per count, per-packet CPU with ratios to one VM; the goal is within 10 %."""
    out = []
    for count, s in result["summary"].items():
        out.append({
            "metric": (f"{count} configured VM(s){' with firewall profiles' if result.get('profiled') else ''}: "
                       f"CPU per packet, daemon / sender's kernel / machine"),
            "measured": (f"{s['daemon_us_per_packet']:.1f} µs ({s['daemon_ratio']:.2f}×) / "
                         f"{s['sender_kernel_us_per_packet']:.1f} µs ({s['sender_kernel_ratio']:.2f}×) / "
                         f"{s['machine_us_per_packet']:.1f} µs ({s['machine_ratio']:.2f}×); "
                         f"start {s['start_s']:.1f} s"),
            "goal": "within 10 % of 1 VM (daemon, sender)",
            "met": s["daemon_ratio"] <= 1.10 and s["sender_kernel_ratio"] <= 1.10,
        })
    return out
