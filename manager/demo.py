"""`netskin demo`: the lab, the daemon, a skin, and its measured effect, in one command.

Measures round-trip time and loss (ping and a UDP echo probe) and TCP throughput in each
direction (iperf3) from the first VM to the lab's internet namespace, without and with the skin,
and prints them beside what the skin asked for. Everything it builds is removed at the end.
The skin comes from the caller's library (a host configuration's drop-ins, or the presets): a
drop-in is copied into the lab's own skins directory; the host's VMs and daemon are not touched.
"""

from __future__ import annotations

import logging
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from interceptor.library import SkinLibrary
from interceptor.schema import load_host_config
from manager import assign, guests, measure
from manager.lab import Lab, lab_down, lab_up
from manager.process import DaemonProcess

VM = "vm1"
_NO_DROP_INS = Path("/nonexistent/netskin-demo-presets-only")

log = logging.getLogger(__name__)


def measure_vm(lab: Lab, seconds: float = 3.0) -> dict:
    ping = measure.ping(lab, VM, lab.inet_address, count=20, interval=0.05)
    probe = measure.udp_probe(lab, VM, count=400, rate_pps=200)
    return {
        "rtt_ms": ping["rtt_median_ms"],
        "loss_percent": probe["loss_percent"],
        "uplink_kbps": measure.iperf3(lab, VM, seconds=seconds) / 1000,
        "downlink_kbps": measure.iperf3(lab, VM, reverse=True, seconds=seconds) / 1000,
    }


def asked(lab: Lab, skin_name: str) -> dict:
    skin = SkinLibrary(load_host_config(lab.config_path).skins_dir).get(skin_name)
    up, down = skin.link("uplink"), skin.link("downlink")
    return {
        "rtt_ms": up.delay_ms + down.delay_ms,  # added to the baseline
        # The probe's loss is round trip: lost either way.
        "loss_percent": 100 * (1 - (1 - up.loss_percent / 100) * (1 - down.loss_percent / 100)),
        "uplink_kbps": up.rate_kbps or None,
        "downlink_kbps": down.rate_kbps or None,
    }


@contextmanager
def _lab_with_daemon(skin: str, prefix: str, say, skins_dir: Path | None) -> Iterator[tuple[Lab, DaemonProcess]]:
    """A fresh lab (``skin`` copied in when it is a drop-in) with its daemon; removed afterwards.

    ``skins_dir`` is the library the skin is looked up in besides the presets (a bad name or
    file raises its ``UserError`` before anything is built).
    """
    library = SkinLibrary(Path(skins_dir) if skins_dir is not None else _NO_DROP_INS)
    library.get(skin)
    entry = library.entry(skin)
    prefix = f"{prefix}{secrets.token_hex(2)}"
    try:
        with say(f"building the lab {prefix} (namespaces, veths, sinks)"):
            lab = lab_up(prefix, vms=2)
        if entry.origin == "drop-in":
            lab_skins = Path(load_host_config(lab.config_path).skins_dir)
            shutil.copyfile(entry.path, lab_skins / entry.path.name)
        with DaemonProcess(lab.config_path) as daemon:
            yield lab, daemon
    finally:
        with say("removing the lab"):
            lab_down(prefix)


def run_demo(skin: str, prefix: str = "nskdemo", console: Console | None = None,
             skins_dir: Path | None = None) -> dict:
    """Build a lab, measure vm1 without and with ``skin``, remove the lab; return the figures.

    ``skins_dir`` is the library the skin is looked up in besides the presets (a bad name or
    file raises its ``UserError`` before anything is built).
    """
    say = console.status if console else _quiet
    with _lab_with_daemon(skin, prefix, say, skins_dir) as (lab, daemon):
        with say("measuring without a skin"):
            before = measure_vm(lab)
        with say(f"applying {skin} to {VM}"):
            assign.apply(daemon.config, VM, skin)
        with say(f"measuring with {skin}"):
            after = measure_vm(lab)
        goal = asked(lab, skin)
    result = {"skin": skin, "vm": VM, "before": before, "after": after, "asked": goal}
    if console:
        console.print(_table(result))
    return result


def _table(result: dict) -> Table:
    before, after, goal = result["before"], result["after"], result["asked"]
    table = Table(box=box.SIMPLE_HEAD, title=f"netskin demo: {result['skin']} on {result['vm']}")
    for heading in ("metric", "without skin", "with skin", "asked"):
        table.add_column(heading, justify="left" if heading == "metric" else "right")
    table.add_row("RTT (median, ms)", f"{before['rtt_ms']:.2f}", f"{after['rtt_ms']:.2f}",
                  f"{before['rtt_ms'] + goal['rtt_ms']:.2f}")
    table.add_row("round-trip loss (%)", f"{before['loss_percent']:.1f}", f"{after['loss_percent']:.1f}",
                  f"{goal['loss_percent']:.1f}")
    for key, label in (("uplink_kbps", "uplink TCP (kbit/s)"), ("downlink_kbps", "downlink TCP (kbit/s)")):
        table.add_row(label, f"{before[key]:.0f}", f"{after[key]:.0f}",
                      f"{goal[key]:.0f}" if goal[key] else "unlimited")
    return table


