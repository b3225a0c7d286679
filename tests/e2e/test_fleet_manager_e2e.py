"""The fleet manager against two lab hosts: etcd in its own namespace, per host a lab, a daemon and
`netskin agent`, and the `netskin` CLI (and `netskin serve`) with a manager configuration.

Everything that speaks to etcd (agents, the CLI, the API) runs in etcd's namespace; agents reach
their daemon through its control socket, a file. Host hv1 is lab A (vm1, vm2); host hv2 is lab B
with its VMs renamed b1 and b2, since a VM's name is unique across the fleet.

One scenario, in order: fleet apply on both hosts, the same at one instant (--at), rollback, a
conflict that writes nothing, an agent killed -9 shown stale within its lease, a --wait that
times out on the stale host and restores every target, the REST API on the fleet.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from manager import fleet, fleetctl, measure, store
from manager.fleet import Desired, SkinDocument
from manager.process import DaemonProcess
from tests.e2e.netns_helpers import AgentProcess
from tests.conftest import _build_lab
from tests.e2e.etcd_lab import Etcd, etcd_skip_reason, in_netns, trio_in_netns

pytestmark = pytest.mark.e2e

LEASE_TTL_S = 3


def wait_for(what: str, predicate, timeout: float = 20.0, logs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:g} s: {what}\n" + "\n".join(f"--- {log.__self__.name} log:\n{log()}"
                                                                           for log in logs))



class Fleet:
    """The test's handles: etcd, both hosts' labs, daemons and agents, and the manager's config."""

    def __init__(self, etcd: Etcd, labs: dict, daemons: dict, agents: dict, manager: Path) -> None:
        self.etcd, self.labs, self.daemons, self.agents, self.manager = etcd, labs, daemons, agents, manager

    def netskin(self, *args: str, check_code: int | None = 0) -> subprocess.CompletedProcess:
        done = subprocess.run(["ip", "netns", "exec", self.etcd.ns, sys.executable, "-m", "manager.cli", *args,
                               "--config", str(self.manager)], capture_output=True, text=True, timeout=120)
        if check_code is not None:
            assert done.returncode == check_code, (args, done.returncode, done.stdout, done.stderr, self.logs())
        return done

    def netskin_json(self, *args: str, check_code: int | None = 0) -> dict:
        return json.loads(self.netskin(*args, "--json", check_code=check_code).stdout)

    def call(self, method: str, *args, **kwargs):
        async def main():
            async with store.Store([self.etcd.local_endpoint]) as s:
                return await getattr(s, method)(*args, **kwargs)
        return trio_in_netns(self.etcd.ns, main)

    def desired(self, host: str, vm: str):
        return self.call("get", fleet.desired_key(host, vm))

    def active(self, host: str, vm: str) -> str | None:
        return self.daemons[host].status(vm)[vm]["active"]

    @contextlib.contextmanager
    def serve(self):
        """`netskin serve` with the manager's configuration in etcd's namespace; yields a request function."""
        port = 8640
        log = open(self.manager.with_name("serve.log"), "ab")
        proc = subprocess.Popen(["ip", "netns", "exec", self.etcd.ns, sys.executable, "-m", "manager.cli", "serve",
                                 "--port", str(port), "--config", str(self.manager)], stdout=log,
                                stderr=subprocess.STDOUT)

        def request(method: str, path: str, **kwargs) -> httpx.Response:
            return in_netns(self.etcd.ns, lambda: httpx.request(method, f"http://127.0.0.1:{port}{path}",
                                                                timeout=60, **kwargs))

        def up() -> bool:
            try:
                return request("GET", "/openapi.json").status_code == 200
            except httpx.TransportError:
                return False

        try:
            wait_for("netskin serve answering", up)
            yield request
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()

    def logs(self) -> str:
        return "\n".join(f"--- agent {name}:\n{agent.log()}" for name, agent in self.agents.items())


def rtt_ms(lab, vm: str = "vm1") -> float:
    return measure.ping(lab, vm, lab.inet_address, count=5, interval=0.05)["rtt_median_ms"]


