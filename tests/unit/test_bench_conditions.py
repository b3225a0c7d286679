"""The asked-versus-measured bench rows' arithmetic (no traffic)."""

import pytest

from bench import conditions
from bench.oneway import OneWay


def _result(engine_delay=20.4, probe_delay=20.6, engine_loss=9.8, lost=300, rate=3990.0, probe=4010.0):
    return {
        "path_ms": 0.2,
        "uplink": {"sent": 3000, "lost": lost, "probe_delay_p50_ms": probe_delay, "asked": {},
                   "measured": {"added_delay_ms": {"p50": engine_delay}, "loss_percent": engine_loss}},
        "downlink": {"sent": 6000, "received": 3000, "probe_kbps": probe, "asked": {},
                     "measured": {"saturated_kbps": rate}},
    }


def test_each_figure_is_judged_against_the_probe():
    rows = conditions.rows(_result())
    assert [r["met"] for r in rows] == [True, True, True]
    assert rows[0]["value"] == pytest.approx(-0.2) and rows[1]["value"] == pytest.approx(-0.2)
    assert rows[2]["value"] == pytest.approx(3990 / 4010 - 1)


def test_disagreement_beyond_the_tolerance_is_not_met():
    rows = conditions.rows(_result(engine_delay=22.0, engine_loss=12.0, rate=4400.0))
    assert [r["met"] for r in rows] == [False, False, False]


def test_missing_figures_leave_their_row_out():
    result = _result()
    result["uplink"]["measured"] = None
    result["downlink"]["probe_kbps"] = None
    assert conditions.rows(result) == []


def test_probe_rate_is_ip_bytes_over_the_arrival_span():
    # 1001 datagrams, one every ms, each delayed 5 ms: 1000 intervals of 1 ms → 1028 B/ms.
    stream = OneWay(sent=1001, delays_ms={seq: 5.0 for seq in range(1001)})
    assert conditions._probe_kbps(stream, 1000) == pytest.approx(1028 * 8)
