"""Benchmark row: the longest data-path pause while skin files are rewritten and applies run.

A pause of the daemon's event loop shows as held packets released late. vm1 sends a steady UDP
probe uplink through a skin with a constant delay; the kernel stamps each datagram as it leaves
vm1 (the sender's SCM_TSTAMP_SCHED) and as it reaches the receiver in inet; both stamps read the
same clock, so each packet's one-way delay is exact. Lateness = one-way delay − the path's own
delay without a skin (median) − the asked one-way delay. The same figures taken from the
sender's clock read before its send call are kept beside them ("from_send_call"): those also
count the sender's own waits between reading its clock and the packet leaving. The probe runs
twice with the same skin: alone (the baseline), then while drop-in skin files are rewritten
(hot reload) and ``netskin apply`` alternates between two skins with the same delay, so the
asked delay never changes and any extra lateness is the control plane's work reaching the
data path. Only packets sent between the first and the last churn action are counted.

    python -m bench.pause receive 10.77.0.2:9102 --idle 1.0 --timeout 60   (in a namespace)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from bench.stats import median, percentile
from bench.udp_tool import HEADER, datagrams

PROBE_PORT = 9102
LATENCY_MS = 20.0  # the skins' round-trip delay: half of it is added to each direction
ASKED_ONE_WAY_MS = LATENCY_MS / 2
SKIN_A = {"name": "bench-pause-a", "latency_ms": LATENCY_MS}
SKIN_B = {"name": "bench-pause-b", "latency_ms": LATENCY_MS, "jitter_ms": 0}
MAX_PROBE_S = 300  # the sender's cap; it is stopped when the measurement ends
REWRITE_SPACING_S = 0.2  # the second file of an apply's pair is written this long after the first


@dataclass(frozen=True)
class PausePlan:
    rate_pps: int = 1000
    base_seconds: float = 2.0  # probe with no skin: the path's own one-way delay
    baseline_seconds: float = 8.0  # probe with the skin, no churn
    file_rewrites: int = 100
    applies: int = 50
    warmup_s: float = 0.3


def filler_skin(index: int, generation: int) -> dict:
    """A drop-in skin that no VM uses; each rewrite changes its content."""
    return {"name": f"bench-pause-fill-{index:03d}", "latency_ms": 50 + index + 100 * generation}


def churn_files(plan: PausePlan) -> list[dict]:
    """The files rewritten during the churn: the two applied skins (delay kept) and fillers."""
    files = [dict(SKIN_A, qos_priority=6), dict(SKIN_B, qos_priority=6)]
    files += [filler_skin(i, 1) for i in range(plan.file_rewrites - len(files))]
    return files


def all_skins(plan: PausePlan) -> list[dict]:
    """What must be in skins_dir before the daemon starts (a new file makes it rescan)."""
    return [SKIN_A, SKIN_B, *(filler_skin(i, 0) for i in range(plan.file_rewrites - 2))]


# --- the receiver (runs in the inet namespace) ---------------------------------------------


def receive(bind: str, idle_s: float, timeout_s: float) -> dict:
    """Record (sequence, send ns, receive ns) of each datagram until idle_s passes with none."""
    seqs, sent, received = [], [], []
    for data, arrived_ns in datagrams(bind, idle_s, timeout_s, 2048):
        if len(data) >= HEADER.size:
            seq, sent_ns = HEADER.unpack_from(data)
            seqs.append(seq)
            sent.append(sent_ns)
            received.append(arrived_ns)
    return {"seq": seqs, "sent_ns": sent, "received_ns": received}


# --- the measurement (runs in the bench process) -------------------------------------------


def probe(h, plan: PausePlan, during) -> dict:
    """Send the probe vm1 → inet while ``during()`` runs.

    ``during()`` returns the (start, end) CLOCK_REALTIME ns window whose packets count, or None
    for all of them (after the warm-up). The sender is stopped once it returns; loss is read
    from the sequence numbers that arrived. Each packet's one-way delay is taken twice: from the
    kernel's stamp as it left vm1 ("delays_ms", the wire) and from the sender's clock read just
    before its send call ("app_delays_ms"), which also takes in any wait of the sender between
    the two; without the kernel's stamps (a send failed) the first is the second.
    """
    receiver = h.python("inet", "bench.pause", "receive", f"{h.lab.inet_address}:{PROBE_PORT}",
                        "--idle", 1.0, "--timeout", MAX_PROBE_S + 30)
    h.wait_ready(receiver, "the pause probe receiver")
    sender = h.python("vm1", "bench.udp_tool", "send", f"{h.lab.inet_address}:{PROBE_PORT}",
                      "--count", int(plan.rate_pps * MAX_PROBE_S), "--rate", plan.rate_pps, "--size", 64,
                      "--tx-stamps")
    try:
        time.sleep(plan.warmup_s)
        window = during()
        time.sleep(2 * ASKED_ONE_WAY_MS / 1000 + 0.2)  # the last counted packets are still held
        sender.send_signal(signal.SIGTERM)  # it ends with its send stamps
        sent = h.finish(sender, "the pause probe sender", 30)
    finally:
        h.stop(sender)
    got = h.finish(receiver, "the pause probe receiver", 30)
    if window is None:
        first_ns = min(got["sent_ns"], default=0) + int(plan.warmup_s * 1e9)
        window = (first_ns, max(got["sent_ns"], default=0))
    tx_ns = sent.get("tx_ns") or []
    delays_ms, app_delays_ms = {}, {}
    for seq, sent_ns, received_ns in zip(got["seq"], got["sent_ns"], got["received_ns"]):
        if window[0] <= sent_ns <= window[1] and seq not in app_delays_ms:
            app_delays_ms[seq] = (received_ns - sent_ns) / 1e6
            wire_ns = tx_ns[seq] if seq < len(tx_ns) and tx_ns[seq] > 0 else sent_ns
            delays_ms[seq] = (received_ns - wire_ns) / 1e6
    expected = max(delays_ms) - min(delays_ms) + 1 if delays_ms else 0
    return {"delays_ms": list(delays_ms.values()), "app_delays_ms": list(app_delays_ms.values()),
            "send_stamps": bool(tx_ns), "lost": expected - len(delays_ms),
            "window_s": (window[1] - window[0]) / 1e9}


def lateness(delays_ms: list[float], base_ms: float) -> dict:
    late = [d - base_ms - ASKED_ONE_WAY_MS for d in delays_ms]
    if not late:
        return {"packets": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    return {"packets": len(late), "p50_ms": percentile(late, 50), "p99_ms": percentile(late, 99),
            "max_ms": max(late), "over_2ms": sum(v > 2.0 for v in late), "min_ms": min(late)}


class Churn:
    """Runs the ``netskin apply`` calls back to back and rewrites two drop-in files per apply:
    one as the apply starts, one while it runs, so file events land throughout the window."""

    def __init__(self, h, plan: PausePlan) -> None:
        self.h = h
        self.plan = plan
        self.skins_dir = h.workdir / "skins.d"
        self.apply_seconds: list[float] = []
        self.apply_failures: list[str] = []
        self.rewrites = 0
        self.seconds = 0.0
        self._started = threading.Semaphore(0)

    def _rewrite(self) -> None:
        files = churn_files(self.plan)
        per_apply = -(-len(files) // self.plan.applies)
        for i, skin in enumerate(files):
            if i % per_apply == 0:
                self._started.acquire()
            else:
                time.sleep(REWRITE_SPACING_S)
            path = self.skins_dir / f"{skin['name']}.json"
            tmp = path.with_name(f".{skin['name']}.tmp")
            tmp.write_text(json.dumps(skin))
            os.replace(tmp, path)  # as an editor or a config manager writes it
            self.rewrites += 1

    def _apply(self) -> None:
        for i in range(self.plan.applies):
            skin = (SKIN_B if i % 2 == 0 else SKIN_A)["name"]
            began = time.monotonic()
            self._started.release()
            done = subprocess.run([sys.executable, "-m", "manager.cli", "apply", "vm1", skin,
                                   "--config", str(self.h.daemon_config)],
                                  cwd=self.h.workdir, env=self.h.env, capture_output=True, text=True, timeout=60)
            self.apply_seconds.append(time.monotonic() - began)
            if done.returncode != 0:
                self.apply_failures.append(f"apply {skin}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
        for _ in range(self.plan.file_rewrites):  # never leave the rewriter waiting
            self._started.release()

    def __call__(self) -> tuple[int, int]:
        start = time.monotonic()
        start_ns = time.time_ns()
        workers = [threading.Thread(target=self._rewrite), threading.Thread(target=self._apply)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        self.seconds = time.monotonic() - start
        return start_ns, time.time_ns()


def measure_pause(h, plan: PausePlan) -> dict:
    """The whole row on a fresh daemon: path delay, lateness alone, lateness under churn."""
    h.add_skins(all_skins(plan))
    daemon = h.start_daemon()
    try:
        h.revert()
        base = probe(h, plan, lambda: time.sleep(plan.base_seconds))
        base_ms, base_app_ms = median(base["delays_ms"]), median(base["app_delays_ms"])
        h.request("apply", vm="vm1", skin=SKIN_A["name"])
        # A plain timer loop in its own process beside each probe: how late the machine itself
        # wakes a timer, apart from anything the daemon does.
        timer = h.start_timer_probe(MAX_PROBE_S)
        baseline = probe(h, plan, lambda: time.sleep(plan.baseline_seconds))
        baseline["timer_probe"] = h.stop_timer_probe(timer)
        churn = Churn(h, plan)
        timer = h.start_timer_probe(MAX_PROBE_S)
        under_churn = probe(h, plan, churn)
        under_churn["timer_probe"] = h.stop_timer_probe(timer)
        generation = h.request("status", vm="vm1")["vms"]["vm1"]["generation"]
    finally:
        h.stop_daemon(daemon)
    return {
        "rate_pps": plan.rate_pps,
        "asked_one_way_ms": ASKED_ONE_WAY_MS,
        "path_one_way_ms": base_ms,
        "path_one_way_from_send_call_ms": base_app_ms,
        "send_stamps": base["send_stamps"] and baseline["send_stamps"] and under_churn["send_stamps"],
        "baseline": {**lateness(baseline["delays_ms"], base_ms), "lost": baseline["lost"],
                     "window_s": baseline["window_s"], "timer_probe": baseline["timer_probe"],
                     "from_send_call": lateness(baseline["app_delays_ms"], base_app_ms)},
        "churn": {**lateness(under_churn["delays_ms"], base_ms), "lost": under_churn["lost"],
                  "window_s": under_churn["window_s"], "timer_probe": under_churn["timer_probe"],
                  "from_send_call": lateness(under_churn["app_delays_ms"], base_app_ms),
                  "file_rewrites": churn.rewrites,
                  "applies": len(churn.apply_seconds), "apply_failures": churn.apply_failures,
                  "apply_s_median": median(churn.apply_seconds) if churn.apply_seconds else None},
        "generation": generation,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pause", description=__doc__.splitlines()[0])
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
