"""The `netskin` commands on a fleet manager (a configuration with ``[store]`` and no VMs).

The same commands as on one host, acting on the store (``manager.fleetctl``): apply, rollback and
revert write desired keys for VMs on any host in one transaction, status and top read what every
host's agent reports. Exit codes as on one host: 1 a request that cannot be done (unknown or
ambiguous VM, unknown skin, a VM changed meanwhile), 2 the store is unreachable or refused,
3 not in force on every target within --wait, all of them restored.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, NoReturn, TypeVar

import trio
import typer
from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from interceptor.schema import HostConfig, read_skin_file
from manager import fleetctl
from manager.fleetctl import Conflict, Outcome
from manager.library import entry_data
from manager.store import Store, StoreError

T = TypeVar("T")

console = Console()


def is_manager(config: HostConfig) -> bool:
    """``[store]`` and no VMs: this configuration manages the fleet rather than one host."""
    return config.store is not None and not config.vms


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _fail(message: str, code: int, as_json: bool = False, **extra: Any) -> NoReturn:
    if as_json:
        _print_json({"error": message, "exit_code": code, **extra})
    typer.echo(message, err=True)
    raise typer.Exit(code)


def run(config: HostConfig, fn: Callable[[Store], Awaitable[T]], as_json: bool = False) -> T:
    """Run ``fn(store)`` under trio; a store that does not answer ends the command with exit 2."""
    assert config.store is not None

    async def main() -> T:
        async with Store.from_config(config.store) as store:
            return await fn(store)

    try:
        return trio.run(main)
    except Conflict as exc:
        _fail("; ".join(exc.lines), 1, as_json, vms=exc.vms)
    except StoreError as exc:
        _fail(f"the fleet store ({', '.join(config.store.endpoints)}) did not answer or refused: {exc}", 2, as_json)


def _clock(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).strftime("%H:%M:%S.%f")[:-3]


# --- apply, rollback, revert --------------------------------------------------------------------


def spread_ms(outcome: Outcome) -> float | None:
    """Between the first and the last host's swap (the agents' clocks), over the targets in force."""
    times = [st.swapped_at for t, st in outcome.statuses.items()
             if st is not None and st.swapped_at is not None and t in outcome.done]
    return (max(times) - min(times)) * 1000 if len(times) > 1 else None


def outcome_data(outcome: Outcome, skin: str | None) -> dict[str, Any]:
    targets = []
    for step in outcome.change.steps:
        st = outcome.statuses.get(step.target)
        state = ("done" if step.target in outcome.done else "pending" if step.target in outcome.pending
                 else "failed" if outcome.statuses else "written")
        targets.append({"host": step.target.host, "vm": step.target.vm, "state": state,
                        "skin": step.after.skin.name if step.after else None,
                        "desired_generation": step.after.generation if step.after else None,
                        "daemon_generation": st.generation if st else None,
                        "swapped_at": st.swapped_at if st else None,
                        "late_ms": (round((st.swapped_at - outcome.change.at) * 1000, 1)
                                    if st and st.swapped_at and outcome.change.at else None)})
    spread = spread_ms(outcome)
    return {"op": outcome.change.op, "verb": outcome.change.verb, "skin": skin, "revision": outcome.revision,
            "at": outcome.change.at, "verified": outcome.verified if outcome.statuses else None,
            "targets": targets, "spread_ms": None if spread is None else round(spread, 1),
            "problems": outcome.failed + [f"{t}: not in force yet" for t in outcome.pending],
            "restored": [str(t) for t in outcome.restored], "not_restored": outcome.not_restored}


def change(config: HostConfig, verb: str, names: str, skin: str | None, at_text: str | None, wait_s: float,
           as_json: bool) -> None:
    """`netskin apply|rollback|revert VM[,VM…]` on the fleet."""
    wanted = fleetctl.split_names(names)

    async def go(store: Store) -> tuple[Outcome, str | None]:
        view = await fleetctl.read_view(store)
        targets = fleetctl.resolve(view, wanted)
        if verb == "apply":
            assert skin is not None
            at = fleetctl.parse_at(at_text, time.time()) if at_text else None
            document, revision = await fleetctl.find_skin(store, skin)
            planned = fleetctl.plan_apply(view, targets, document, skin_revision=revision, at=at)
        elif verb == "rollback":
            planned = fleetctl.plan_rollback(view, targets)
        else:
            planned = fleetctl.plan_revert(view, targets)
        return await fleetctl.carry_out(store, planned, wait_s), skin

    outcome, _ = run(config, go, as_json)
    data = outcome_data(outcome, skin)
    if as_json:
        _print_json(data)
    else:
        _print_outcome(outcome, data, wait_s)
    if outcome.statuses and not outcome.verified:
        message = (f"{verb} not in force on every VM within {wait_s:g} s: {'; '.join(data['problems'])}; "
                   f"restored {len(outcome.restored)} of {len(outcome.change.steps)} VMs to what they had before"
                   + (f" ({'; '.join(outcome.not_restored)})" if outcome.not_restored else ""))
        typer.echo(message, err=True)
        raise typer.Exit(3)


def _print_outcome(outcome: Outcome, data: dict, wait_s: float) -> None:
    what = {"apply": f"{data['skin']} on", "rollback": "rollback of", "revert": "revert of"}[outcome.change.verb]
    when = f", swap at {_clock(outcome.change.at)} UTC" if outcome.change.at else ""
    typer.echo(f"{what} {len(outcome.change.steps)} VM(s) written in one transaction (revision {outcome.revision}, "
               f"op {outcome.change.op}{when})")
    if not outcome.statuses:
        return
    for target in data["targets"]:
        line = f"{target['host']}/{target['vm']}: {target['state']}"
        if target["state"] == "done" and outcome.change.verb != "revert":
            line += f" ({target['skin']}, daemon generation {target['daemon_generation']}, swapped {_clock(target['swapped_at'])})"
        typer.echo(line)
    if data["spread_ms"] is not None:
        typer.echo(f"swap times across VMs: {data['spread_ms']:.1f} ms from first to last")


# --- status and top -----------------------------------------------------------------------------


def status(config: HostConfig, names: str | None, as_json: bool) -> None:
    async def go(store: Store) -> fleetctl.FleetView:
        return await fleetctl.read_view(store)

    view = run(config, go, as_json)
    hosts = fleetctl.host_rows(view, time.time())
    vms = fleetctl.vm_rows(view)
    if names:
        chosen = {(t.host, t.vm) for t in fleetctl.resolve(view, fleetctl.split_names(names))}
        vms = [row for row in vms if (row["host"], row["vm"]) in chosen]
        hosts = [row for row in hosts if row["host"] in {h for h, _ in chosen}]
    if as_json:
        _print_json({"revision": view.revision, "hosts": hosts, "vms": vms})
        return

    table = Table(box=box.SIMPLE_HEAD, title="hosts")
    for heading in ("host", "agent", "in sync", "last beat", "VMs"):
        table.add_column(heading)
    for row in hosts:
        beat = "-" if row["beat_age_s"] is None else f"{row['beat_age_s']:.1f} s ago"
        table.add_row(row["host"], row["state"] if row["state"] == "alive" else "[red]stale[/]",
                      "-" if row["in_sync"] is None else ("yes" if row["in_sync"] else "no"), beat, str(len(row["vms"])))
    console.print(table)
    table = Table(box=box.SIMPLE_HEAD, title="VMs", pad_edge=False)
    for heading in ("host/vm", "active", "shadow", "desired", "gen", "applied", "enforced"):
        table.add_column(heading, justify="right" if heading == "gen" else "left")
    for row in vms:
        table.add_row(f"{row['host']}/{row['vm']}", row["active"] or "-", row["shadow"] or "-", row["desired"] or "-",
                      "-" if row["generation"] is None else str(row["generation"]),
                      "yes" if row["applied"] else "no", "yes" if row["enforced"] else "no")
    console.print(table)
    for row in hosts:
        if row["state"] == "stale":
            typer.echo(f"{row['host']}: stale (its agent's lease expired): its VMs show their last report and keep "
                       f"their skins; changes for them wait for the agent")
    for row in vms:  # whole lines below the table, never cut to its width
        for problem in row["problems"]:
            typer.echo(f"{row['host']}/{row['vm']}: problem: {problem}")
        if row["at"] and not row["applied"]:
            typer.echo(f"{row['host']}/{row['vm']}: swap scheduled at {_clock(row['at'])} UTC")


def top(config: HostConfig, interval: float, iterations: int, as_json: bool) -> None:
    """Rates from the conditions every agent publishes (every few seconds, so rates are coarse)."""

    def render(rows: list[dict], view: fleetctl.FleetView) -> Group:
        # One line per VM and direction: the uplink line names the VM, the downlink line its skin.
        table = Table(box=box.SIMPLE_HEAD, title="netskin top (fleet)", pad_edge=False)
        for heading in ("host/vm\nskin", "dir", "pkt/s", "kbit/s", "drop/s", "queue", "delay ms\nask/meas",
                        "loss %\nask/meas"):
            table.add_column(heading, justify="left" if heading in ("host/vm\nskin", "dir") else "right")
        for r in rows:
            num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
            name = f"{r['host']}/{r['vm']}" if r["direction"] == "uplink" else (r["skin"] or "-")
            table.add_row(name, "up" if r["direction"] == "uplink" else "down",
                          num(r["packets_per_s"], ".0f"), num(r["kbit_per_s"], ".1f"), num(r["drops_per_s"], ".0f"),
                          num(r["held_packets"], "d"),
                          f"{num(r['asked_delay_ms'], 'g')}/{num(r['measured_delay_ms'], '.1f')}",
                          f"{num(r['asked_loss_percent'], 'g')}/{num(r['measured_loss_percent'], '.1f')}")
        stale = [Text(f"{name}: stale: no conditions (its agent's lease expired)", style="red")
                 for name, host in view.hosts.items() if host.state == "stale"]
        return Group(table, *stale)

    async def go(store: Store) -> None:
        previous = None
        count = 0
        live = None
        if not as_json:
            from rich.live import Live

            live = Live(console=console, auto_refresh=False)
            live.start()
        try:
            while True:
                view = await fleetctl.read_view(store)
                rows = fleetctl.top_rows(view, previous)
                if as_json:
                    typer.echo(json.dumps({"time": round(time.time(), 3), "revision": view.revision, "rows": rows}))
                else:
                    live.update(render(rows, view), refresh=True)
                previous = view
                count += 1
                if iterations and count >= iterations:
                    return
                await trio.sleep(interval)
        finally:
            if live is not None:
                live.stop()

    try:
        run(config, go, as_json)
    except KeyboardInterrupt:
        pass


# --- skins ----------------------------------------------------------------------------------------


def skins_list(config: HostConfig, as_json: bool) -> list | None:
    """The fleet library's entries, for the caller to print like the local list."""
    return run(config, fleetctl.entries, as_json)


