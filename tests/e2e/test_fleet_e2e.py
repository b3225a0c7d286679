"""The fleet on one lab host: etcd in its own namespace, the daemon, and `netskin agent` between them.

One scenario, in order, because each step starts from the state the one before left: a desired
skin is enforced and reported; a kill -9'd agent converges on restart without re-applying what did
not change; a partition with a compaction behind it ends in a resync; a dead etcd leaves the skins
in force; a dead agent's alive key goes with its lease.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from manager import fleet, measure, store
from manager.fleet import Desired, SkinDocument
from manager.process import DaemonProcess
from tests.e2e.netns_helpers import AgentProcess
from tests.e2e.etcd_lab import Etcd, etcd_skip_reason, trio_in_netns

pytestmark = pytest.mark.e2e

HOST = "hv1"
LEASE_TTL_S = 3


def wait_for(what: str, predicate, timeout: float = 20.0, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:g} s: {what}" + (f"\nagent log:\n{log()}" if log else ""))



class Client:
    """The test's side of the store, from inside etcd's namespace."""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd

    def call(self, method: str, *args, **kwargs):
        async def main():
            async with store.Store([self.etcd.local_endpoint]) as s:
                return await getattr(s, method)(*args, **kwargs)
        return trio_in_netns(self.etcd.ns, main)

    def want(self, vm: str, name: str, generation: int, **skin) -> int:
        desired = Desired(skin=SkinDocument(name=name, document={"name": name, **skin}), generation=generation)
        return self.call("put", fleet.desired_key(HOST, vm), desired.encode())

    def status(self, vm: str) -> fleet.Status | None:
        kv = self.call("get", fleet.status_key(HOST, vm))
        return fleet.Status.decode(kv.value) if kv else None

    def get(self, key: str):
        return self.call("get", key)


def rtt_ms(lab, vm: str = "vm1") -> float:
    return measure.ping(lab, vm, lab.inet_address, count=5, interval=0.05)["rtt_median_ms"]


@pytest.fixture
def lab(request):
    """Three VMs: two assignments change while the agent is dead, the third is the control."""
    from tests.conftest import _build_lab

    return _build_lab(request, vms=3)


@pytest.fixture
def etcd(lab):
    reason = etcd_skip_reason()
    if reason:
        pytest.skip(reason)
    with Etcd(f"nskfl{secrets.token_hex(3)}", peer_ns=lab.hv_ns, compaction_retention=1000) as server:
        yield server


def test_agent_converges_resyncs_and_fails_static(lab, etcd):
    config = lab.config_path.with_name("fleet.toml")
    config.write_text(lab.config_path.read_text() + f'\n[store]\nendpoints = ["{etcd.endpoint}"]\nhost = "{HOST}"\n')
    client = Client(etcd)
    agent = AgentProcess("agent", lab.hv_ns, config, config.with_name("agent.log"), LEASE_TTL_S)
    daemon = DaemonProcess(config)
    try:
        daemon.start()
        base = rtt_ms(lab)
        agent.start()

        # A desired skin is enforced, reported, and its conditions and the host's liveness appear.
        rev1 = client.want("vm1", "fleet-slow", 1, latency_ms=200)
        rev2 = client.want("vm2", "fleet-steady", 1, latency_ms=20)
        rev3 = client.want("vm3", "fleet-steady", 1, latency_ms=20)
        for vm, rev in (("vm1", rev1), ("vm2", rev2), ("vm3", rev3)):
            wait_for(f"{vm} enforced at revision {rev}",
                     lambda: (st := client.status(vm)) and st.applied_rev == rev and st.state == "enforced",
                     log=agent.log)
        assert daemon.status("vm1")["vm1"]["active"] == "fleet-slow"
        assert rtt_ms(lab) > base + 150
        status1 = client.status("vm1")
        assert status1.generation == status1.enforced_generation == daemon.status("vm1")["vm1"]["generation"]
        assert json.loads(Path(lab.workdir / "skins.d" / "fleet-slow.json").read_text())["latency_ms"] == 200
        wait_for("conditions of vm1", lambda: client.get(fleet.conditions_key(HOST, "vm1")), log=agent.log)
        alive = fleet.Alive.decode(client.get(fleet.alive_key(HOST)).value)
        assert alive.host == HOST and alive.in_sync

        # kill -9: the alive key goes with the lease; two changes made meanwhile land on restart,
        # and vm2, whose desired key did not change, is not applied again.
        vm2_generation = daemon.status("vm2")["vm2"]["generation"]
        agent.kill()
        wait_for("the alive key gone after its lease", lambda: client.get(fleet.alive_key(HOST)) is None,
                 timeout=LEASE_TTL_S + 5)
        rev1 = client.want("vm1", "fleet-slower", 2, latency_ms=300)
        rev3 = client.want("vm3", "fleet-slow", 2, latency_ms=200)
        agent.start()
        wait_for("vm1 converged after the restart",
                 lambda: (st := client.status("vm1")) and st.applied_rev == rev1 and st.skin == "fleet-slower",
                 log=agent.log)
        wait_for("vm3 converged after the restart",
                 lambda: (st := client.status("vm3")) and st.applied_rev == rev3 and st.skin == "fleet-slow",
                 log=agent.log)
        assert daemon.status("vm3")["vm3"]["active"] == "fleet-slow"
        assert daemon.status("vm2")["vm2"]["generation"] == vm2_generation
        assert client.status("vm2").applied_rev == rev2
        assert rtt_ms(lab) > base + 250

        # A partition; meanwhile vm1 changes, vm2 is no longer desired, and etcd compacts past the
        # agent's revision. After the heal the watch cannot resume: the agent ranges and converges.
        subprocess.run(["ip", "-n", lab.hv_ns, "link", "set", "mgmt0", "down"], check=True)
        wait_for("the agent noticing the partition", lambda: "store unavailable" in agent.log(),
                 timeout=LEASE_TTL_S + 10, log=agent.log)
        rev1 = client.want("vm1", "fleet-slow", 3, latency_ms=200)
        client.call("delete", fleet.desired_key(HOST, "vm2"))
        etcd.ctl("compact", str(client.call("revision")))
        subprocess.run(["ip", "-n", lab.hv_ns, "link", "set", "mgmt0", "up"], check=True)
        wait_for("vm1 converged after the compaction",
                 lambda: (st := client.status("vm1")) and st.applied_rev == rev1 and st.skin == "fleet-slow",
                 timeout=30, log=agent.log)
        wait_for("vm2 reverted", lambda: (st := client.status("vm2")) and st.state == "reverted", log=agent.log)
        assert "compacted" in agent.log()
        assert daemon.status("vm2")["vm2"]["active"] is None
        assert daemon.status("vm1")["vm1"]["active"] == "fleet-slow"

        # etcd gone: the skin stays in force and the agent keeps running, retrying.
        etcd.stop()
        wait_for("the agent noticing etcd is gone",
                 lambda: agent.log().count("store unavailable") >= 2, timeout=LEASE_TTL_S + 10, log=agent.log)
        assert agent.proc.poll() is None
        assert daemon.status("vm1")["vm1"]["active"] == "fleet-slow"
        assert rtt_ms(lab) > base + 150
    finally:
        agent.kill()
        daemon.stop()
