"""The engine for real: delay, one-way loss, rate, jitter order and QoS measured through the daemon.

Each test runs the real daemon on the module's lab, applies a skin and measures real traffic
from inside the lab's namespaces. Tolerances are statistical (binomial intervals, medians) and
generous; the fidelity figures belong to the benchmark. Measured values are printed (pytest -s).
"""

from __future__ import annotations

import json
import re
import statistics
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench.stats import binomial_interval

from manager import measure
from bench import oneway
from manager.process import DaemonProcess

pytestmark = pytest.mark.e2e

DELAY_TOLERANCE = 0.15  # of the asked added delay
DELAY_FLOOR_MS = 2.0  # ... but never tighter than this (scheduling noise on a shared 2-core box)
RATE_TOLERANCE = 0.15  # of the asked rate
CONFIDENCE = 0.999  # of the binomial intervals


def close_to(measured: float, expected: float, tolerance: float, floor: float = 0.0) -> bool:
    return abs(measured - expected) <= max(tolerance * expected, floor)


@pytest.fixture
def lab(lab_module):
    return lab_module



def start_daemon(lab) -> DaemonProcess:
    return DaemonProcess(lab.config_path).start()


def stop_daemon(lab, daemon: DaemonProcess) -> None:
    # Assignments persist in the state dir: leave every VM without a skin for the next test.
    try:
        for vm in lab.vms:
            daemon.request("revert", vm=vm.name)
    finally:
        daemon.stop()


@pytest.fixture
def daemon(lab):
    d = start_daemon(lab)
    yield d
    stop_daemon(lab, d)


def apply(daemon: DaemonProcess, vm: str, skin: str) -> None:
    state = daemon.request("apply", vm=vm, skin=skin)["vms"][vm]
    assert state["active"] == skin and state["enforced_generation"] == state["generation"]


def rtts(lab, count: int = 20, interval: float = 0.05) -> dict:
    result = measure.ping(lab, "vm1", lab.inet_address, count=count, interval=interval)
    assert result["received"] == count, result
    return result


# --- 1. delay --------------------------------------------------------------------------------


def test_ping_rtt_rises_by_latency_ms_and_one_way_delays_follow_uplink_and_downlink(lab, daemon, skins):
    base = rtts(lab)["rtt_median_ms"]

    apply(daemon, "vm1", skins("rtt80", latency_ms=80))
    rise = rtts(lab)["rtt_median_ms"] - base
    print(f"\nbaseline RTT median {base:.2f} ms; latency_ms 80 -> rise {rise:.2f} ms")
    assert close_to(rise, 80, DELAY_TOLERANCE), f"latency_ms 80 raised the RTT median by {rise:.2f} ms"

    apply(daemon, "vm1", skins("asym", uplink={"delay_ms": 60}, downlink={"delay_ms": 10}))
    rise = rtts(lab)["rtt_median_ms"] - base
    up = oneway.send(lab, "vm1", "inet", count=100, rate_pps=200)
    down = oneway.send(lab, "inet", "vm1", count=100, rate_pps=200)
    up_ms, down_ms = statistics.median(up.delays_ms.values()), statistics.median(down.delays_ms.values())
    print(f"uplink 60 / downlink 10 ms -> RTT rise {rise:.2f} ms; one-way medians up {up_ms:.2f} ms, "
          f"down {down_ms:.2f} ms")
    assert close_to(rise, 70, DELAY_TOLERANCE), f"60 + 10 ms one-way raised the RTT median by {rise:.2f} ms"
    assert close_to(up_ms, 60, DELAY_TOLERANCE, DELAY_FLOOR_MS), f"uplink one-way median {up_ms:.2f} ms, asked 60"
    assert close_to(down_ms, 10, DELAY_TOLERANCE, DELAY_FLOOR_MS), f"downlink one-way median {down_ms:.2f} ms, asked 10"


# --- 2. one-way loss -------------------------------------------------------------------------

LOSS_PACKETS = 2000
LOSS_RATE_PPS = 2000


@pytest.mark.parametrize("lossy", ["uplink", "downlink"])
def test_one_way_loss_matches_the_asked_probability_in_its_direction_only(lab, daemon, skins, lossy):
    apply(daemon, "vm1", skins(f"loss20-{lossy}", **{lossy: {"loss_percent": 20}}))
    before = daemon.status("vm1")["vm1"]
    up = oneway.send(lab, "vm1", "inet", count=LOSS_PACKETS, rate_pps=LOSS_RATE_PPS)
    down = oneway.send(lab, "inet", "vm1", count=LOSS_PACKETS, rate_pps=LOSS_RATE_PPS)
    after = daemon.status("vm1")["vm1"]

    measured = {"uplink": up, "downlink": down}
    lo, hi = binomial_interval(LOSS_PACKETS, 0.8, CONFIDENCE)
    lossless = "downlink" if lossy == "uplink" else "uplink"
    counted = after[lossy]["drops"]["loss"] - before[lossy]["drops"]["loss"]
    judged = after[lossy]["packets"] - before[lossy]["packets"]
    print(f"\n{lossy} loss 20%: {lossy} delivered {measured[lossy].received}/{LOSS_PACKETS} "
          f"(99.9% interval {lo}-{hi}), daemon counted {counted} 'loss' drops; "
          f"{lossless} delivered {measured[lossless].received}/{LOSS_PACKETS}")
    assert lo <= measured[lossy].received <= hi
    # The other direction is untouched: any loss there is the host's, not the skin's (≤ 0.5%).
    assert measured[lossless].lost <= LOSS_PACKETS // 200, f"{lossless} lost {measured[lossless].lost}"
    assert after[lossless]["drops"] == before[lossless]["drops"]
    # Every datagram met the skin (none slipped past a full queue) and every loss is counted. The
    # VM's own background packets (IPv6 neighbour discovery, say) may add a few to both counts.
    stray = judged - LOSS_PACKETS
    assert 0 <= stray <= 10
    assert measured[lossy].lost <= counted <= measured[lossy].lost + stray


