"""Fleet security against a real etcd on TLS with client certificates and auth on.

The users and roles are ``manager.fleet_security``'s for hosts hv1 and hv2: each host's agent
reads the library and its own host's keys, writes only its status, alive and conditions keys; the
manager writes everything under /netskin/. An agent runs with hv1's credentials and converges.
"""

from __future__ import annotations

import re
import secrets
import signal

import pytest
import trio

from interceptor.schema import load_host_config
from manager import fleet, fleet_security, store
from manager.fleet import Desired, SkinDocument
from manager.process import DaemonProcess
from tests.e2e.etcd_lab import Etcd, etcd_skip_reason, trio_in_netns
from tests.e2e.netns_helpers import AgentProcess
from tests.e2e.test_fleet_e2e import LEASE_TTL_S, wait_for

pytestmark = pytest.mark.e2e

HOSTS = ["hv1", "hv2"]


def skip_without_etcd() -> None:
    reason = etcd_skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def etcd():
    skip_without_etcd()
    with Etcd(f"nsksc{secrets.token_hex(3)}", tls=True, auth_hosts=HOSTS) as server:
        yield server


def desired(name: str, generation: int = 1, **skin) -> bytes:
    return Desired(skin=SkinDocument(name=name, document={"name": name, **skin}), generation=generation).encode()


def refused(what: str, user: str = "hv1"):
    """etcd's refusal, as the Store words it: the key (or watch) and the user."""
    return pytest.raises(store.StoreError, match=f"etcd refused {re.escape(what)}.*: permission denied to etcd user '{user}'")


def test_a_host_reads_its_keys_and_writes_only_its_status(etcd):
    async def main():
        async with etcd.store("manager") as manager:
            await manager.put(fleet.skin_key("slow"), {"name": "slow", "latency_ms": 200})
            mine = await manager.put(fleet.desired_key("hv1", "vm1"), desired("slow"))
            await manager.put(fleet.desired_key("hv2", "vm1"), desired("slow"))

        async with etcd.store("hv1") as hv1:
            # Reads: the library, its own desired key, its whole host prefix (what the agent ranges).
            _, skins = await hv1.get_prefix(fleet.skins_prefix())
            assert [kv.key for kv in skins] == [fleet.skin_key("slow")]
            assert (await hv1.get(fleet.desired_key("hv1", "vm1"))).mod_revision == mine
            _, own = await hv1.get_prefix(fleet.host_prefix("hv1"))
            assert [kv.key for kv in own] == [fleet.desired_key("hv1", "vm1")]

            # Writes: its status; alive and conditions on a lease it holds, kept alive, revoked.
            await hv1.put(fleet.status_key("hv1", "vm1"), {"applied_rev": mine, "state": "enforced", "at": 0})
            lease = await hv1.grant(5)
            await hv1.put(fleet.alive_key("hv1"), {"host": "hv1"}, lease=lease.id)
            assert (await hv1.txn([], [store.put_op(fleet.conditions_key("hv1", "vm1"), {}, lease.id)])).succeeded
            assert await hv1.keepalive_once(lease.id) > 0
            await hv1.revoke(lease.id)
            assert await hv1.get(fleet.alive_key("hv1")) is None

            # Refused: its own desired key, hv2's keys of every kind, reading or watching hv2.
            for key in (fleet.desired_key("hv1", "vm1"), fleet.desired_key("hv2", "vm1"),
                        fleet.status_key("hv2", "vm1"), fleet.alive_key("hv2"), fleet.conditions_key("hv2", "vm1"),
                        fleet.skin_key("slow")):
                with refused(f"writing {key}"):
                    await hv1.put(key, "x")
            with refused(f"deleting {fleet.desired_key('hv1', 'vm1')}"):
                await hv1.delete(fleet.desired_key("hv1", "vm1"))
            with refused("a transaction on /netskin/hosts/hv1/status/vm1, /netskin/hosts/hv2/status/vm1"):
                await hv1.txn([], [store.put_op(fleet.status_key("hv1", "vm1"), "x"),
                                   store.put_op(fleet.status_key("hv2", "vm1"), "x")])
            with refused("reading /netskin/hosts/hv2/"):
                await hv1.get_prefix(fleet.host_prefix("hv2"))
            with trio.fail_after(10), refused("watching /netskin/hosts/hv2/"):
                async for _ in hv1.watch(fleet.host_prefix("hv2"), mine):
                    pass
            # Nothing of that landed.
            assert (await hv1.get(fleet.desired_key("hv1", "vm1"))).mod_revision == mine

        async with etcd.store("manager") as manager:
            assert await manager.get(fleet.status_key("hv2", "vm1")) is None
            assert await manager.put(fleet.desired_key("hv2", "vm1"), desired("slow", 2)) > mine
    trio_in_netns(etcd.ns, main)


