"""How `netskin status` and `netskin top` show a VM's timeline."""

from __future__ import annotations

from manager.cli import _timeline_cell, _timeline_text, _top_data

RUNNING = {"steps": 3, "repeat": "forever", "state": "running", "step": 2, "cycle": 4, "next_change_in_ms": 1234.5}
RAMP = {**RUNNING, "step": 3, "ramp": {"latency_ms": {"from": 0.0, "to": 200.0, "now": 75.0}}}


def test_status_line():
    assert _timeline_text(RUNNING) == "step 2/3, cycle 4/forever, next step in 1.2 s"
    assert _timeline_text(RAMP).endswith("; ramp latency_ms 75 → 200")
    assert _timeline_text({"steps": 2, "repeat": 1, "state": "holding", "step": 2, "cycle": 1,
                           "next_change_in_ms": None}) == "done: holding step 2/2 (after 1 cycle)"
    assert _timeline_text({"steps": 2, "repeat": 1, "state": "waiting", "step": None, "cycle": None,
                           "next_change_in_ms": 300_000}) == "starts in 5.0 min"


def test_top_cell_and_json():
    assert _timeline_cell(None) == "-"
    assert _timeline_cell(RUNNING) == "2/3 +1.2s"
    assert _timeline_cell(RAMP) == "3/3 ramp +1.2s"
    counters = {"packets": 0, "bytes": 0, "dropped_packets": 0, "held_packets": 0, "held_bytes": 0}
    vm = {"active": "flap", "generation": 1, "timeline": RUNNING, "uplink": counters, "downlink": counters}
    assert _top_data({"vm1": vm}, {}, 1.0)["vms"]["vm1"]["timeline"] == RUNNING
