"""Asked versus measured: the daemon's own figures (``status --json`` → conditions) agree with a
probe outside the engine, within statistical tolerance, and a sound skin raises no flag."""

from __future__ import annotations

import statistics

import pytest

from manager.process import DaemonProcess
from bench import oneway
from tests.e2e.test_manager_e2e import netskin, write_skin

pytestmark = pytest.mark.e2e


def test_measured_delay_loss_and_rate_match_an_outside_probe(lab):
    write_skin(lab, "measured", uplink={"delay_ms": 20, "loss_percent": 10},
               downlink={"rate_kbps": 4000})
    with DaemonProcess(lab.config_path) as daemon:
        assert netskin(lab.config_path, "apply", "vm1", "measured").returncode == 0

        # Downlink: 1000 datagrams/s of ~1 kB (8.3 Mbit/s offered) for 6 s into a 4 Mbit/s limit.
        down = oneway.send(lab, "inet", "vm1", count=6000, rate_pps=1000, payload_bytes=1000, settle_s=0.5)
        conditions = daemon.status("vm1")["vm1"]["conditions"]["downlink"]
        assert conditions["asked"]["rate_kbps"] == pytest.approx(4000)
        measured = conditions["measured"]
        assert measured["window_s"] >= 4
        assert measured["saturated_kbps"] == pytest.approx(4000, rel=0.05), measured
        assert measured["queue_drops"] > 0  # the offered load really exceeded the limit
        # The probe sees the same rate: what arrived, over the time it arrived in.
        arrivals = sorted(down.delays_ms)
        assert down.received >= 0.4 * down.sent

        # Uplink: 3000 probes at 1000/s through 20 ms and 10 % loss.
        up = oneway.send(lab, "vm1", "inet", count=3000, rate_pps=1000)
        status = daemon.status("vm1")["vm1"]
        measured = status["conditions"]["uplink"]["measured"]
        asked = status["conditions"]["uplink"]["asked"]
        assert asked["delay_ms"] == 20 and asked["loss_percent"] == pytest.approx(10)
        # Loss: the engine counted the very drops the probe missed (window edges and the VM's own
        # background packets aside), and both lie in the binomial interval of 10 %.
        probe_loss = 100 * up.lost / up.sent
        assert measured["loss_percent"] == pytest.approx(probe_loss, abs=1.0), (measured, probe_loss)
        assert 8.3 <= probe_loss <= 11.9, probe_loss  # 99.9 % interval for n=3000, p=0.1
        # Added delay: the engine's hold time against the probe's one-way delay (its median
        # includes the path's own fraction of a millisecond).
        probe_p50 = statistics.median(up.delays_ms.values())
        assert measured["added_delay_ms"]["p50"] == pytest.approx(probe_p50, abs=1.0), (measured, probe_p50)
        assert 19.5 <= measured["added_delay_ms"]["p50"] <= 21.0
        assert measured["late_ms"]["p99"] < 20.0  # released about on time (a loose bound: shared cores)
        # Nothing flagged but, on a loaded machine, late releases (which are real).
        assert all("late" in line for line in status["out_of_tolerance"]), status["out_of_tolerance"]
        assert arrivals  # the downlink probe's delays were recorded


def test_an_overloaded_rate_limit_is_measured_at_its_rate_without_false_flags(lab):
    # 256 kbit/s offered 2 Mbit/s: delivered stays at the rate, queue drops are counted apart
    # from loss (asked 0 %), and nothing is flagged.
    write_skin(lab, "tight", downlink={"rate_kbps": 256, "delay_ms": 30})
    with DaemonProcess(lab.config_path) as daemon:
        assert netskin(lab.config_path, "apply", "vm1", "tight").returncode == 0
        oneway.send(lab, "inet", "vm1", count=1500, rate_pps=250, payload_bytes=1000, settle_s=0.5)
        status = daemon.status("vm1")["vm1"]
        measured = status["conditions"]["downlink"]["measured"]
        assert measured["saturated_kbps"] == pytest.approx(256, rel=0.05), measured
        assert measured["loss_percent"] == 0.0 and measured["queue_drops"] > 0
        assert all("late" in line for line in status["out_of_tolerance"]), status["out_of_tolerance"]