# --- 3. rate ---------------------------------------------------------------------------------


def test_tcp_and_udp_throughput_match_the_rate_of_each_direction(lab, daemon, skins):
    apply(daemon, "vm1", skins("asymrate", uplink={"rate_kbps": 2000}, downlink={"rate_kbps": 8000}))

    tcp_up = measure.iperf3(lab, "vm1", seconds=4)
    tcp_down = measure.iperf3(lab, "vm1", reverse=True, seconds=4)
    print(f"\nTCP goodput up {tcp_up / 1e6:.3f} Mbit/s (rate 2), down {tcp_down / 1e6:.3f} Mbit/s (rate 8)")

    before = daemon.status("vm1")["vm1"]
    udp = udp_iperf3(lab, "vm1", rate="3M", seconds=4)
    after = daemon.status("vm1")["vm1"]
    offered = after["uplink"]["packets"] - before["uplink"]["packets"]
    queue_drops = after["uplink"]["drops"]["queue"] - before["uplink"]["drops"]["queue"]
    print(f"UDP offered 3 Mbit/s up: received {udp['received_bps'] / 1e6:.3f} Mbit/s, "
          f"iperf3 lost {udp['lost_packets']}/{udp['packets']}; daemon queue drops {queue_drops}/{offered}")

    # Goodput is a few % under the IP-byte rate (headers); ±15% covers it.
    assert close_to(tcp_up, 2e6, RATE_TOLERANCE), f"TCP up {tcp_up / 1e6:.3f} Mbit/s, asked 2"
    assert close_to(tcp_down, 8e6, RATE_TOLERANCE), f"TCP down {tcp_down / 1e6:.3f} Mbit/s, asked 8"
    assert close_to(udp["received_bps"], 2e6, RATE_TOLERANCE), \
        f"UDP up received {udp['received_bps'] / 1e6:.3f} Mbit/s, asked 2"
    # A third of what is offered is over the rate; the 500 ms queue absorbs a little of it.
    assert 0.15 * offered <= queue_drops <= 0.45 * offered
    assert udp["lost_packets"] <= queue_drops  # what iperf3 missed is what the queue dropped
    assert {reason for reason, n in after["uplink"]["drops"].items() if n} == {"queue"}
    assert after["downlink"]["dropped_packets"] == 0


def udp_iperf3(lab, vm: str, rate: str, seconds: float) -> dict:
    """iperf3 UDP from the VM: what the server received, from the server's counts in the report."""
    done = lab.exec(vm, ["iperf3", "--json", "-u", "-b", rate, "-c", lab.inet_address,
                         "-p", lab.iperf3_ports[0], "-t", seconds], timeout=seconds + 30)
    report = json.loads(done.stdout)
    assert "error" not in report, report["error"]
    received = report["end"]["sum_received"]  # the server's packet counts, sent back at the end
    payload_bits = 8 * report["start"]["test_start"]["blksize"]
    return {
        "received_bps": (received["packets"] - received["lost_packets"]) * payload_bits / received["seconds"],
        "packets": received["packets"],
        "lost_packets": received["lost_packets"],
    }


# --- 4. jitter keeps order -------------------------------------------------------------------


