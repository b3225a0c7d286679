"""Asked versus measured as bench rows: the daemon's own figures (``status`` → ``conditions``)
against a probe outside the engine (``python -m bench.run --only conditions``; also in the full
and quick runs).

One skin asks for something of every kind: uplink ``delay_ms`` 20 and ``loss_percent`` 10,
downlink ``rate_kbps`` 4000. The probe (``bench.oneway``) sends numbered datagrams carrying
their send time and reads kernel receive timestamps, so it knows each datagram's one-way delay
and which were lost, without the engine's help: uplink 1000 datagrams/s of 64 bytes, downlink
1000/s of ~1 kB (8.3 Mbit/s offered into the 4 Mbit/s limit). The daemon's figures are read from
``status`` right after each stream, from its 5 s window.
"""

from __future__ import annotations

import statistics

from bench import oneway

SKIN = {"name": "bench-conditions", "uplink": {"delay_ms": 20, "loss_percent": 10},
        "downlink": {"rate_kbps": 4000}}
VM = "vm1"
DELAY_TOLERANCE_MS = 1.0  # the engine's hold time against the probe's one-way delay (path included)
LOSS_TOLERANCE_POINTS = 1.0  # window edges and the VM's own background packets
RATE_TOLERANCE = 0.05


def measure(h, quick: bool = False) -> dict:
    """Both streams through the skin on a fresh daemon; the probe's and the daemon's figures."""
    h.add_skins([SKIN])
    daemon = h.start_daemon()
    try:
        h.revert()
        path = oneway.send(h.lab, VM, "inet", count=1000, rate_pps=1000)  # the path without a skin
        h.apply(SKIN)
        seconds = 4 if quick else 6
        down = oneway.send(h.lab, "inet", VM, count=1000 * seconds, rate_pps=1000, payload_bytes=1000, settle_s=0.5)
        down_status = h.request("status", vm=VM)["vms"][VM]["conditions"]["downlink"]
        up = oneway.send(h.lab, VM, "inet", count=1000 * seconds, rate_pps=1000)
        up_status = h.request("status", vm=VM)["vms"][VM]["conditions"]["uplink"]
    finally:
        h.stop_daemon(daemon)
    return {
        "path_ms": statistics.median(path.delays_ms.values()) if path.delays_ms else None,
        "uplink": {"sent": up.sent, "lost": up.lost,
                   "probe_delay_p50_ms": statistics.median(up.delays_ms.values()) if up.delays_ms else None,
                   "asked": up_status["asked"], "measured": up_status["measured"]},
        "downlink": {"sent": down.sent, "received": down.received,
                     "probe_kbps": _probe_kbps(down, 1000), "asked": down_status["asked"],
                     "measured": down_status["measured"]},
    }


def _probe_kbps(stream: oneway.OneWay, payload_bytes: int) -> float | None:
    """IP bytes per second that arrived, over the time they arrived in (send time + delay)."""
    if stream.received < 2:
        return None
    # Arrival times are not kept; the spread of (sequence / rate + delay) bounds the arrival span.
    times_s = sorted(seq / 1000 + delay / 1000 for seq, delay in stream.delays_ms.items())
    span_s = times_s[-1] - times_s[0]
    ip_bytes = payload_bytes + 28  # UDP and IPv4 headers
    return (stream.received - 1) * ip_bytes * 8 / 1000 / span_s if span_s > 0 else None


def rows(result: dict) -> list[dict]:
    """Summary rows (the shape of bench.run's summary): each figure, daemon against probe."""
    up, down = result["uplink"], result["downlink"]
    out = []
    measured = up["measured"] or {}
    engine_ms = (measured.get("added_delay_ms") or {}).get("p50")
    probe_ms = up["probe_delay_p50_ms"]
    if engine_ms is not None and probe_ms is not None:
        error = engine_ms - probe_ms
        out.append({"metric": "status added delay p50 vs outside probe (uplink, delay_ms 20, 1000 pkt/s)",
                    "measured": f"{engine_ms:.2f} vs {probe_ms:.2f} ms ({error:+.2f}; path alone "
                                f"{result['path_ms']:.2f} ms)",
                    "goal": f"±{DELAY_TOLERANCE_MS:g} ms", "met": abs(error) <= DELAY_TOLERANCE_MS, "value": error})
    if measured.get("loss_percent") is not None:
        probe_loss = 100 * up["lost"] / up["sent"]
        error = measured["loss_percent"] - probe_loss
        out.append({"metric": "status loss vs outside probe (uplink, loss_percent 10)",
                    "measured": f"{measured['loss_percent']:.2f} vs {probe_loss:.2f} % ({error:+.2f} points)",
                    "goal": f"±{LOSS_TOLERANCE_POINTS:g} point", "met": abs(error) <= LOSS_TOLERANCE_POINTS,
                    "value": error})
    rate = (down["measured"] or {}).get("saturated_kbps")
    if rate is not None and down["probe_kbps"]:
        error = rate / down["probe_kbps"] - 1
        out.append({"metric": "status delivered rate vs outside probe (downlink, rate_kbps 4000, offered 8.3 Mbit/s)",
                    "measured": f"{rate:.0f} vs {down['probe_kbps']:.0f} kbit/s ({100 * error:+.1f} %)",
                    "goal": f"±{100 * RATE_TOLERANCE:g} %", "met": abs(error) <= RATE_TOLERANCE, "value": error})
    return out
