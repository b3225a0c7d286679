"""The TCP bench rows' arithmetic: per-run figures and the judgement of the two goals."""

import math

import pytest

from bench import tcp
from bench.harness import _goodput


def _summary(gbps: dict, machine_s_per_gb: dict | None = None) -> dict:
    machine = machine_s_per_gb or {}
    return {key: {"goodput_bps": value * 1e9, "machine_cpu_s_per_gb": machine.get(key, 1.0)}
            for key, value in gbps.items()}


PATHS_GBPS = {"no_queue": 10.0, "host_segments": 5.0, "bare_loop": 0.8, "bare_loop_gso": 4.0,
              "pass_through": 1.2, "delay": 0.9, "rate": 0.98, "delay_segments": 0.3}


def test_goodput_skips_slow_start_and_the_last_interval_but_counts_the_whole_run() -> None:
    intervals = [{"sum": {"seconds": 1.0, "bytes": b}} for b in (10, 100, 100, 7)]
    result = _goodput(intervals, skip_s=1.0)
    assert result["bits_per_second"] == 8 * 200 / 2.0
    assert result["run_bytes"] == 217


def test_per_run_figures_count_queue_packets_per_segment() -> None:
    goodput = {"bits_per_second": 1e9, "run_bytes": 1448 * 1000, "interval_bits_per_second": [1e9], "retransmits": 3}
    figures = tcp.per_run_figures(goodput, wall_s=2.0, machine_cpu_s=1.0, queue_cpu_s=0.5,
                                  crossed={"uplink": 1000, "downlink": 400})
    assert figures["uplink_packets_per_segment"] == 1.0
    assert figures["uplink_packets_per_s"] == 500
    assert figures["cpu_percent_of_core"] == 25
    assert figures["cpu_s_per_gb"] == pytest.approx(0.5 / (1448 * 1000 / 1e9))
    assert figures["retransmits"] == 3
    assert figures["cpu_us_per_packet"] == pytest.approx(1e6 * 0.5 / 1400)


def test_per_run_figures_without_a_queue_leave_the_queue_figures_out() -> None:
    goodput = {"bits_per_second": 1e9, "run_bytes": 1448, "interval_bits_per_second": [1e9]}
    figures = tcp.per_run_figures(goodput, wall_s=1.0, machine_cpu_s=1.0, queue_cpu_s=None, crossed=None)
    assert "cpu_s_per_gb" not in figures and "uplink_packets_per_s" not in figures


def test_summary_takes_medians_of_numbers_only() -> None:
    runs = [{"goodput_bps": v, "interval_mbps": [1.0], "retransmits": None} for v in (1.0, 3.0, 2.0)]
    assert tcp.summarize_runs(runs) == {"goodput_bps": 2.0}


def test_judge_ratios_and_goals() -> None:
    verdict = tcp.judge(_summary(PATHS_GBPS))
    assert verdict["vs_no_queue"]["pass_through"] == pytest.approx(0.12)
    assert verdict["vs_bare_loop"]["pass_through"] == pytest.approx(1.5)
    assert not verdict["delay_met"]  # 9 % of no queue
    assert verdict["rate_reachable"] and verdict["rate_met"]  # 0.98 Gbit/s of 1, pass-through 1.2
    assert verdict["super_packet_gain"] == pytest.approx(3.0)  # the same skin with gso = false
    gain_row = tcp.rows({"summary": _summary(PATHS_GBPS)})[3]
    assert gain_row["measured"].startswith("3.0×") and gain_row["met"] is None
    without = {k: v for k, v in PATHS_GBPS.items() if k != "delay_segments"}
    assert "super_packet_gain" not in tcp.judge(_summary(without)) and len(tcp.rows({"summary": _summary(without)})) == 3


def test_a_rate_pass_through_cannot_reach_is_not_met_and_says_so() -> None:
    gbps = {**PATHS_GBPS, "pass_through": 0.9, "rate": 0.89}
    verdict = tcp.judge(_summary(gbps))
    assert not verdict["rate_reachable"] and not verdict["rate_met"]
    rate_row = tcp.rows({"summary": _summary(gbps)})[2]
    assert "cannot be met here" in rate_row["measured"] and rate_row["met"] is False


def test_segmentation_share_is_of_the_extra_cost_per_gb() -> None:
    machine = {"no_queue": 1.0, "host_segments": 2.0, "bare_loop": 11.0}
    verdict = tcp.judge(_summary(PATHS_GBPS, machine))
    assert verdict["segmentation_share_cpu"] == pytest.approx(0.1)
    # time per GB: 1/10 → 1/5 is 0.1 s of the 1/0.8 − 1/10 = 1.15 s the bare loop adds
    assert verdict["segmentation_share_time"] == pytest.approx(0.1 / 1.15)
    assert math.isfinite(verdict["segmentation_share_time"])
