"""Prometheus metrics built from one daemon status reply, for `GET /metrics`.

The daemon owns the counters; this module only restates a status reply (``assign.status``) in
Prometheus' text format. Each scrape gets a fresh registry, so a VM removed from the host
configuration disappears from the next scrape instead of lingering as a stale series.
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "StatusCollector", "registry", "render"]

DIRECTIONS = ("uplink", "downlink")

# (metric name, help, key in a direction's counters)
_DIRECTION_COUNTERS = (
    ("netskin_packets", "Packets seen by the engine, before loss, queue or mtu drops.", "packets"),
    ("netskin_bytes", "IP bytes seen, before any drop.", "bytes"),
    ("netskin_passed_packets", "Packets delivered (immediately or after being held).", "passed_packets"),
    ("netskin_passed_bytes", "IP bytes delivered.", "passed_bytes"),
)


class StatusCollector:
    """A collector over one status reply; ``None`` means the daemon did not answer."""

    def __init__(self, reply: dict | None) -> None:
        self.reply = reply

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("netskin_daemon_up", "1 if the daemon answered this scrape's status request.")
        up.add_metric([], 0 if self.reply is None else 1)
        yield up
        if self.reply is None:
            return
        vms: dict[str, dict] = self.reply.get("vms") or {}

        for name, help_text, key in _DIRECTION_COUNTERS:
            family = CounterMetricFamily(name, help_text, labels=["vm", "direction"])
            for vm, st in vms.items():
                for direction in DIRECTIONS:
                    family.add_metric([vm, direction], st[direction][key])
            yield family

        dropped = CounterMetricFamily(
            "netskin_dropped_packets",
            "Packets the engine dropped, by reason (loss, queue, mtu, overflow, error); firewall "
            "drops are in netskin_firewall_hits.",
            labels=["vm", "direction", "reason"],
        )
        held = GaugeMetricFamily("netskin_held_packets", "Packets held in the delay/rate queue now.",
                                 labels=["vm", "direction"])
        for vm, st in vms.items():
            for direction in DIRECTIONS:
                counters = st[direction]
                for reason, count in sorted(counters.get("drops", {}).items()):
                    dropped.add_metric([vm, direction, reason], count)
                held.add_metric([vm, direction], counters["held_packets"])
        yield dropped
        yield held

        # Optional per-VM sections: absent (older daemon, feature off) means no samples.
        dns = CounterMetricFamily("netskin_dns_answers", "DNS answers given to the VM, by outcome.",
                                  labels=["vm", "outcome"])
        firewall = CounterMetricFamily("netskin_firewall_hits", "Packets matched by each firewall rule (\"default in/out\": by no rule).",
                                       labels=["vm", "rule"])
        for vm, st in vms.items():
            for outcome, count in sorted((st.get("dns") or {}).items()):
                dns.add_metric([vm, outcome], count)
            rules = st.get("firewall") or {}
            for rule in rules.get("rules") or []:
                firewall.add_metric([vm, str(rule["rule"])], rule["hits"])
            # Packets no rule matched, which the profile's default action took.
            for direction, hits in sorted((rules.get("default_hits") or {}).items()):
                firewall.add_metric([vm, f"default {direction}"], hits)
        yield dns
        yield firewall

        errors = CounterMetricFamily("netskin_errors",
                                     "Packets whose handling raised (verdicted by fail_mode; see the log).",
                                     labels=["vm"])
        for vm, st in vms.items():
            errors.add_metric([vm], st.get("errors", 0))
        yield errors

        # Asked versus measured, per direction, over the daemon's last few seconds.
        asked_delay = GaugeMetricFamily("netskin_asked_delay_seconds", "One-way delay the skin asks for.",
                                        labels=["vm", "direction"])
        measured_delay = GaugeMetricFamily("netskin_measured_added_delay_seconds",
                                           "Added delay the engine gave delivered packets, by quantile.",
                                           labels=["vm", "direction", "quantile"])
        asked_loss = GaugeMetricFamily("netskin_asked_loss_ratio", "Loss probability the skin asks for.",
                                       labels=["vm", "direction"])
        measured_loss = GaugeMetricFamily("netskin_measured_loss_ratio", "Share of packets lost to the skin's loss.",
                                          labels=["vm", "direction"])
        delivered = GaugeMetricFamily("netskin_measured_delivered_bits_per_second",
                                      "IP bits per second delivered over the window.", labels=["vm", "direction"])
        late = GaugeMetricFamily("netskin_release_lateness_seconds",
                                 "How late held packets were released (p99 over the window).", labels=["vm", "direction"])
        out_of_tolerance = GaugeMetricFamily("netskin_out_of_tolerance",
                                             "Measured conditions outside their tolerance (count of findings).",
                                             labels=["vm"])
        for vm, st in vms.items():
            for direction, figures in sorted((st.get("conditions") or {}).items()):
                asked, measured = figures.get("asked") or {}, figures.get("measured") or {}
                asked_delay.add_metric([vm, direction], asked.get("delay_ms", 0) / 1000)
                asked_loss.add_metric([vm, direction], asked.get("loss_percent", 0) / 100)
                for quantile in ("p50", "p99"):
                    value = (measured.get("added_delay_ms") or {}).get(quantile)
                    if value is not None:
                        measured_delay.add_metric([vm, direction, f"0.{quantile[1:]}"], value / 1000)
                if measured.get("loss_percent") is not None:
                    measured_loss.add_metric([vm, direction], measured["loss_percent"] / 100)
                if measured.get("delivered_kbps") is not None:
                    delivered.add_metric([vm, direction], measured["delivered_kbps"] * 1000)
                if (measured.get("late_ms") or {}).get("p99") is not None:
                    late.add_metric([vm, direction], measured["late_ms"]["p99"] / 1000)
            if "out_of_tolerance" in st:
                out_of_tolerance.add_metric([vm], len(st["out_of_tolerance"]))
        yield from (asked_delay, measured_delay, asked_loss, measured_loss, delivered, late, out_of_tolerance)

        generation = GaugeMetricFamily("netskin_skin_generation",
                                       "Assignment generation of the VM (rises with every swap).",
                                       labels=["vm"])
        reload_error = GaugeMetricFamily("netskin_reload_error",
                                         "1 if the VM's edited skin file failed to reload (last good kept).",
                                         labels=["vm"])
        for vm, st in vms.items():
            generation.add_metric([vm], st["generation"])
            reload_error.add_metric([vm], 1 if st.get("reload_error") else 0)
        yield generation
        yield reload_error

        workers = (self.reply.get("host") or {}).get("workers") or []
        if workers:
            restarts = CounterMetricFamily("netskin_worker_restarts",
                                           "Times an engine worker process was started again after it died.",
                                           labels=["worker"])
            owned = GaugeMetricFamily("netskin_worker_vms", "VMs an engine worker owns.", labels=["worker"])
            for worker in workers:
                restarts.add_metric([str(worker["worker"])], worker["restarts"])
                owned.add_metric([str(worker["worker"])], worker["vms"])
            yield restarts
            yield owned


def registry(reply: dict | None) -> CollectorRegistry:
    fresh = CollectorRegistry(auto_describe=False)
    fresh.register(StatusCollector(reply))
    return fresh


def render(reply: dict | None) -> bytes:
    """The Prometheus text exposition of one status reply (``None``: daemon down)."""
    return generate_latest(registry(reply))
