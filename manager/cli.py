"""The `netskin` command line: a thin shell over the host configuration and the skin library.

Commands print tables for people and JSON with --json. A problem the user can fix (a bad file,
an unknown name) ends the command with exit code 1 and one line per problem on stderr, never a
traceback: raise a ``UserError`` or call ``fail``. ``--config`` and ``--json`` may also stand
before the subcommand (``netskin --config F --json status``); given after it, they win.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from interceptor.schema import (
    DEFAULT_CONFIG_PATH,
    HostConfig,
    SkinError,
    UserError,
    load_host_config,
    load_skin_file,
)
from manager import cli_fleet
from manager.cli_fleet import is_manager
from manager.library import Entry, SkinLibrary, effective_links, entry_data, in_use_message, worn_by

# --- shared pieces: every command group uses these -------------------------------------------

ConfigOption = Annotated[
    Optional[Path],
    typer.Option(
        "--config",
        metavar="PATH",
        show_default=False,
        help=f"Host configuration (default: $NETSKIN_CONFIG, else {DEFAULT_CONFIG_PATH}).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

console = Console()


class _UserErrorsExit1(TyperGroup):
    """Turns a ``UserError`` raised anywhere below into its lines on stderr and exit code 1."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as error:
            for line in error.lines:
                typer.echo(line, err=True)
            raise typer.Exit(1) from None


def fail(message: str, code: int = 1) -> NoReturn:
    """End the command: ``message`` (one line naming the problem and the fix) on stderr."""
    typer.echo(message, err=True)
    raise typer.Exit(code)


@dataclass(frozen=True)
class GlobalOptions:
    """``--config`` and ``--json`` given before the subcommand."""

    config: Path | None = None
    as_json: bool = False


def _global_options(ctx: typer.Context) -> GlobalOptions:
    options = ctx.find_root().obj
    return options if isinstance(options, GlobalOptions) else GlobalOptions()


def config_option(ctx: typer.Context, config_path: Path | None) -> Path | None:
    """The subcommand's --config, else the one before the subcommand, else None."""
    return config_path if config_path is not None else _global_options(ctx).config


def json_option(ctx: typer.Context, as_json: bool) -> bool:
    """--json after the subcommand or before it."""
    return as_json or _global_options(ctx).as_json


def load_config(ctx: typer.Context, config_path: Path | None) -> HostConfig:
    """The host configuration from --config, else $NETSKIN_CONFIG, else the default path."""
    return load_host_config(config_option(ctx, config_path))


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


app = typer.Typer(
    cls=_UserErrorsExit1,
    no_args_is_help=True,
    add_completion=False,
    help="netskin: per-VM network skins (loss, delay, rate, firewall, DNS, identity).",
)


