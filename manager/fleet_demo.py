"""`netskin demo --hosts N`: one fleet apply changing RTT on every host of a fleet lab.

Builds a fleet lab (``manager.fleet_lab``), measures every VM's RTT to the internet namespace,
applies a skin to every VM of every host in one store transaction with ``--at`` (every agent swaps
at that instant), measures again, then applies a second skin without ``--at`` (every agent swaps
as soon as its watch brings the change) and measures a third time. The spread is between the first
and the last swap across the fleet, from the times the agents report. The lab is removed at the end.
"""

from __future__ import annotations

import json
import secrets
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from manager import measure
from manager.fleet_lab import FleetLab, fleet_lab_down, fleet_lab_up
from manager.lab import LabError

SKINS = {"fleet-demo-slow": {"latency_ms": 200}, "fleet-demo-steady": {"latency_ms": 50}}
AT_AHEAD = "+2s"


def rtts(lab: FleetLab, count: int = 5) -> dict[str, float]:
    """Median RTT (ms) of every VM to the inet namespace, the VMs pinged in parallel."""
    def one(vm: str) -> float:
        return measure.ping(lab.lab_of(vm), vm, lab.inet_address, count=count, interval=0.05)["rtt_median_ms"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(lab.vms(), pool.map(one, lab.vms())))


def fleet_apply(lab: FleetLab, skin: str, at: str | None = None) -> dict:
    """`netskin apply vm1,…,vmN SKIN [--at …] --json` on the manager; its answer."""
    args = ["apply", ",".join(lab.vms()), skin] + (["--at", at] if at else [])
    answer = lab.netskin_json(*args)
    if not answer.get("verified"):
        raise LabError(f"fleet apply of {skin} not verified: {answer.get('problems') or answer}")
    return answer


def create_skins(lab: FleetLab) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, fields in SKINS.items():
            path = Path(tmp) / f"{name}.json"
            path.write_text(json.dumps({"name": name, **fields}))
            done = lab.netskin("skins", "create", str(path))
            if done.returncode != 0:
                raise LabError(f"netskin skins create {name}: {done.stderr.strip()}")


def run_fleet_demo(hosts: int = 3, vms: int = 2, prefix: str = "nskfd", console: Console | None = None) -> dict:
    say = console.print if console else (lambda *_: None)
    prefix = f"{prefix}{secrets.token_hex(2)}"
    try:
        lab = fleet_lab_up(prefix, hosts, vms, say=lambda text: say(f"[dim]{text}[/]"))
        create_skins(lab)
        slow, steady = SKINS
        say("measuring every VM's RTT without a skin")
        before = rtts(lab)
        say(f"one apply of {slow} to {len(lab.vms())} VMs on {hosts} hosts, swap at {AT_AHEAD}")
        with_at = fleet_apply(lab, slow, AT_AHEAD)
        after_at = rtts(lab)
        say(f"one apply of {steady} to the same VMs, without --at")
        without_at = fleet_apply(lab, steady)
        after = rtts(lab)
    finally:
        say(f"[dim]removing the fleet lab {prefix}[/]")
        fleet_lab_down(prefix)
    rows = [{"host": t["host"], "vm": t["vm"], "rtt_before_ms": before[t["vm"]],
             "rtt_slow_ms": after_at[t["vm"]], "rtt_steady_ms": after[t["vm"]],
             "late_ms": t["late_ms"]} for t in with_at["targets"]]
    result = {"hosts": hosts, "vms": len(rows), "skins": SKINS, "rows": rows,
              "spread_with_at_ms": with_at["spread_ms"], "spread_without_at_ms": without_at["spread_ms"]}
    if console:
        console.print(_table(result))
        console.print(f"swap spread across hosts, first to last: {result['spread_with_at_ms']} ms with --at, "
                      f"{result['spread_without_at_ms']} ms without")
    return result


def _table(result: dict) -> Table:
    slow, steady = SKINS
    table = Table(box=box.SIMPLE_HEAD, title=f"netskin demo: one fleet apply on {result['hosts']} hosts")
    for heading in ("host/vm", "RTT no skin", f"{slow} (--at)", "late", f"{steady} (no --at)"):
        table.add_column(heading, justify="left" if heading == "host/vm" else "right")
    for row in result["rows"]:
        table.add_row(f"{row['host']}/{row['vm']}", f"{row['rtt_before_ms']:.2f} ms", f"{row['rtt_slow_ms']:.1f} ms",
                      "-" if row["late_ms"] is None else f"{row['late_ms']:.1f} ms", f"{row['rtt_steady_ms']:.1f} ms")
    return table
