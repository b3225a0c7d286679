"""The fleet's benchmark: how fast the manager and the store take assignments, and how long a fleet
apply takes to be in force on every host, for 10, 100 and 1000 VMs.

    python -m bench.fleet [--hosts 4] [--vms 1] [--per-host 250] [--sizes 10,100,1000] [--repeats 10] [--json FILE]
    python -m bench.run --only fleet      (the same, with its defaults)

Builds a fleet lab (``manager.fleet_lab``: etcd with TLS and auth in its control namespace, real
daemons and agents on every host), each host with one namespace VM and the rest VMs without
traffic (veth ends the daemon steers like any VM), and removes it at the end. ``--vms 2
--per-host 2 --hosts 3``: the demo's lab (3 hosts × 2 namespace VMs), for the spread alone. Per row, VMs are
taken round-robin across the hosts, so every row touches every host. Rows:

- assignments/s: the manager's side of ``netskin apply`` (read the fleet, resolve names, plan,
  commit) for N VMs, divided into its run time. One transaction holds at most 100 VMs (etcd's
  128 operations per transaction), so 1000 VMs are 10 transactions, each atomic, not together.
- apply → enforced: from the start of that apply until every target's agent reported the new
  desired revision enforced by its daemon (polled from the store, every 20 ms up to 100 VMs,
  every 100 ms above), so it includes every host's watch, swap and verification.
- swap spread: across hosts, first to last swap (the agents' reported times), with ``--at``
  one second ahead and without.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from pathlib import Path

import trio
from rich import box
from rich.console import Console
from rich.table import Table

from bench.stats import median, percentile
from manager import fleetctl
from manager.fleet_lab import FleetLab, fleet_lab_down, fleet_lab_up
from manager.store import Store

SKINS = {"bench-fleet-a": {"latency_ms": 20}, "bench-fleet-b": {"latency_ms": 30}}
out = Console()


def round_robin(lab: FleetLab) -> list[str]:
    """Every VM, taken one host after another, so the first N touch every host."""
    per_host = [[vm.name for vm in host.vms] + lab.idle[name] for name, host in lab.hosts.items()]
    return [names[i] for i in range(max(map(len, per_host))) for names in per_host if i < len(names)]


async def apply_and_wait(store: Store, names: list[str], skin: str, at: float | None = None,
                         timeout_s: float = 120.0) -> dict:
    """One fleet apply of ``skin`` to ``names`` (in transactions of at most 100 VMs); its timings."""
    t0 = time.perf_counter()
    view = await fleetctl.read_view(store)
    document, revision = await fleetctl.find_skin(store, skin)
    changes = []
    for first in range(0, len(names), fleetctl.MAX_TARGETS):
        targets = fleetctl.resolve(view, names[first:first + fleetctl.MAX_TARGETS])
        change = fleetctl.plan_apply(view, targets, document, skin_revision=revision, at=at)
        changes.append((change, await fleetctl.commit(store, change)))
    committed_s = time.perf_counter() - t0
    poll_s = 0.02 if len(names) <= 100 else 0.1
    pending = list(changes)
    swapped: list[float] = []
    hosts_done: dict[str, float] = {}
    deadline = time.perf_counter() + timeout_s
    while pending:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{skin} on {len(names)} VMs not in force within {timeout_s:g} s")
        still = []
        for change, rev in pending:
            found = await fleetctl.statuses(store, (step.target for step in change.steps))
            states = {step.target: fleetctl.step_done(step, rev, found[step.target]) for step in change.steps}
            failed = [str(t) for t, state in states.items() if state == "failed"]
            if failed:
                raise RuntimeError(f"{skin} failed on {failed[:5]}: {[found[t] for t in list(states)[:1]]}")
            if all(state == "done" for state in states.values()):
                now = time.perf_counter() - t0
                for target, status in found.items():
                    swapped.append(status.swapped_at)
                    hosts_done[target.host] = max(hosts_done.get(target.host, 0.0), now)
            else:
                still.append((change, rev))
        pending = still
        if pending:
            await trio.sleep(poll_s)
    return {"vms": len(names), "transactions": len(changes), "committed_s": committed_s,
            "assignments_per_s": len(names) / committed_s, "enforced_s": max(hosts_done.values()),
            "hosts": len(hosts_done), "spread_ms": (max(swapped) - min(swapped)) * 1000}


def run(lab: FleetLab, sizes: list[int], repeats: int, spread_repeats: int) -> dict:
    every = round_robin(lab)

    async def main(store: Store) -> dict:
        for name, fields in SKINS.items():
            if await store.get(f"/netskin/skins/{name}") is None:
                await fleetctl.create_skin(store, {"name": name, **fields})
        skins = list(SKINS)
        results: dict = {"sizes": {}, "spread": {}}
        turn = 0
        for size in sizes:
            runs = []
            for _ in range(repeats):
                turn += 1
                runs.append(await apply_and_wait(store, every[:size], skins[turn % 2]))
            results["sizes"][size] = runs
            out.print(f"{size} VMs: {median([r['assignments_per_s'] for r in runs]):.0f} assignments/s, "
                      f"enforced on every host in {median([r['enforced_s'] for r in runs]) * 1000:.0f} ms (median)")
        spread_set = every[:len(lab.hosts) * 2]
        for label, ahead in (("with --at", 1.0), ("without --at", None)):
            spreads = []
            for _ in range(spread_repeats):
                turn += 1
                at = time.time() + ahead if ahead else None
                spreads.append((await apply_and_wait(store, spread_set, skins[turn % 2], at=at))["spread_ms"])
            results["spread"][label] = spreads
        return results

    return lab.store_call(main)


def table(results: dict, hosts: int) -> Table:
    t = Table(box=box.SIMPLE_HEAD, title=f"fleet apply, {hosts} hosts, etcd (TLS + auth, 1 member)")
    for heading in ("VMs", "txns", "assignments/s (manager+store)", "apply → enforced, median", "p99"):
        t.add_column(heading, justify="right")
    for size, runs in results["sizes"].items():
        enforced = [r["enforced_s"] * 1000 for r in runs]
        t.add_row(str(size), str(runs[0]["transactions"]), f"{median([r['assignments_per_s'] for r in runs]):.0f}",
                  f"{median(enforced):.0f} ms", f"{percentile(enforced, 99):.0f} ms")
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--vms", type=int, default=1, help="VMs with a namespace (traffic) per host")
    parser.add_argument("--per-host", type=int, default=250, help="VMs per host in all (the rest have no traffic)")
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--spread-repeats", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if not 1 <= args.vms <= args.per_host:
        parser.error("--vms: between 1 and --per-host")
    if max(sizes) > args.hosts * args.per_host:
        parser.error(f"--sizes up to {max(sizes)} needs --hosts × --per-host ≥ that")
    prefix = "nskbf" + secrets.token_hex(3)
    started = time.monotonic()
    try:
        lab = fleet_lab_up(prefix, args.hosts, args.vms, idle_vms=args.per_host - args.vms, lease_ttl_s=10,
                           say=lambda text: out.print(f"[dim]{text}[/]"))
        results = run(lab, sizes, args.repeats, args.spread_repeats)
    finally:
        fleet_lab_down(prefix)
    out.print(table(results, args.hosts))
    for label, spreads in results["spread"].items():
        out.print(f"swap spread across {args.hosts} hosts ({args.hosts * 2} VMs), {label}: "
                  f"median {median(spreads):.1f} ms, p99 {percentile(spreads, 99):.1f} ms, "
                  f"max {max(spreads):.1f} ms over {len(spreads)} applies")
    out.print(f"{time.monotonic() - started:.0f} s; p99 of {args.repeats} runs is close to their max")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **results}, indent=2,
                                        default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