class _quiet:
    def __init__(self, *_args) -> None:
        pass

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def run_timeline_demo(skin: str, seconds: float, png_path: Path, prefix: str = "nskdemo",
                      console: Console | None = None, skins_dir: Path | None = None) -> dict:
    """Build a lab, run ``skin`` (a skin with a timeline) on vm1 for ``seconds`` while recording
    RTT, loss and throughput, then draw the run: a PNG and a chart in the terminal."""
    from manager.plot import png, terminal_chart
    from manager.record import record_run

    say = console.status if console else _quiet
    with _lab_with_daemon(skin, prefix, say, skins_dir) as (lab, daemon):
        with say(f"applying {skin} to {VM}"):
            assign.apply(daemon.config, VM, skin)
        with say(f"recording {seconds:g} s of {skin} on {VM} (RTT probe, UDP stream, steps)"):
            recording = record_run(lab, VM, skin, seconds, lambda: daemon.status(VM))
    recording.save(Path(png_path).with_suffix(".json"))
    png(recording, Path(png_path))
    if console:
        console.print(terminal_chart(recording, width=max(20, min(72, console.width - 26))))
        console.print(f"picture: {png_path}; recording: {Path(png_path).with_suffix('.json')} "
                      f"(netskin plot {Path(png_path).with_suffix('.json')} draws it again)")
    lost = sum(rtt is None for _, rtt in recording.probes)
    return {"skin": skin, "vm": VM, "seconds": seconds, "png": str(png_path),
            "recording": str(Path(png_path).with_suffix(".json")), "probes": len(recording.probes),
            "lost": lost, "steps": recording.steps}


# --- the demo on a guest ---------------------------------------------------------------------


def measure_guest(lab, vm: str = "vm1", seconds: float = 3.0) -> dict:
    """The demo's figures for a lab guest, measured from the internet namespace towards it."""
    address = lab.vm(vm).address
    ping = measure.ping(lab, "inet", address, count=20, interval=0.05)
    probe = measure.udp_probe(lab, "inet", address, guests.ECHO_PORT, count=200, rate_pps=100, warm_up=True)

    def iperf3(reverse: bool) -> float:  # measure.iperf3 waits for a server still winding down
        return measure.iperf3(lab, "inet", guests.IPERF3_PORT, reverse=reverse, seconds=seconds, target=address)

    return {
        "rtt_ms": ping["rtt_median_ms"],
        "loss_percent": probe["loss_percent"],
        # The guest runs the iperf3 server: -R makes the guest send, which is its uplink.
        "uplink_kbps": iperf3(reverse=True) / 1000,
        "downlink_kbps": iperf3(reverse=False) / 1000,
    }


def run_guest_demo(skin: str, prefix: str = "nskdemo", console=None, skins_dir: Path | None = None,
                   bridge: bool = False) -> dict:
    """``netskin demo --guests``: the demo's measurement on a QEMU guest instead of a namespace VM."""
    library = SkinLibrary(Path(skins_dir) if skins_dir is not None else _NO_DROP_INS)
    library.get(skin)  # a bad name raises its UserError before anything is built
    entry = library.entry(skin)
    prefix = f"{prefix}{secrets.token_hex(2)}"
    say = console.status if console else _quiet
    note = console.print if console else (lambda text: log.info("%s", text))
    try:
        with say(f"building the lab {prefix} with a QEMU guest (the image is built once and cached)"):
            lab = lab_up(prefix, vms=0, guests=1, bridge=bridge, say=note)
        note(f"guest vm1 booted with {lab.accel.upper()} in {lab.boot_s['vm1']:.1f} s")
        if entry.origin == "drop-in":
            shutil.copyfile(entry.path, Path(load_host_config(lab.config_path).skins_dir) / entry.path.name)
        with DaemonProcess(lab.config_path) as daemon:
            with say("measuring without a skin"):
                before = measure_guest(lab)
            with say(f"applying {skin} to vm1"):
                assign.apply(daemon.config, "vm1", skin)
            with say(f"measuring with {skin}"):
                after = measure_guest(lab)
            goal = asked(lab, skin)
        accel, boot_s = lab.accel, lab.boot_s["vm1"]
    finally:
        with say("removing the lab"):
            lab_down(prefix)
    result = {"skin": skin, "vm": "vm1", "guest": {"accel": accel, "boot_s": boot_s, "bridge": bridge},
              "before": before, "after": after, "asked": goal}
    if console:
        console.print(_table(result))
    return result
