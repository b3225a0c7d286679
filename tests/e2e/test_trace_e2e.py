"""Trace-driven links for real: saturating UDP through a shipped Mahimahi trace, per second.

vm1 sends 1500-byte UDP packets uplink at 1.05 × the trace's peak through the daemon; a receiver
in inet takes kernel timestamps. Each one-second window of the trace's own clock (its phase
fixed by the first arrival) is compared with the trace's capacity in that window, as the
benchmark does (``bench.trace``). Statistical tolerance: the first window is left out (the
queue is filling); the median window and every other window must be within ±3 % of the trace's
peak second (measured here: within 0.1 %). Measured values are printed (pytest -s).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import trace as bench_trace
from interceptor import traces
from interceptor.schema import load_host_config
from manager.process import DaemonProcess

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 0.03
SECONDS = 7.0


@pytest.fixture(scope="module")
def daemon(lab_module):
    d = DaemonProcess(lab_module.config_path).start()
    yield d
    try:
        for vm in lab_module.vms:
            d.request("revert", vm=vm.name)
    finally:
        d.stop()


def saturate(lab, name: str) -> dict:
    trace = traces.load_file(name)
    rate = bench_trace.OVERSUBSCRIPTION * bench_trace.peak_rate_pps(trace)
    address = f"{lab.inet_address}:{bench_trace.RECEIVE_PORT}"
    python = [sys.executable, "-m"]
    receiver = lab.popen("inet", python + ["bench.trace", "receive", address, "--idle", "1.5",
                                           "--timeout", str(SECONDS + 30)],
                         cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout.readline().strip() == "ready"
        sender = lab.exec("vm1", python + ["bench.udp_tool", "send", address, "--count", str(int(rate * SECONDS)),
                                           "--rate", str(rate), "--size", str(bench_trace.PAYLOAD_BYTES)],
                          cwd=REPO, timeout=SECONDS + 30)
        assert sender.returncode == 0, sender.stderr
        out, err = receiver.communicate(timeout=40)
        assert receiver.returncode == 0, err
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.communicate()
    got = json.loads(out)
    return bench_trace.summary(trace, got["arrivals_ns"], got["sizes"])


@pytest.mark.parametrize("name", ["constant-12mbps", "onoff-24mbps-1s"])
def test_saturated_udp_follows_the_trace_per_second(lab_module, daemon, name):
    skins_dir = load_host_config(lab_module.config_path).skins_dir
    skin = bench_trace.trace_skin(name)
    path = skins_dir / f"{skin['name']}.json"
    path.write_text(json.dumps(skin))
    try:
        state = daemon.request("apply", vm="vm1", skin=skin["name"])["vms"]["vm1"]
        assert state["enforced_generation"] == state["generation"]
        result = saturate(lab_module, name)
    finally:
        daemon.request("revert", vm="vm1")
        path.unlink(missing_ok=True)
    windows = result["windows"]
    shown = ", ".join(f"{8 * w['measured_bytes'] / 1e6:.2f}/{8 * w['capacity_bytes'] / 1e6:.0f}" for w in windows)
    print(f"\n{name}: Mbit/s per window (measured/trace) {shown}; median error "
          f"{100 * result['median_error']:+.2f} %, worst {100 * result['worst_error']:+.2f} % of "
          f"{result['peak_mbit_s']:g} Mbit/s")
    assert len(windows) >= 4, windows
    assert abs(result["median_error"]) <= TOLERANCE
    assert all(abs(w["error"]) <= TOLERANCE for w in windows), shown