def skins_show(config: HostConfig, name: str, as_json: bool):
    async def go(store: Store):
        return await fleetctl.entry(store, name)

    return run(config, go, as_json)


def skins_create(config: HostConfig, file: Path, as_json: bool) -> None:
    document, skin = read_skin_file(file)

    async def go(store: Store):
        return await fleetctl.create_skin(store, document, skin.name)

    entry = run(config, go, as_json)
    if as_json:
        _print_json(entry_data(entry))
    else:
        typer.echo(f"created {entry.name} ({entry.path})")


def skins_update(config: HostConfig, name: str, file: Path, as_json: bool) -> None:
    document, _ = read_skin_file(file, default_name=name)

    async def go(store: Store):
        was_preset = (await fleetctl.entry(store, name)).origin == "preset"
        return await fleetctl.update_skin(store, name, document), was_preset

    entry, was_preset = run(config, go, as_json)
    if as_json:
        _print_json(entry_data(entry) | {"overrides_preset": was_preset})
    else:
        typer.echo(f"updated {entry.name} ({entry.path})" + ("; it overrides the preset of that name" if was_preset else ""))


def skins_delete(config: HostConfig, name: str, as_json: bool) -> None:
    async def go(store: Store):
        return await fleetctl.delete_skin(store, name)

    result = run(config, go, as_json)
    if as_json:
        _print_json(result)
    else:
        note = f"; the preset {name} is visible again" if result["preset_visible"] else ""
        typer.echo(f"deleted {name} ({result['path']}){note}")

