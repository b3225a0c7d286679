"""``netskin vms``: the VMs this host knows, from its ``[vms.*]`` and from libvirt.

What libvirt shows is what ``interceptor.libvirt_source`` sees: one VM per interface of each
running domain, with its tap, bridge, MAC, MTU and the skin in the domain's metadata. With
``--watch`` the command follows libvirt's events and prints each VM appearing, changing or going.
"""

from __future__ import annotations

import json
import math
from typing import Any

import trio
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from interceptor.libvirt_source import Event, LibvirtSource, LibvirtVm, event_json
from interceptor.schema import HostConfig, UserError

console = Console()


def _configured(config: HostConfig) -> list[dict[str, Any]]:
    return [{"name": name, "source": "config", "tap": vm.interface, "bridge": None, "mac": None, "mtu": None,
             "skin": vm.skin, "address": str(vm.address), "address6": str(vm.address6) if vm.address6 else None,
             "domain": None} for name, vm in config.vms.items()]


def _from_libvirt(vm: LibvirtVm) -> dict[str, Any]:
    return {"source": "libvirt", **vm.to_json()}


async def _snapshot(uri: str) -> tuple[list[LibvirtVm], list[str]]:
    source = LibvirtSource(uri)
    send, _receive = trio.open_memory_channel(math.inf)  # the listing is read from the inventory
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        nursery.cancel_scope.cancel()
    problems = [line for lines in source.problems.values() for line in lines]
    return sorted(source.inventory.vms.values(), key=lambda vm: vm.name), problems


async def _watch(uri: str, as_json: bool) -> None:
    source = LibvirtSource(uri)
    send, receive = trio.open_memory_channel(100)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)  # the VMs running now have been sent
        typer.echo(f"following {uri} (Ctrl-C to stop)", err=True)
        async for event in receive:
            _print_event(event, as_json)


def _print_event(event: Event, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(event_json(event), ensure_ascii=False))
        return
    vm = event.vm
    kind = type(event).__name__.lower()
    typer.echo(f"{kind} {vm.name}: tap {vm.tap or '-'}, bridge {vm.bridge or '-'}, MAC {vm.mac or '-'}, "
               f"MTU {vm.mtu}, skin {vm.skin or '-'}")


def _run(fn, *args):
    """trio.run, with a user error from inside a nursery raised as itself (one line, exit 1)."""
    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as group:
        matched, _rest = group.split(UserError)
        while isinstance(matched, BaseExceptionGroup):
            matched = matched.exceptions[0]
        if matched is not None:
            raise matched from None
        raise


def vms(config: HostConfig, uri: str | None, as_json: bool, watch: bool) -> None:
    uri = uri or (config.libvirt.uri if config.libvirt else None)
    if watch:
        if uri is None:
            raise typer.BadParameter("--watch follows libvirt: give --libvirt URI or [libvirt] in the host config")
        try:
            _run(_watch, uri, as_json)
        except KeyboardInterrupt:
            pass
        return
    rows = _configured(config)
    problems: list[str] = []
    if uri is not None:
        found, problems = _run(_snapshot, uri)
        rows += [_from_libvirt(vm) for vm in found]
    if as_json:
        typer.echo(json.dumps({"vms": rows, "libvirt": uri, "problems": problems}, indent=2, ensure_ascii=False))
        return
    table = Table(box=box.SIMPLE_HEAD)
    for heading in ("vm", "from", "tap", "bridge", "mac", "mtu", "skin", "address"):
        table.add_column(heading)
    for row in rows:
        table.add_row(row["name"], row["source"], row["tap"] or "-", row["bridge"] or "-", row["mac"] or "-",
                      str(row["mtu"] or "-"), row["skin"] or "-", row["address"] or "-")
    console.print(table)
    for line in problems:
        typer.echo(line)