def test_jitter_spreads_rtt_but_keeps_order_unless_reordering_is_asked(lab, daemon, skins):
    base = rtts(lab, count=30)

    apply(daemon, "vm1", skins("jitter", latency_ms=40, jitter_ms=20))
    jittery = rtts(lab, count=30)
    burst = oneway.send(lab, "vm1", "inet", count=600, rate_pps=1000)
    spread, base_spread = statistics.stdev(jittery["rtts_ms"]), statistics.stdev(base["rtts_ms"])
    print(f"\nRTT stdev {base_spread:.2f} ms -> {spread:.2f} ms with jitter 20 ms "
          f"(median {jittery['rtt_median_ms']:.2f} ms); burst of 600 at 1000/s: "
          f"received {burst.received}, reordered {burst.reordered}")
    # Two independent uniform ±20 ms jitters: stdev ≈ 16 ms.
    assert spread >= 8 and spread >= 4 * base_spread
    assert burst.received == 600
    assert burst.reordered == 0

    # Jitter 10 ms around 20 ms each way: every in-order packet waits 10–30 ms, so the ones sent
    # ahead (no delay) stand apart.
    apply(daemon, "vm1", skins("jitter-reorder", latency_ms=40, jitter_ms=10, reorder_percent=25))
    burst = oneway.send(lab, "vm1", "inet", count=600, rate_pps=1000)
    # Reordered packets skip the delay line; every in-order one waits at least 10 ms.
    ahead = sum(1 for d in burst.delays_ms.values() if d < 5)
    lo, hi = binomial_interval(burst.received, 0.25, CONFIDENCE)
    print(f"reorder 25%: received {burst.received}, reordered {burst.reordered}, "
          f"sent ahead {ahead} (99.9% interval {lo}-{hi})")
    assert burst.reordered > 0
    assert lo <= ahead <= hi


# --- 5. Gilbert-Elliott ----------------------------------------------------------------------


def test_gilbert_elliott_losses_come_in_bursts(lab, daemon, skins):
    p, r = 0.05, 0.30
    apply(daemon, "vm1", skins("bursty", loss_model={"gilbert_elliott": {"p": p * 100, "r": r * 100}}))
    before = daemon.status("vm1")["vm1"]["uplink"]
    up = oneway.send(lab, "vm1", "inet", count=LOSS_PACKETS, rate_pps=LOSS_RATE_PPS)
    after = daemon.status("vm1")["vm1"]["uplink"]
    judged = after["packets"] - before["packets"]
    counted = after["drops"]["loss"] - before["drops"]["loss"]
    bursts = up.loss_bursts()
    mean_burst = statistics.fmean(bursts) if bursts else 0.0
    loss = up.lost / up.sent
    expected = p / (p + r)
    print(f"\nGilbert-Elliott p {p:.0%} r {r:.0%}: lost {up.lost}/{up.sent} ({loss:.1%}, stationary "
          f"{expected:.1%}) in {len(bursts)} bursts, mean burst {mean_burst:.2f} (1/r = {1 / r:.2f}; "
          f"independent loss would give {1 / (1 - expected):.2f}); daemon judged {judged}, dropped {counted}")
    stray = judged - up.sent  # the VM's own background packets (neighbour discovery) may add a few
    assert 0 <= stray <= 10 and up.lost <= counted <= up.lost + stray  # every datagram met the skin
    assert mean_burst > 1.5
    # Correlated losses vary more than independent ones: widen the interval by the chain's
    # variance factor (1 + λ) / (1 − λ), λ = 1 − p − r.
    lam = 1 - p - r
    z = 3.29  # 99.9 %, two-sided
    half_width = z * (up.sent * expected * (1 - expected) * (1 + lam) / (1 - lam)) ** 0.5
    assert abs(up.lost - up.sent * expected) <= half_width


# --- 6. QoS on a shared host uplink ----------------------------------------------------------

HOST_UPLINK_KBPS = 10_000


@pytest.fixture
def shared_uplink(lab):
    """The module lab's host config with host_uplink_kbps set, restored afterwards."""
    original = lab.config_path.read_text()
    text, n = re.subn(r"(?m)^host_uplink_kbps = \d+$", f"host_uplink_kbps = {HOST_UPLINK_KBPS}", original)
    assert n == 1, "the lab's host config has no host_uplink_kbps line to change"
    lab.config_path.write_text(text)
    try:
        d = start_daemon(lab)
        try:
            yield d
        finally:
            stop_daemon(lab, d)
    finally:
        lab.config_path.write_text(original)


def test_qos_priorities_8_and_2_split_a_contended_host_uplink_4_to_1(lab, shared_uplink, skins):
    daemon = shared_uplink
    apply(daemon, "vm1", skins("qos8", qos_priority=8))
    apply(daemon, "vm2", skins("qos2", qos_priority=2))

    with ThreadPoolExecutor(2) as pool:
        high = pool.submit(measure.iperf3, lab, "vm1", lab.iperf3_ports[0], seconds=6)
        low = pool.submit(measure.iperf3, lab, "vm2", lab.iperf3_ports[1], seconds=6)
        high_bps, low_bps = high.result(), low.result()
    alone_bps = measure.iperf3(lab, "vm2", lab.iperf3_ports[1], seconds=3)
    ratio = high_bps / low_bps if low_bps else float("inf")
    total = high_bps + low_bps
    print(f"\nhost_uplink 10 Mbit/s: priority 8 got {high_bps / 1e6:.3f}, priority 2 got {low_bps / 1e6:.3f} "
          f"Mbit/s (ratio {ratio:.2f}, sum {total / 1e6:.3f}); priority 2 alone {alone_bps / 1e6:.3f} Mbit/s")
    assert 2.5 <= ratio <= 6
    assert close_to(total, HOST_UPLINK_KBPS * 1000, 0.20)
    assert close_to(alone_bps, HOST_UPLINK_KBPS * 1000, 0.20)