@pytest.fixture
def two_hosts(request, tmp_path):
    reason = etcd_skip_reason()
    if reason:
        pytest.skip(reason)
    lab_a, lab_b = _build_lab(request), _build_lab(request)
    with Etcd(f"nskfm{secrets.token_hex(3)}") as etcd:
        table = f'\n[store]\nendpoints = ["{etcd.local_endpoint}"]\n'
        configs = {"hv1": lab_a.config_path.with_name("fleet-hv1.toml"),
                   "hv2": lab_b.config_path.with_name("fleet-hv2.toml")}
        configs["hv1"].write_text(lab_a.config_path.read_text() + table + 'host = "hv1"\n')
        renamed = lab_b.config_path.read_text().replace("[vms.vm1]", "[vms.b1]").replace("[vms.vm2]", "[vms.b2]")
        configs["hv2"].write_text(renamed + table + 'host = "hv2"\n')
        manager = tmp_path / "manager.toml"
        manager.write_text(f'state_dir = "{tmp_path}/state"\nskins_dir = "{tmp_path}/skins.d"\n' + table)
        daemons = {host: DaemonProcess(path) for host, path in configs.items()}
        agents = {host: AgentProcess(host, etcd.ns, path, path.with_name(f"agent-{host}.log"), LEASE_TTL_S)
                  for host, path in configs.items()}
        try:
            for daemon in daemons.values():
                daemon.start()
            for agent in agents.values():
                agent.start()
            yield Fleet(etcd, {"hv1": lab_a, "hv2": lab_b}, daemons, agents, manager)
        finally:
            for agent in agents.values():
                agent.kill()
            for daemon in daemons.values():
                daemon.stop()


def write_skin(tmp_path: Path, name: str, **fields) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"name": name, **fields}))
    return path