def test_connections_without_the_fleets_credentials_are_refused(etcd):
    pki = etcd.pki
    hv1 = pki.users["hv1"]
    plain = etcd.local_endpoint.replace("https://", "http://")

    async def attempt(client: store.Store) -> None:
        async with client:
            await client.get(fleet.desired_key("hv1", "vm1"))

    async def main():
        # Plain HTTP to the TLS port, or TLS without a client certificate: no endpoint answers.
        with pytest.raises(store.StoreUnavailable):
            await attempt(store.Store([plain], user="hv1", password=hv1.password))
        with pytest.raises(store.StoreUnavailable):
            await attempt(store.Store([etcd.local_endpoint], ca_file=pki.ca_file, user="hv1", password=hv1.password))
        # The certificate alone names no user; a wrong password is refused.
        with pytest.raises(store.StoreError, match="user name is empty"):
            await attempt(store.Store([etcd.local_endpoint], ca_file=pki.ca_file, cert_file=hv1.cert_file,
                                      key_file=hv1.key_file))
        with pytest.raises(store.StoreError, match="invalid user ID or password"):
            await attempt(store.Store([etcd.local_endpoint], ca_file=pki.ca_file, cert_file=hv1.cert_file,
                                      key_file=hv1.key_file, user="hv1", password="not-the-password"))
        # A client certificate with a CN (etcd's own has one) is refused by the gateway once auth is on.
        with pytest.raises(store.StoreError, match="certificate without CN"):
            await attempt(store.Store([etcd.local_endpoint], ca_file=pki.ca_file, cert_file=pki.server_cert_file,
                                      key_file=pki.server_key_file, user="hv1", password=hv1.password))
    trio_in_netns(etcd.ns, main)


def test_securing_again_adds_a_host_and_keeps_sessions_working(etcd):
    passwords = {**etcd.pki.passwords(), "hv3": "hv3-password"}
    cert = etcd.pki.users["hv1"]  # the connection's certificate; the user is the password's

    async def main():
        async with etcd.store("hv1") as hv1:
            before = await hv1.put(fleet.status_key("hv1", "vm9"), "before")
            async with etcd.store("root") as root:
                await fleet_security.secure_etcd(root, [*HOSTS, "hv3"], passwords)
            # etcd's users and roles changed since hv1's token was issued: it still works.
            assert await hv1.put(fleet.status_key("hv1", "vm9"), "after") > before
        async with store.Store([etcd.local_endpoint], ca_file=etcd.pki.ca_file, cert_file=cert.cert_file,
                               key_file=cert.key_file, user="hv3", password="hv3-password") as hv3:
            await hv3.put(fleet.status_key("hv3", "vm1"), "x")
            with refused(f"writing {fleet.status_key('hv1', 'vm1')}", user="hv3"):
                await hv3.put(fleet.status_key("hv1", "vm1"), "x")
    trio_in_netns(etcd.ns, main)


