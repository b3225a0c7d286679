"""manager.metrics: a status reply in, Prometheus text out, read back with prometheus_client's parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from manager.metrics import render


def _direction(packets: int, drops: dict[str, int], held: int) -> dict:
    dropped = sum(drops.values())
    return {
        "packets": packets, "bytes": packets * 100,
        "passed_packets": packets - dropped - held, "passed_bytes": (packets - dropped - held) * 100,
        "dropped_packets": dropped, "dropped_bytes": dropped * 100, "drops": drops,
        "held_packets": held, "held_bytes": held * 100, "held_total": held,
    }


SAMPLE = {
    "vms": {
        "vm1": {
            "active": "3g", "shadow": None, "generation": 4, "enforced_generation": 4,
            "reload_error": None, "errors": 6,
            "conditions": {"uplink": {"asked": {"delay_ms": 20, "loss_percent": 10},
                                      "measured": {"added_delay_ms": {"p50": 20.5, "p99": 22.0},
                                                   "loss_percent": 9.5, "delivered_kbps": 800,
                                                   "late_ms": {"p50": 0.1, "p99": 0.4}}}},
            "out_of_tolerance": ["uplink: something"],
            "uplink": _direction(1000, {"loss": 7, "queue": 2}, 3),
            "downlink": _direction(900, {"loss": 5, "queue": 0}, 0),
            # Sections a newer daemon adds; their absence is covered by vm2.
            "dns": {"rewritten": 3, "blocked": 1, "passed": 12},
            "firewall": {"profile": "restricted", "rules": [{"rule": "in tcp/22 allow", "hits": 9},
                                                            {"rule": "in icmp allow", "hits": 2}],
                         "default_hits": {"in": 4, "out": 30}},
        },
        "vm2": {
            "active": None, "shadow": "3g", "generation": 1, "enforced_generation": 1,
            "reload_error": "vm2.json: packet_loss_percent: 150 is out of range (allowed 0–100)",
            "uplink": _direction(10, {"loss": 0, "queue": 0, "mtu": 1}, 0),
            "downlink": _direction(0, {}, 0),
        },
    },
    "host": {"host_uplink_kbps": 0, "shared_uplink": None, "held_packets": 3},
}


def samples(reply) -> dict[tuple[str, frozenset], float]:
    text = render(reply).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def key(name: str, **labels: str) -> tuple[str, frozenset]:
    return name, frozenset(labels.items())


def test_counters_per_vm_and_direction():
    got = samples(SAMPLE)
    assert got[key("netskin_daemon_up")] == 1
    assert got[key("netskin_packets_total", vm="vm1", direction="uplink")] == 1000
    assert got[key("netskin_bytes_total", vm="vm1", direction="downlink")] == 90_000
    assert got[key("netskin_passed_packets_total", vm="vm1", direction="uplink")] == 1000 - 9 - 3
    assert got[key("netskin_passed_bytes_total", vm="vm2", direction="uplink")] == 900
    assert got[key("netskin_dropped_packets_total", vm="vm1", direction="uplink", reason="loss")] == 7
    assert got[key("netskin_dropped_packets_total", vm="vm1", direction="uplink", reason="queue")] == 2
    assert got[key("netskin_dropped_packets_total", vm="vm2", direction="uplink", reason="mtu")] == 1
    assert got[key("netskin_held_packets", vm="vm1", direction="uplink")] == 3
    assert got[key("netskin_skin_generation", vm="vm1")] == 4
    assert got[key("netskin_reload_error", vm="vm1")] == 0
    assert got[key("netskin_reload_error", vm="vm2")] == 1
    assert got[key("netskin_errors_total", vm="vm1")] == 6
    assert got[key("netskin_asked_delay_seconds", vm="vm1", direction="uplink")] == 0.02
    assert got[key("netskin_measured_added_delay_seconds", vm="vm1", direction="uplink", quantile="0.99")] == 0.022
    assert got[key("netskin_measured_loss_ratio", vm="vm1", direction="uplink")] == 0.095
    assert got[key("netskin_measured_delivered_bits_per_second", vm="vm1", direction="uplink")] == 800_000
    assert got[key("netskin_out_of_tolerance", vm="vm1")] == 1
    assert got[key("netskin_errors_total", vm="vm2")] == 0  # an older daemon without the field


def test_optional_sections_give_samples_only_where_present():
    got = samples(SAMPLE)
    assert got[key("netskin_dns_answers_total", vm="vm1", outcome="rewritten")] == 3
    assert got[key("netskin_firewall_hits_total", vm="vm1", rule="in tcp/22 allow")] == 9
    assert got[key("netskin_firewall_hits_total", vm="vm1", rule="in icmp allow")] == 2
    assert got[key("netskin_firewall_hits_total", vm="vm1", rule="default in")] == 4
    assert got[key("netskin_firewall_hits_total", vm="vm1", rule="default out")] == 30
    assert not [k for k in got if k[0].startswith(("netskin_dns", "netskin_firewall")) and ("vm", "vm2") in k[1]]


def test_metric_types():
    families = {f.name: f.type for f in text_string_to_metric_families(render(SAMPLE).decode())}
    assert families["netskin_packets"] == "counter"
    assert families["netskin_dropped_packets"] == "counter"
    assert families["netskin_held_packets"] == "gauge"
    assert families["netskin_skin_generation"] == "gauge"


def test_daemon_down_is_a_successful_scrape_saying_so():
    got = samples(None)
    assert got == {key("netskin_daemon_up"): 0}


def test_each_scrape_starts_fresh():
    render(SAMPLE)
    only_vm2 = {"vms": {"vm2": SAMPLE["vms"]["vm2"]}, "host": SAMPLE["host"]}
    got = samples(only_vm2)
    assert not [k for k in got if ("vm", "vm1") in k[1]]


def test_engine_workers_show_their_vms_and_restarts():
    reply = {**SAMPLE, "host": {**SAMPLE["host"], "workers": [
        {"worker": 0, "pid": 10, "vms": 1, "restarts": 0, "last_exit": None},
        {"worker": 1, "pid": 11, "vms": 1, "restarts": 2, "last_exit": "signal SIGKILL"}]}}
    got = samples(reply)
    assert got[key("netskin_worker_restarts_total", worker="1")] == 2
    assert got[key("netskin_worker_restarts_total", worker="0")] == 0
    assert got[key("netskin_worker_vms", worker="1")] == 1
    assert not [k for k in samples(SAMPLE) if k[0].startswith("netskin_worker")]  # an older daemon