def test_fleet_manager(two_hosts, tmp_path):
    f = two_hosts
    base = {host: rtt_ms(lab) for host, lab in f.labs.items()}
    wait_for("both hosts alive with their inventory",
             lambda: [h["state"] for h in f.netskin_json("status")["hosts"]] == ["alive", "alive"], logs=[f.logs])
    status = f.netskin_json("status")
    assert {(row["host"], row["vm"]) for row in status["vms"]} == {("hv1", "vm1"), ("hv1", "vm2"),
                                                                  ("hv2", "b1"), ("hv2", "b2")}

    # The library lives in the store.
    f.netskin("skins", "create", str(write_skin(tmp_path, "fleet-slow", latency_ms=200)))
    f.netskin("skins", "create", str(write_skin(tmp_path, "fleet-steady", latency_ms=20)))
    names = {entry["name"]: entry["origin"] for entry in f.netskin_json("skins", "list")}
    assert names["fleet-slow"] == "store" and "comcast-3g" in names

    # One transaction, two hosts, verified on both; HOST/VM names one as well.
    applied = f.netskin_json("apply", "vm1,hv2/b1", "fleet-slow")
    assert applied["verified"] is True and [t["state"] for t in applied["targets"]] == ["done", "done"]
    assert f.active("hv1", "vm1") == f.active("hv2", "b1") == "fleet-slow"
    assert rtt_ms(f.labs["hv1"]) > base["hv1"] + 150 and rtt_ms(f.labs["hv2"]) > base["hv2"] + 150
    print(f"\nswap spread without --at: {applied['spread_ms']} ms")

    # status of chosen VMs; top across hosts from the conditions the agents publish.
    chosen = f.netskin_json("status", "vm1,hv2/b1")
    assert [(r["host"], r["vm"], r["active"], r["applied"], r["enforced"]) for r in chosen["vms"]] == [
        ("hv1", "vm1", "fleet-slow", True, True), ("hv2", "b1", "fleet-slow", True, True)]
    wait_for("conditions of both hosts' VMs published",
             lambda: {(r["host"], r["vm"], r["skin"]) for r in json.loads(f.netskin(
                 "top", "--json", "--iterations", "1").stdout)["rows"]} >= {("hv1", "vm1", "fleet-slow"),
                                                                             ("hv2", "b1", "fleet-slow")})
    lines = f.netskin("top", "--json", "--iterations", "2", "--interval", "1.5").stdout.splitlines()
    assert len(lines) == 2 and all(row["direction"] in ("uplink", "downlink") for row in json.loads(lines[1])["rows"])

    # --at: both hosts swap at the same wall-clock instant, none before it.
    scheduled = f.netskin_json("apply", "vm1,b1", "fleet-steady", "--at", "+3s")
    assert scheduled["verified"] is True
    for target in scheduled["targets"]:
        assert target["swapped_at"] >= scheduled["at"] - 0.01, target
    assert f.active("hv1", "vm1") == f.active("hv2", "b1") == "fleet-steady"
    print(f"swap spread with --at: {scheduled['spread_ms']} ms; late by "
          f"{[t['late_ms'] for t in scheduled['targets']]} ms")

    # Rollback swaps skin and shadow in the store; the agents follow.
    f.netskin("rollback", "vm1")
    assert f.active("hv1", "vm1") == "fleet-slow" and f.active("hv2", "b1") == "fleet-steady"
    vm1 = fleet.Desired.decode(f.desired("hv1", "vm1").value)
    assert (vm1.skin.name, vm1.shadow.name) == ("fleet-slow", "fleet-steady")

    # All or none: b1 changes between the manager's read and its write; nothing is written.
    vm1_before = f.desired("hv1", "vm1").mod_revision
    competing = Desired(skin=SkinDocument(name="fleet-steady", document={"name": "fleet-steady", "latency_ms": 20}),
                        generation=99)
    original_read = fleetctl.read_view

    async def read_then_someone_writes(s):
        view = await original_read(s)
        await s.put(fleet.desired_key("hv2", "b1"), competing.encode())
        return view

    from manager.cli import app

    fleetctl.read_view = read_then_someone_writes
    try:
        result = in_netns(f.etcd.ns, lambda: CliRunner().invoke(
            app, ["apply", "vm1,b1", "comcast-3g", "--config", str(f.manager)]))
    finally:
        fleetctl.read_view = original_read
    assert result.exit_code == 1, result.output
    assert "hv2/b1 changed meanwhile" in result.output and "nothing was written" in result.output
    assert f.desired("hv1", "vm1").mod_revision == vm1_before
    assert fleet.Desired.decode(f.desired("hv2", "b1").value).generation == 99
    assert f.active("hv1", "vm1") == "fleet-slow"

    # hv2's agent dies: the manager shows the host stale within its lease, its VMs keep their skins.
    f.agents["hv2"].kill()
    wait_for("hv2 stale", lambda: {h["host"]: h["state"] for h in f.netskin_json("status")["hosts"]} == {
        "hv1": "alive", "hv2": "stale"}, timeout=LEASE_TTL_S + 5)
    assert f.active("hv2", "b1") == "fleet-steady"
    table = f.netskin("status").stdout
    assert "stale" in table and "hv2/b1" in table

    # --wait: hv2 never reports, so after the bound every target is restored and the exit is 3.
    timed_out = f.netskin_json("apply", "vm2,b2", "fleet-slow", "--wait", "4", check_code=3)
    assert timed_out["verified"] is False and sorted(timed_out["restored"]) == ["hv1/vm2", "hv2/b2"]
    assert "hv2/b2: not in force yet" in timed_out["problems"]
    assert f.desired("hv1", "vm2") is None and f.desired("hv2", "b2") is None
    wait_for("vm2 reverted by its agent after the restore", lambda: f.active("hv1", "vm2") is None, logs=[f.logs])
    assert f.active("hv2", "b2") is None and f.active("hv2", "b1") == "fleet-steady"

    # The REST API on the fleet: hosts alive or stale, the seed endpoints on VMs of any host.
    with f.serve() as get_or_post:
        hosts = get_or_post("GET", "/hosts")
        assert hosts.status_code == 200
        assert {h["host"]: h["state"] for h in hosts.json()["hosts"]} == {"hv1": "alive", "hv2": "stale"}
        answer = get_or_post("POST", "/vms/vm1/skins/fleet-steady")
        assert answer.status_code == 200, answer.text
        assert answer.json()["verified"] is True and f.active("hv1", "vm1") == "fleet-steady"
        row = get_or_post("GET", "/vms/vm1").json()
        assert (row["host"], row["active"], row["shadow"], row["enforced"]) == ("hv1", "fleet-steady", "fleet-slow", True)
        assert get_or_post("GET", "/vms/vm1/persona").json()["id"] == "fleet-steady"
        stuck = get_or_post("POST", "/vms/b1/revert?wait=2")
        assert stuck.status_code == 422 and stuck.json()["outcome"]["restored"] == ["hv2/b1"], stuck.text
        assert fleet.Desired.decode(f.desired("hv2", "b1").value).skin.name == "fleet-steady"
        assert get_or_post("POST", "/vms/vm9/skins/fleet-slow").status_code == 404
        persona = get_or_post("POST", "/personas/create", json={"simulated_latency_ms": 50})
        assert persona.status_code == 201 and f.call("get", fleet.skin_key(persona.json()["id"])) is not None

    # Revert on the fleet: the desired key goes, the agent restores the VM.
    f.netskin("revert", "vm1")
    assert f.desired("hv1", "vm1") is None and f.active("hv1", "vm1") is None
    unknown = f.netskin("apply", "vm9", "fleet-slow", check_code=1)
    assert "unknown VM 'vm9'" in unknown.stderr