def test_an_expired_token_is_renewed_for_requests_and_watches():
    skip_without_etcd()
    with Etcd(f"nsksc{secrets.token_hex(3)}", tls=True, auth_hosts=HOSTS, auth_token_ttl_s=1) as etcd:
        async def main():
            async with etcd.store("hv1") as hv1:
                first = await hv1.put(fleet.status_key("hv1", "vm1"), "1")
                token = hv1._token
                await trio.sleep(2.5)
                second = await hv1.put(fleet.status_key("hv1", "vm1"), "2")
                assert hv1._token != token
                await trio.sleep(2.5)  # expired again: the watch is refused once, then opened afresh
                with trio.fail_after(10):
                    async for batch in hv1.watch(fleet.host_prefix("hv1"), first, idle_timeout_s=5):
                        assert [e.kv.mod_revision for e in batch.events] == [first, second]
                        break
        trio_in_netns(etcd.ns, main)


# --- an agent with hv1's credentials -------------------------------------------------------------


def test_agent_with_host_credentials_converges_and_cannot_touch_another_host(lab):
    skip_without_etcd()
    with Etcd(f"nsksa{secrets.token_hex(3)}", peer_ns=lab.hv_ns, tls=True, auth_hosts=HOSTS) as etcd:
        hv1 = etcd.pki.users["hv1"]
        config = lab.config_path.with_name("fleet-secure.toml")
        config.write_text(lab.config_path.read_text() + f"""
[store]
endpoints = ["{etcd.endpoint}"]
host = "hv1"
ca_file = "{etcd.pki.ca_file}"
cert_file = "{hv1.cert_file}"
key_file = "{hv1.key_file}"
user = "hv1"
password_file = "{hv1.password_file}"
""")
        agent = AgentProcess("agent", lab.hv_ns, config, config.with_name("agent.log"), LEASE_TTL_S)
        daemon = DaemonProcess(config)

        def manager_call(method: str, *args):
            async def main():
                async with etcd.store("manager") as manager:
                    return await getattr(manager, method)(*args)
            return trio_in_netns(etcd.ns, main)

        try:
            daemon.start()
            agent.start()
            rev = manager_call("put", fleet.desired_key("hv1", "vm1"), desired("fleet-secure", latency_ms=100))
            wait_for("vm1 enforced by the agent with hv1's credentials",
                     lambda: (kv := manager_call("get", fleet.status_key("hv1", "vm1")))
                     and (st := fleet.Status.decode(kv.value)).applied_rev == rev and st.state == "enforced",
                     log=agent.log)
            assert daemon.status("vm1")["vm1"]["active"] == "fleet-secure"
            wait_for("hv1's alive key on its lease", lambda: manager_call("get", fleet.alive_key("hv1")), log=agent.log)
            wait_for("vm1's conditions on the lease",
                     lambda: manager_call("get", fleet.conditions_key("hv1", "vm1")), log=agent.log)
            wait_for("hv1's VM inventory", lambda: manager_call("get", fleet.inventory_key("hv1")), log=agent.log)
            assert "refused" not in agent.log()

            # The host's own configuration, from the host's namespace: hv2's keys and its own
            # desired keys are out of reach.
            async def as_hv1():
                async with store.Store.from_config(load_host_config(config).store) as hv1_store:
                    for key in (fleet.status_key("hv2", "vm1"), fleet.desired_key("hv2", "vm1"),
                                fleet.desired_key("hv1", "vm1")):
                        with refused(f"writing {key}"):
                            await hv1_store.put(key, "x")
            trio_in_netns(lab.hv_ns, as_hv1)

            # SIGTERM: the agent revokes its lease (it may: it can write every key on it).
            agent.kill(signal.SIGTERM)
            wait_for("the alive key gone with the revoked lease",
                     lambda: manager_call("get", fleet.alive_key("hv1")) is None, timeout=1.5)
            # (The lease had at least 2 s of its 3 s TTL left: the agent refreshes it every second.)
        finally:
            agent.kill()
            daemon.stop()