@app.callback()
def _options(ctx: typer.Context, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """netskin: per-VM network skins (loss, delay, rate, firewall, DNS, identity)."""
    ctx.obj = GlobalOptions(config, as_json)


def main() -> None:
    app()


# --- netskin skins ---------------------------------------------------------------------------

skins_app = typer.Typer(
    no_args_is_help=True, help="The skin library: drop-in directory plus presets."
)
app.add_typer(skins_app, name="skins")


@skins_app.command("list")
def skins_list(ctx: typer.Context, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List every skin: drop-ins (which override presets of the same name) and presets; on a fleet
    manager, the store's skins and the presets."""
    host = load_config(ctx, config)
    if is_manager(host):
        entries = cli_fleet.skins_list(host, json_option(ctx, as_json))
    else:
        entries = SkinLibrary(host.skins_dir).entries()
    if json_option(ctx, as_json):
        print_json([entry_data(entry) for entry in entries])
        return
    table = Table(box=box.SIMPLE_HEAD, caption="down, up: rate limit in kbit/s (∞: unlimited)")
    table.add_column("name", no_wrap=True)
    table.add_column("origin", no_wrap=True)
    for heading in ("RTT ms", "down", "up", "loss %"):
        table.add_column(heading, justify="right", no_wrap=True)
    # One row per skin: the notes get what the numbers leave and are cut, not wrapped.
    notes_width = max(12, console.width - 72)
    table.add_column("notes", no_wrap=True, overflow="ellipsis", max_width=notes_width)
    for entry in entries:
        if entry.skin is None:
            problem = entry.errors[0].removeprefix(f"{entry.path}: ")
            table.add_row(entry.name, entry.origin, "", "", "", "", f"[red]invalid:[/] {problem}")
            continue
        down, up = entry.skin.link("downlink"), entry.skin.link("uplink")
        table.add_row(
            entry.name,
            entry.origin,
            _number(down.delay_ms + up.delay_ms),
            _number(down.rate_kbps) if down.rate_kbps else "∞",
            _number(up.rate_kbps) if up.rate_kbps else "∞",
            _loss(entry),
            entry.skin.description or "",
        )
    console.print(table)


@skins_app.command("show")
def skins_show(ctx: typer.Context, name: str, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Show one skin: its fields and the effective conditions in each direction."""
    host = load_config(ctx, config)
    if is_manager(host):
        entry = cli_fleet.skins_show(host, name, json_option(ctx, as_json))
    else:
        entry = SkinLibrary(host.skins_dir).entry(name)
    if entry.skin is None:
        raise SkinError(list(entry.errors))
    skin = entry.skin
    if json_option(ctx, as_json):
        print_json(entry_data(entry) | {"effective": effective_links(entry)})
        return
    fields = Table("field", "value", title=f"{skin.name} ({entry.origin}, {entry.path})")
    for key, value in entry_data(entry)["skin"].items():
        if key not in ("uplink", "downlink"):
            fields.add_row(key, _value(value))
    console.print(fields)
    links = Table(
        "direction", "delay ms (one-way)", "jitter ms", "loss %", "rate kbit/s",
        title="effective per direction (uplink: leaving the VM)",
    )
    for direction, link in effective_links(entry).items():
        bursty = skin.bursty_loss(direction)
        links.add_row(
            direction,
            _number(link["delay_ms"]),
            _number(link["jitter_ms"]),
            "bursty (Gilbert-Elliott)" if bursty else _number(link["loss_percent"]),
            _rate(link["rate_kbps"]),
        )
    console.print(links)


@skins_app.command("validate")
def skins_validate(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(metavar="FILE", show_default=False)],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check skin files against the schema: "ok NAME" per valid file, one line per error."""
    results = []
    for path in files:
        try:
            skin = load_skin_file(path)
        except SkinError as error:
            results.append({"file": str(path), "valid": False, "name": None, "errors": error.lines})
        else:
            results.append({"file": str(path), "valid": True, "name": skin.name, "errors": []})
    if json_option(ctx, as_json):
        print_json(results)
    else:
        for result in results:
            if result["valid"]:
                typer.echo(f"ok {result['name']}")
            for line in result["errors"]:
                typer.echo(line, err=True)
    if not all(result["valid"] for result in results):
        raise typer.Exit(1)


@skins_app.command("create")
def skins_create(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(metavar="FILE")], config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Add a new skin to the drop-in directory, or the fleet's store (its name must not exist yet)."""
    host = load_config(ctx, config)
    if is_manager(host):
        return cli_fleet.skins_create(host, file, json_option(ctx, as_json))
    entry = SkinLibrary(host.skins_dir).create(file)
    if json_option(ctx, as_json):
        print_json(entry_data(entry))
        return
    typer.echo(f"created {entry.name} ({entry.path})")


@skins_app.command("update")
def skins_update(
    ctx: typer.Context,
    name: str, file: Annotated[Path, typer.Argument(metavar="FILE")], config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Replace a skin with FILE; updating a preset creates a drop-in (or store copy) that overrides it."""
    host = load_config(ctx, config)
    if is_manager(host):
        return cli_fleet.skins_update(host, name, file, json_option(ctx, as_json))
    library = SkinLibrary(host.skins_dir)
    was_preset = library.entry(name).origin == "preset"
    entry = library.update(name, file)
    if json_option(ctx, as_json):
        print_json(entry_data(entry) | {"overrides_preset": was_preset})
        return
    note = "; it overrides the preset of that name" if was_preset else ""
    typer.echo(f"updated {entry.name} ({entry.path}){note}")


@skins_app.command("delete")
def skins_delete(ctx: typer.Context, name: str, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Remove a drop-in skin (presets cannot be deleted; nor can a skin a VM wears)."""
    host = load_config(ctx, config)
    if is_manager(host):
        return cli_fleet.skins_delete(host, name, json_option(ctx, as_json))
    vm = worn_by(host, name)
    if vm is not None:
        fail(in_use_message(name, vm))
    library = SkinLibrary(host.skins_dir)
    entry = library.delete(name)
    uncovered = any(e.name == name and e.origin == "preset" for e in library.entries())
    if json_option(ctx, as_json):  # the shape of the API's DELETE /skins/{name}
        print_json({"deleted": entry.name, "path": str(entry.path), "preset_visible": uncovered})
        return
    note = f"; the preset {name} is visible again" if uncovered else ""
    typer.echo(f"deleted {entry.name} ({entry.path}){note}")


def _value(value: Any) -> str:
    if isinstance(value, float):
        return _number(value)
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _number(value: float) -> str:
    return f"{value:g}"


def _rate(kbps: float) -> str:
    return _number(kbps) if kbps else "unlimited"


def _loss(entry: Entry) -> str:
    assert entry.skin is not None
    if entry.skin.loss_model.gilbert_elliott is not None:
        return "bursty"
    down, up = entry.skin.link("downlink").loss_percent, entry.skin.link("uplink").loss_percent
    return _number(down) if down == up else f"{_number(down)} / {_number(up)}"


# --- the daemon: apply, rollback, revert, status, top -----------------------------------------
# Exit codes: 0 done; 1 user error; 2 the daemon is not running or failed; 3 known not (wholly)
# in force; 4 the --timeout bound passed while the daemon was still at it.

EXIT_IN_PROGRESS = 4


def _daemon_call(fn, *args, vm: str | None = None, as_json: bool = False):
    """Run a daemon request; end the command with the exit code of whatever went wrong."""
    from interceptor import control
    from manager import assign

    try:
        return fn(*args)
    except assign.VerifyFailed as exc:
        _fail_with_status(str(exc), 3, vm, exc.status, as_json)
    except assign.InProgress as exc:
        _fail_with_status(str(exc), EXIT_IN_PROGRESS, vm, exc.status, as_json)
    except control.DaemonUnreachable as exc:
        fail(f"{exc}", 2)
    except control.ControlError as exc:
        fail(str(exc), 2 if exc.internal else exc.code)


def _fail_with_status(message: str, code: int, vm: str | None, status: dict | None, as_json: bool) -> NoReturn:
    if as_json:
        problems = (status or {}).get("verify_problems") or []
        print_json({"error": message, "exit_code": code, "vm": vm, "status": status, "problems": problems})
    fail(message, code)


VmArgument = Annotated[str, typer.Argument(
    metavar="VM[,VM…]", help="The VM's name in the host configuration; on a fleet manager, VMs on any host "
                             "(HOST/VM names one on a given host).")]
AtOption = Annotated[Optional[str], typer.Option(
    "--at", metavar="TIME", help="Fleet: every host swaps at this wall-clock instant (+30s, +2m, Unix seconds, "
                                 "HH:MM[:SS] UTC or ISO 8601).")]
WaitOption = Annotated[Optional[float], typer.Option(
    "--wait", metavar="SECONDS", min=0,
    help="Fleet: wait this long (after --at) for every VM to report it enforced, else restore them all and "
         "exit 3; 0: only write it (default 10).")]
TimeoutOption = Annotated[float, typer.Option(
    "--timeout", metavar="SECONDS", min=0.1,
    help="How long to wait for the daemon to finish the swap; past it, status tells what happened.")]


@app.command("apply")
def apply_cmd(ctx: typer.Context, vm: VmArgument, skin: Annotated[str, typer.Argument(help="Skin name.")],
              config: ConfigOption = None, as_json: JsonOption = False, timeout: TimeoutOption = 30.0,
              at: AtOption = None, wait: WaitOption = None) -> None:
    """Swap VM's active skin atomically; the old one becomes the shadow. On a fleet manager: many VMs
    on many hosts in one store transaction (all or none)."""
    from manager import assign

    as_json = json_option(ctx, as_json)
    host = load_config(ctx, config)
    if is_manager(host):
        return cli_fleet.change(host, "apply", vm, skin, at, _fleet_wait(wait), as_json)
    _local_only(at=at, wait=wait)
    result = _daemon_call(assign.apply, host, vm, skin, timeout, vm=vm, as_json=as_json)
    _report_vm(vm, result, as_json, f"{vm}: {skin} active (generation {result['generation']})")


@app.command("rollback")
def rollback_cmd(ctx: typer.Context, vm: VmArgument, config: ConfigOption = None, as_json: JsonOption = False,
                 timeout: TimeoutOption = 30.0, wait: WaitOption = None) -> None:
    """Swap the active and shadow skins (undo the last apply)."""
    from manager import assign

    as_json = json_option(ctx, as_json)
    host = load_config(ctx, config)
    if is_manager(host):
        return cli_fleet.change(host, "rollback", vm, None, None, _fleet_wait(wait), as_json)
    _local_only(wait=wait)
    result = _daemon_call(assign.rollback, host, vm, timeout, vm=vm, as_json=as_json)
    _report_vm(vm, result, as_json,
               f"{vm}: rolled back to {result['active']} (generation {result['generation']})")


@app.command("revert")
def revert_cmd(ctx: typer.Context, vm: VmArgument, config: ConfigOption = None, as_json: JsonOption = False,
               timeout: TimeoutOption = 30.0, wait: WaitOption = None) -> None:
    """Remove the skin and restore the VM's original configuration."""
    from manager import assign

    as_json = json_option(ctx, as_json)
    host = load_config(ctx, config)
    if is_manager(host):
        return cli_fleet.change(host, "revert", vm, None, None, _fleet_wait(wait), as_json)
    _local_only(wait=wait)
    result = _daemon_call(assign.revert, host, vm, timeout, vm=vm, as_json=as_json)
    _report_vm(vm, result, as_json,
               f"{vm}: reverted to its original configuration (generation {result['generation']})")


def _fleet_wait(wait: float | None) -> float:
    from manager.fleetctl import WAIT_S

    return WAIT_S if wait is None else wait


def _local_only(**options: Any) -> None:
    given = [f"--{name}" for name, value in options.items() if value is not None]
    if given:
        fail(f"{' and '.join(given)}: fleet options; they need a manager configuration ([store] and no [vms])")


def _report_vm(vm: str, result: dict, as_json: bool, line: str) -> None:
    if as_json:
        print_json({vm: result})
    else:
        typer.echo(line)


def _mtu_text(original: dict) -> str:
    if original.get("mtu") is None and original.get("host_mtu") is not None:
        return f"{original['host_mtu']} on the host side (the guest's own is not visible)"
    return str(original.get("mtu"))


@app.command("status")
def status_cmd(ctx: typer.Context, vm: Annotated[Optional[str], typer.Argument(help="One VM (default: all).")] = None,
               config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Per VM: active skin, shadow, generation and live counters. On a fleet manager: every host
    (alive or stale) and every VM (active, shadow, applied, enforced)."""
    from manager import assign

    host = load_config(ctx, config)
    if is_manager(host):
        return cli_fleet.status(host, vm, json_option(ctx, as_json))
    reply = _daemon_call(assign.status, host, vm)
    if json_option(ctx, as_json):
        print_json(reply)
        return
    table = Table(box=box.SIMPLE_HEAD)
    for heading in ("vm", "active", "gen", "shadow", "dir", "packets", "passed", "drops", "held"):
        table.add_column(heading, justify="right" if heading in ("gen", "packets", "passed", "held") else "left")
    for name, st in reply["vms"].items():
        for i, direction in enumerate(("uplink", "downlink")):
            c = st[direction]
            drops = ", ".join(f"{k} {v}" for k, v in c["drops"].items() if v) or "0"
            head = (name, st["active"] or "-", str(st["generation"]), st["shadow"] or "-") if i == 0 else ("",) * 4
            table.add_row(*head, direction, str(c["packets"]), str(c["passed_packets"]), drops, str(c["held_packets"]))
    console.print(table)
    for name, st in reply["vms"].items():  # full text below the table, never cut to its width
        if st.get("domain"):
            typer.echo(f"{name}: libvirt domain {st['domain']}, tap {st['interface']}")
        original = st.get("original") or {}
        if original:
            typer.echo(f"{name}: original: address {original.get('address') or 'unknown'}, MAC {original.get('mac')}, "
                       f"MTU {_mtu_text(original)}, DNS {', '.join(original.get('resolvers') or []) or '-'}")
        firewall = st.get("firewall") or {}
        if firewall.get("profile"):
            hits = "; ".join(f"{rule['rule']}: {rule['hits']}" for rule in firewall.get("rules", []))
            typer.echo(f"{name}: firewall {firewall['profile']}: {hits or 'no rules'}")
        if st.get("dns"):
            typer.echo(f"{name}: DNS answers: " + ", ".join(f"{k} {v}" for k, v in sorted(st["dns"].items())))
        for problem in st.get("verify_problems") or []:
            typer.echo(f"{name}: problem: {problem}")
        if st.get("reload_error"):
            typer.echo(f"{name}: reload error: {st['reload_error']}")
        if st.get("timeline"):
            typer.echo(f"{name}: timeline {_timeline_text(st['timeline'])}")


def _timeline_text(timeline: dict) -> str:
    """`step 2/3, cycle 4/forever, next step in 1.2 s; ramp latency_ms 75 → 200` for status."""
    if timeline["state"] == "waiting":
        return f"starts in {_seconds(timeline['next_change_in_ms'])}"
    if timeline["state"] == "holding":
        cycles = timeline["repeat"]
        return f"done: holding step {timeline['steps']}/{timeline['steps']} (after {cycles} cycle{'s' * (cycles != 1)})"
    text = (f"step {timeline['step']}/{timeline['steps']}, cycle {timeline['cycle']}/{timeline['repeat']}, "
            f"next step in {_seconds(timeline['next_change_in_ms'])}")
    ramps = ", ".join(f"{field} {_number(r['now'])} → {_number(r['to'])}"
                      for field, r in (timeline.get("ramp") or {}).items())
    return f"{text}; ramp {ramps}" if ramps else text


def _timeline_cell(timeline: dict | None) -> str:
    """The compact form for `top`: `2/3 +1.2s`."""
    if not timeline:
        return "-"
    if timeline["state"] == "waiting":
        return f"start +{_seconds(timeline['next_change_in_ms'], short=True)}"
    if timeline["state"] == "holding":
        return f"{timeline['steps']}/{timeline['steps']} held"
    ramp = " ramp" if timeline.get("ramp") else ""
    return f"{timeline['step']}/{timeline['steps']}{ramp} +{_seconds(timeline['next_change_in_ms'], short=True)}"


def _seconds(ms: float, short: bool = False) -> str:
    seconds = ms / 1000
    if seconds >= 120:
        return f"{seconds / 60:.1f}{'m' if short else ' min'}"
    return f"{seconds:.1f}{'s' if short else ' s'}"


@app.command("vms")
def vms_cmd(ctx: typer.Context,
            libvirt: Annotated[Optional[str], typer.Option("--libvirt", metavar="URI", help=(
                "A libvirt connection to list VMs from (default: \\[libvirt] uri in the host config), "
                "e.g. qemu:///system."))] = None,
            watch: Annotated[bool, typer.Option("--watch", help="Follow libvirt: print each VM appearing, "
                                                "changing or going, until Ctrl-C.")] = False,
            config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """The VMs this host knows: its \\[vms.*], and each running libvirt domain's interfaces."""
    from manager import cli_libvirt

    cli_libvirt.vms(load_config(ctx, config), libvirt, json_option(ctx, as_json), watch)


@app.command("top")
def top_cmd(ctx: typer.Context, config: ConfigOption = None, as_json: JsonOption = False,
            interval: Annotated[float, typer.Option(min=0.05, help="Seconds between refreshes.")] = 1.0,
            iterations: Annotated[int, typer.Option(min=0, help="Stop after N refreshes (0: until Ctrl-C).")] = 0
            ) -> None:
    """Live per-VM view of packets/s, bytes/s, drops and queue depth (--json: one JSON line per refresh)."""
    import time

    from manager import assign

    host = load_config(ctx, config)
    if is_manager(host):
        return cli_fleet.top(host, interval, iterations, json_option(ctx, as_json))
    sample = lambda: (_daemon_call(assign.status, host)["vms"], time.monotonic())  # noqa: E731
    count = 0
    try:
        if json_option(ctx, as_json):
            # Every line carries rates, so the first one comes after one interval.
            previous, then = sample()
            while not iterations or count < iterations:
                time.sleep(interval)
                current, now = sample()
                typer.echo(json.dumps(_top_data(current, previous, now - then), ensure_ascii=False))
                previous, then = current, now
                count += 1
            return
        from rich.live import Live

        previous, then = None, time.monotonic()
        with Live(console=console, auto_refresh=False) as live:
            while True:
                current, now = sample()
                live.update(_top_table(current, previous, now - then), refresh=True)
                previous, then = current, now
                count += 1
                if iterations and count >= iterations:
                    break
                time.sleep(interval)
    except KeyboardInterrupt:
        pass


TOP_COUNTERS = ("packets", "bytes", "dropped_packets", "held_packets", "held_bytes")


def _top_data(current: dict, previous: dict, elapsed: float) -> dict:
    """One refresh of `top --json`: per VM and direction, rates over the interval and totals."""
    import time

    seconds = max(elapsed, 1e-6)
    vms = {}
    for name, st in current.items():
        vms[name] = {"active": st["active"], "generation": st["generation"], "timeline": st.get("timeline")}
        for direction in ("uplink", "downlink"):
            c = st[direction]
            p = previous.get(name, {}).get(direction)  # None for a VM that just appeared
            vms[name][direction] = {
                "packets_per_s": (c["packets"] - p["packets"]) / seconds if p else None,
                "kbit_per_s": (c["bytes"] - p["bytes"]) * 8 / 1000 / seconds if p else None,
                "drops_per_s": (c["dropped_packets"] - p["dropped_packets"]) / seconds if p else None,
                **{key: c[key] for key in TOP_COUNTERS},
            }
    return {"time": round(time.time(), 3), "interval_s": round(elapsed, 3), "vms": vms}


def _top_table(current: dict, previous: dict | None, elapsed: float):
    """The table (narrow enough for an 80-column terminal: one line per VM and direction), and
    below it a line per VM whose measured conditions are out of tolerance."""
    table = Table(box=box.SIMPLE_HEAD, title="netskin top", pad_edge=False)
    for heading in ("vm", "skin (step)", "dir", "pkt/s", "kbit/s", "drop/s", "queue", "delay ms\nask/meas",
                    "loss %\nask/meas"):
        table.add_column(heading, justify="left" if heading in ("vm", "skin (step)", "dir") else "right")
    for name, st in current.items():
        step = _timeline_cell(st.get("timeline"))
        skin = (st["active"] or "-") + ("" if step in ("", "-") else f" ({step})")
        for direction in ("uplink", "downlink"):
            c = st[direction]
            p = previous[name][direction] if previous and name in previous else c
            dt = max(elapsed, 1e-6) if previous else 1.0
            rate = lambda key: (c[key] - p[key]) / dt  # noqa: E731
            table.add_row(name, skin, "up" if direction == "uplink" else "down",
                          f"{rate('packets'):.0f}", f"{rate('bytes') * 8 / 1000:.1f}",
                          f"{rate('dropped_packets'):.0f}", str(c["held_packets"]),
                          *_asked_measured(st, direction))
    findings = [Text(f"{name}: out of tolerance: " + "; ".join(st["out_of_tolerance"]), style="red")
                for name, st in current.items() if st.get("out_of_tolerance")]
    return Group(table, *findings) if findings else table


def _asked_measured(st: dict, direction: str) -> tuple[str, str]:
    """"asked/measured" cells for delay (p50 of the added delay) and loss, from status conditions."""
    conditions = (st.get("conditions") or {}).get(direction) or {}
    asked, measured = conditions.get("asked") or {}, conditions.get("measured") or {}
    if not asked:
        return "-", "-"
    delay = (measured.get("added_delay_ms") or {}).get("p50")
    loss = measured.get("loss_percent")
    return (f"{asked.get('delay_ms', 0):g}/{'-' if delay is None else f'{delay:.1f}'}",
            f"{asked.get('loss_percent', 0):g}/{'-' if loss is None else f'{loss:.1f}'}")


# --- netskin lab / demo ----------------------------------------------------------------------

lab_app = typer.Typer(no_args_is_help=True, help="The network-namespace demo lab.")
app.add_typer(lab_app, name="lab")
PrefixOption = Annotated[str, typer.Option(help="Name prefix of the lab's namespaces.")]


# `lab up` writes this line first in every host config it writes; nothing else is overwritten.
LAB_CONFIG_MARK = "# written by `netskin lab up`"


@lab_app.command("up")
def lab_up_cmd(ctx: typer.Context, vms: Annotated[int, typer.Option(min=1, max=50, help="Number of VMs.")] = 2,
               prefix: PrefixOption = "nsk",
               config: Annotated[Optional[Path], typer.Option(
                   "--config", metavar="PATH", show_default=False,
                   help="Also write the lab's host configuration here (never over a file lab up did not "
                        "write).")] = None,
               guests: Annotated[int, typer.Option(
                   min=0, max=8, help="Boot this many QEMU guests as the VMs instead of namespaces (the guest "
                                      "image is built from Debian packages at first use and cached).")] = 0,
               bridge: Annotated[bool, typer.Option(
                   "--bridge", help="With --guests: the guests' taps are ports of a bridge the hypervisor "
                                    "routes and NATs for (libvirt's default), not routed taps.")] = False,
               hosts: Annotated[int, typer.Option(
                   min=0, max=16, help="A fleet lab: this many hypervisor hosts, each with its daemon, agent and "
                                       "--vms VMs, and a control namespace with etcd (0: the one-host lab).")] = 0,
               etcd_members: Annotated[int, typer.Option(
                   min=1, max=3, help="With --hosts: etcd members in the control namespace (1 or 3).")] = 1,
               as_json: JsonOption = False) -> None:
    """Build the lab: a hypervisor, N VMs (namespaces or QEMU guests) and an internet namespace;
    with --hosts, a fleet of hypervisors with etcd, daemons and agents."""
    from manager.lab import LabError, lab_down, lab_up

    if hosts:
        return _fleet_lab_up(ctx, hosts, vms, etcd_members, prefix, config, guests, json_option(ctx, as_json))
    target = config_option(ctx, config)
    if target is not None:
        _check_lab_config_target(target)
    if bridge and not guests:
        fail("--bridge is a layout for guests; add --guests N")
    try:
        if guests:
            lab = lab_up(prefix, 0, guests=guests, bridge=bridge, say=lambda text: typer.echo(text, err=True))
        else:
            lab = lab_up(prefix, vms)
    except LabError as exc:
        fail(f"{exc}")
    config_path = lab.config_path
    if target is not None:
        try:
            target.write_text(lab.config_path.read_text())
        except OSError as exc:
            lab_down(prefix)
            fail(f"cannot write {target}: {exc.strerror}; lab {prefix} removed again; choose another --config path")
        config_path = target
    if json_option(ctx, as_json):
        print_json({"prefix": lab.prefix, "config": str(config_path), "namespaces": lab.namespaces,
                    **({"accel": lab.accel, "bridge": lab.bridge,
                        "guests": {vm.name: {"interface": vm.interface, "address": vm.address,
                                             "address6": vm.address6, "boot_s": lab.boot_s.get(vm.name)}
                                   for vm in lab.guests}} if lab.guests else {})})
        return
    typer.echo(f"lab {lab.prefix} up: {', '.join(lab.namespaces)}")
    for vm in lab.guests:
        typer.echo(f"guest {vm.name}: {vm.address} on {vm.interface}" + (f" (port of {lab.bridge})" if lab.bridge else "")
                   + f", booted with {lab.accel.upper()} in {lab.boot_s.get(vm.name, 0):.1f} s")
    typer.echo(f"host config: {config_path}")
    typer.echo(f"start the daemon:  netskin-interceptor --config {config_path}")


def _fleet_lab_up(ctx: typer.Context, hosts: int, vms: int, etcd_members: int, prefix: str, config: Path | None,
                  guests: int, as_json: bool) -> None:
    from manager.fleet_lab import fleet_lab_up
    from manager.lab import LabError

    if guests or config_option(ctx, config) is not None:
        fail("--hosts builds a fleet lab of namespace VMs and writes its own configurations; "
             "leave out --guests and --config")
    try:
        lab = fleet_lab_up(prefix, hosts, vms, etcd_members=etcd_members,
                           say=lambda text: typer.echo(text, err=True))
    except LabError as exc:
        fail(f"{exc}")
    if as_json:
        print_json(lab.describe())
        return
    for name, host in lab.hosts.items():
        typer.echo(f"{name} ({host.hv_ns}): {', '.join(f'{vm.name} {vm.address}' for vm in host.vms)}; "
                   f"config {host.config_path}")
    typer.echo(f"etcd: {', '.join(lab.endpoints)} in {lab.ctl_ns}")
    typer.echo(f"manager config: {lab.manager_config}")
    typer.echo(f"the fleet:  ip netns exec {lab.ctl_ns} netskin --config {lab.manager_config} status")
    typer.echo(f"remove it:  netskin lab down --prefix {lab.prefix}")


def _written_by_lab(path: Path, prefix: str | None = None) -> bool:
    mark = LAB_CONFIG_MARK + (f" for lab {prefix};" if prefix is not None else "")
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.readline().startswith(mark)
    except OSError:
        return False


def _check_lab_config_target(target: Path) -> None:
    if target.is_dir():
        fail(f"--config {target} is a directory; give the path of the host configuration file to write")
    if target.exists() and not _written_by_lab(target):
        fail(f"--config {target} exists and was not written by `netskin lab up`; "
             f"choose another path or remove it first")
    if not target.parent.is_dir():
        fail(f"--config {target}: no such directory {target.parent}; create it or choose another path")


@lab_app.command("down")
def lab_down_cmd(ctx: typer.Context, prefix: PrefixOption = "nsk",
                 config: Annotated[Optional[Path], typer.Option(
                     "--config", metavar="PATH", show_default=False,
                     help="The host configuration `lab up --config` wrote: removed too.")] = None,
                 as_json: JsonOption = False) -> None:
    """Remove the lab: its namespaces, processes (sinks; a fleet lab's etcd, daemons and agents) and files."""
    from manager.fleet_lab import fleet_lab_down

    fleet_lab_down(prefix)
    target = config_option(ctx, config)
    removed = None
    if target is not None and _written_by_lab(target, prefix):
        target.unlink(missing_ok=True)
        removed = str(target)
    if json_option(ctx, as_json):
        print_json({"removed": prefix, "config_removed": removed})
        return
    typer.echo(f"lab {prefix} removed" + (f", and {removed}" if removed else ""))


@app.command("demo")
def demo_cmd(ctx: typer.Context, skin: Annotated[str, typer.Option(help="The skin to apply.")] = "comcast-3g",
             prefix: PrefixOption = "nskdemo",
             config: Annotated[Optional[Path], typer.Option(
                 "--config", metavar="PATH", show_default=False,
                 help="Host configuration whose skins (skins_dir) --skin may name besides the presets "
                      "(default: $NETSKIN_CONFIG, else /etc/netskin/netskin.toml if it exists); its VMs "
                      "and daemon are not touched.")] = None,
             guests: Annotated[bool, typer.Option(
                 "--guests", help="Measure a real QEMU guest on a routed tap instead of a namespace VM.")] = False,
             timeline: Annotated[bool, typer.Option(
                 "--timeline", help="Record a skin with a timeline over time (default skin: flapping-link) "
                                    "and draw RTT, loss and throughput with its step changes.")] = False,
             seconds: Annotated[float, typer.Option(min=2, max=3600, help="With --timeline: how long to record.")] = 30.0,
             png: Annotated[Path, typer.Option(help="With --timeline: where to write the picture "
                                                    "(the recording goes beside it, .json).")] = Path("netskin-timeline.png"),
             hosts: Annotated[int, typer.Option(
                 min=0, max=16, help="A fleet lab with this many hosts (2 VMs each): one fleet apply with "
                                     "--at and one without, RTT of every VM and the spread of swap times "
                                     "across hosts.")] = 0,
             as_json: JsonOption = False) -> None:
    """Lab up, daemon started, a skin applied, and its effect measured before and after."""
    if hosts:
        from manager.fleet_demo import run_fleet_demo
        from manager.lab import LabError

        as_json = json_option(ctx, as_json)
        try:
            result = run_fleet_demo(hosts, console=None if as_json else console)
        except LabError as exc:
            fail(f"{exc}")
        if as_json:
            print_json(result)
        return
    from manager.demo import run_demo, run_timeline_demo
    from manager.demo import run_guest_demo
    from manager.lab import LabError

    as_json = json_option(ctx, as_json)
    skins_dir = load_config(ctx, config).skins_dir
    if timeline:
        if skin == "comcast-3g":
            skin = "flapping-link"
        try:
            result = _daemon_call(run_timeline_demo, skin, seconds, png, prefix, None if as_json else console,
                                  skins_dir)
        except LabError as exc:
            fail(f"{exc}")
        if as_json:
            print_json(result)
        return
    try:
        result = _daemon_call(run_guest_demo if guests else run_demo, skin, prefix, None if as_json else console,
                              skins_dir, vm="vm1", as_json=as_json)
    except LabError as exc:
        fail(f"{exc}")
    if as_json:
        print_json(result)


@app.command("plot")
def plot_cmd(ctx: typer.Context, recording: Annotated[Path, typer.Argument(
                 metavar="FILE", help="A recording (.json) written by `netskin demo --timeline`.")],
             png: Annotated[Optional[Path], typer.Option(help="Also draw it to this PNG.")] = None,
             width: Annotated[int, typer.Option(min=20, max=400, help="Terminal chart width.")] = 72,
             as_json: JsonOption = False) -> None:
    """Draw a recorded run: RTT, loss and throughput over time with the step changes marked."""
    from manager import plot

    as_json = json_option(ctx, as_json)
    try:
        run = plot.Recording.load(recording)
    except ValueError as exc:
        fail(str(exc))
    if png is not None:
        plot.png(run, png)
    if as_json:
        lost = sum(rtt is None for _, rtt in run.probes)
        print_json({"skin": run.skin, "vm": run.vm, "seconds": run.duration_s, "probes": len(run.probes),
                    "lost": lost, "steps": run.steps, "png": str(png) if png else None})
        return
    typer.echo(plot.terminal_chart(run, width))
    if png is not None:
        typer.echo(f"picture: {png}")


@app.command("agent")
def agent_cmd(ctx: typer.Context,
              lease_ttl: Annotated[int, typer.Option(
                  metavar="SECONDS", min=2, max=3600,
                  help="TTL of the host's alive key: a dead agent's host shows gone this long after.")] = 10,
              conditions_every: Annotated[float, typer.Option(
                  metavar="SECONDS", min=0.5, help="How often measured conditions are published.")] = 5.0,
              config: ConfigOption = None) -> None:
    """On a fleet host: watch the store for this host's skins, drive the local daemon, report back."""
    import logging

    from manager import agent

    host_config = load_config(ctx, config)
    if host_config.store is None:
        fail("this host configuration has no [store] table: add one with the fleet's etcd endpoints "
             "to run the agent (see the README's fleet section)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    agent.main(host_config, lease_ttl_s=lease_ttl, conditions_every_s=conditions_every)


@app.command("serve")
def serve_cmd(ctx: typer.Context, host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
              port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8640,
              token_file: Annotated[Optional[Path], typer.Option(
                  metavar="FILE", help="Bearer token clients must send (else $NETSKIN_API_TOKEN); "
                                       "required off loopback.")] = None,
              timeout: Annotated[float, typer.Option(
                  metavar="SECONDS", min=0.1,
                  help="How long an apply, rollback or revert may take before the answer is 504 "
                       "with the VM's status.")] = 30.0,
              verify_timeout: Annotated[float, typer.Option(
                  metavar="SECONDS", min=0,
                  help="After the daemon's answer: how long an apply waits to see it enforced.")] = 5.0,
              config: ConfigOption = None) -> None:
    """The REST API (JSON; OpenAPI at /openapi.json, Prometheus at /metrics)."""
    from manager import api

    token = api.load_token(token_file)
    api.check_listen(host, token)  # before anything else: refuse early, with the reason
    api.serve(load_config(ctx, config), host, port, token, verify_timeout, timeout)


if __name__ == "__main__":
    main()
