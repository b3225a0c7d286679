"""Network identity in the lab: capture, MAC and MTU changes, restore, and proxy-ARP claims.

The identity functions work on the host side in the namespace they run in, as the daemon does
inside the lab's hv namespace; here each call runs in a forked child that entered hv, so the
test process itself never changes namespace. What they did is checked independently with
iproute2 (``ip -j``) and with traffic.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from interceptor import identity
from interceptor.identity import IdentityError, Original
from interceptor.schema import VmConfig
from tests.e2e.netns_helpers import in_netns

pytestmark = pytest.mark.e2e

NEW_MAC = "02:aa:bb:cc:dd:01"


def ip_json(ns: str, *argv: str):
    done = subprocess.run(["ip", "-n", ns, "-j", *argv], capture_output=True, text=True, check=True)
    return json.loads(done.stdout or "[]")


def link(ns: str, ifname: str) -> dict:
    return ip_json(ns, "link", "show", "dev", ifname)[0]


def global_addresses(ns: str, ifname: str) -> set[str]:
    found = set()
    for entry in ip_json(ns, "addr", "show", "dev", ifname):
        for info in entry.get("addr_info", []):
            if info.get("scope") == "global":
                found.add(f"{info['local']}/{info['prefixlen']}")
    return found


def default_routes(ns: str) -> dict[str, str | None]:
    routes = {}
    for family in ("-4", "-6"):
        gateways = [r.get("gateway") for r in ip_json(ns, family, "route", "show", "default")]
        routes[family] = gateways[0] if gateways else None
    return routes


def vm_config(lab, name: str = "vm1", **overrides) -> VmConfig:
    vm = lab.vm(name)
    fields = dict(interface=vm.interface, address=vm.address, address6=vm.address6, netns=vm.netns)
    fields.update(overrides)
    return VmConfig(**fields)


def udp_round_trip(lab, vm: str, target: str, timeout_s: float = 2.0) -> bool:
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    with lab.socket(vm, family) as sock:
        sock.settimeout(timeout_s)
        payload = os.urandom(16)
        sock.sendto(payload, (target, lab.echo_port))
        try:
            return sock.recvfrom(2048)[0] == payload
        except TimeoutError:
            return False


def wait_for(predicate, timeout_s: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)
    return result


# --- capture -----------------------------------------------------------------------------------


def test_capture_reads_the_lab_vm(lab):
    vm = lab.vm("vm1")
    original = in_netns(lab.hv_ns, identity.capture, "vm1", vm_config(lab))
    assert original.address == "10.77.1.2/24"
    assert original.address6 == "fd77:1::2/64"
    assert original.mac == vm.mac
    assert original.mtu == 1500
    assert original.host_mtu == 1500
    assert original.resolvers == (lab.dns_servers[0],)
    assert original.interface == "eth0"
    assert set(original.readable) == set(identity.FIELDS)
    assert original.ipv6.addresses == ("fd77:1::2/64",)
    assert [(r.dst, r.gateway) for r in original.ipv6.routes] == [("::/0", vm.gateway6)]
    assert original.host_ipv6.addresses == ("fd77:1::1/64",)
    # The daemon keeps it as JSON: it must come back equal.
    assert Original.from_json(json.loads(json.dumps(original.to_json()))) == original


def test_capture_without_netns_reads_what_the_host_sees(lab):
    vm = lab.vm("vm1")
    assert udp_round_trip(lab, "vm1", lab.inet_address)  # the hv now has vm1 in its ARP table
    config = vm_config(lab, netns=None)
    original = in_netns(lab.hv_ns, identity.capture, "vm1", config)
    assert original.address == vm.address
    assert original.mac is None  # never from a chance entry of the hv's neighbour table
    assert original.mtu is None and original.host_mtu == 1500  # the guest's own MTU is not visible
    assert original.resolvers == () and original.interface is None
    assert set(original.readable) == {"host_mtu"}
    assert in_netns(lab.hv_ns, identity.read, config) == {"mac": vm.mac, "mtu": None, "host_mtu": 1500}


def test_capture_of_a_missing_namespace_is_a_clear_error(lab):
    config = vm_config(lab, netns=f"{lab.prefix}-nosuch")
    with pytest.raises(IdentityError, match=rf"VM 'vm1': network namespace '{lab.prefix}-nosuch' not found"):
        in_netns(lab.hv_ns, identity.capture, "vm1", config)
    assert f"{lab.prefix}-nosuch" not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                         text=True).stdout


# --- set and restore ------------------------------------------------------------------------------


def test_set_mac_and_mtu_then_restore_exactly(lab):
    vm = lab.vm("vm1")
    config = vm_config(lab)
    original = in_netns(lab.hv_ns, identity.capture, "vm1", config)
    routes_before = default_routes(vm.netns)
    addresses_before = global_addresses(vm.netns, "eth0")
    host_addresses_before = global_addresses(lab.hv_ns, vm.interface)
    assert udp_round_trip(lab, "vm1", lab.inet_address)  # the hv caches vm1's old MAC

    in_netns(lab.hv_ns, identity.set_mac, config, NEW_MAC, vm_name="vm1")
    in_netns(lab.hv_ns, identity.set_mtu, config, 1400, vm_name="vm1")

    assert link(vm.netns, "eth0")["address"] == NEW_MAC
    assert link(vm.netns, "eth0")["mtu"] == 1400
    assert link(lab.hv_ns, vm.interface)["mtu"] == 1400
    assert default_routes(vm.netns) == routes_before
    assert global_addresses(vm.netns, "eth0") == addresses_before
    assert in_netns(lab.hv_ns, identity.read, config, original) == {"mac": NEW_MAC, "mtu": 1400, "host_mtu": 1400}
    # The hv forgot the old MAC, so even traffic the VM did not start reaches it at once rather
    # than after the stale neighbour entry times out (seconds of silence).
    assert lab.exec("hv", ["ping", "-c", "1", "-W", "1", vm.address]).returncode == 0
    assert udp_round_trip(lab, "vm1", lab.inet_address, timeout_s=0.5)
    assert udp_round_trip(lab, "vm1", lab.inet_address6, timeout_s=0.5)

    stored = Original.from_json(json.loads(json.dumps(original.to_json())))
    in_netns(lab.hv_ns, identity.restore, config, stored, vm_name="vm1")

    assert in_netns(lab.hv_ns, identity.read, config, original) == {
        "mac": original.mac, "mtu": original.mtu, "host_mtu": original.host_mtu}
    assert link(vm.netns, "eth0")["address"] == vm.mac
    assert default_routes(vm.netns) == routes_before
    assert global_addresses(vm.netns, "eth0") == addresses_before
    assert global_addresses(lab.hv_ns, vm.interface) == host_addresses_before
    assert in_netns(lab.hv_ns, identity.capture, "vm1", config) == original
    assert udp_round_trip(lab, "vm1", lab.inet_address, timeout_s=0.5)


def test_host_mtu_makes_the_kernel_send_frag_needed(lab):
    vm = lab.vm("vm1")
    config = vm_config(lab)
    in_netns(lab.hv_ns, identity.set_mtu, config, 1300, vm_name="vm1")
    done = lab.exec("inet", ["ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1400", vm.address])
    assert "Frag needed" in done.stdout and "mtu = 1300" in done.stdout, done.stdout
    small = lab.exec("inet", ["ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1200", vm.address])
    assert small.returncode == 0, small.stdout


def test_mtu_below_1280_drops_ipv6_and_restore_brings_it_back(lab):
    vm = lab.vm("vm1")
    config = vm_config(lab)
    original = in_netns(lab.hv_ns, identity.capture, "vm1", config)
    routes_before = default_routes(vm.netns)

    in_netns(lab.hv_ns, identity.set_mtu, config, 1000, vm_name="vm1")
    # The kernel's doing, not ours: IPv6 cannot run below 1280. IPv4 carries on.
    assert global_addresses(vm.netns, "eth0") == {"10.77.1.2/24"}
    assert default_routes(vm.netns)["-6"] is None
    assert udp_round_trip(lab, "vm1", lab.inet_address)

    # A later skin with a larger MTU brings IPv6 back when given the original.
    in_netns(lab.hv_ns, identity.set_mtu, config, 1400, original, vm_name="vm1")
    assert global_addresses(vm.netns, "eth0") == {"10.77.1.2/24", "fd77:1::2/64"}
    assert default_routes(vm.netns) == routes_before
    assert udp_round_trip(lab, "vm1", lab.inet_address6)

    in_netns(lab.hv_ns, identity.set_mtu, config, 600, vm_name="vm1")
    in_netns(lab.hv_ns, identity.restore, config, original, vm_name="vm1")
    assert link(vm.netns, "eth0")["mtu"] == link(lab.hv_ns, vm.interface)["mtu"] == 1500
    assert global_addresses(vm.netns, "eth0") == {"10.77.1.2/24", "fd77:1::2/64"}
    assert global_addresses(lab.hv_ns, vm.interface) == {"10.77.1.1/24", "fd77:1::1/64"}
    assert default_routes(vm.netns) == routes_before
    assert udp_round_trip(lab, "vm1", lab.inet_address6)


def _set_mac_the_slow_way(netns_name: str, mac: str) -> None:
    from pyroute2 import IPRoute

    with IPRoute(netns=netns_name, flags=0) as ipr:
        identity._set_mac_with_link_down(ipr, ipr.link_lookup(ifname="eth0")[0], mac, "VM 'vm1'")


def test_mac_change_with_the_link_down_keeps_addresses_and_routes(lab):
    # veth takes a new MAC while up; a driver that answers EBUSY goes through this path instead.
    vm = lab.vm("vm1")
    routes_before = default_routes(vm.netns)
    addresses_before = global_addresses(vm.netns, "eth0")
    _set_mac_the_slow_way(vm.netns, NEW_MAC)
    assert link(vm.netns, "eth0")["address"] == NEW_MAC
    assert default_routes(vm.netns) == routes_before
    assert global_addresses(vm.netns, "eth0") == addresses_before
    wait_for(lambda: udp_round_trip(lab, "vm1", lab.inet_address, timeout_s=0.5), what="IPv4 echo")
    wait_for(lambda: udp_round_trip(lab, "vm1", lab.inet_address6, timeout_s=0.5), what="IPv6 echo")


def test_vm_without_netns_cannot_have_its_mac_set(lab):
    config = vm_config(lab, netns=None)
    with pytest.raises(IdentityError) as caught:
        in_netns(lab.hv_ns, identity.set_mac, config, NEW_MAC, vm_name="web1")
    assert str(caught.value) == "VM 'web1' has no netns in the host config: the host cannot set its MAC"
    # Its MTU is still the host side's to set.
    in_netns(lab.hv_ns, identity.set_mtu, config, 1400, vm_name="web1")
    assert link(lab.hv_ns, config.interface)["mtu"] == 1400
    assert link(lab.vm("vm1").netns, "eth0")["mtu"] == 1500


def test_bad_mtu_is_an_identity_error_and_leaves_both_ends_alone(lab):
    vm = lab.vm("vm1")
    with pytest.raises(IdentityError, match=r"VM 'vm1': could not set MTU 70000 on eth0"):
        in_netns(lab.hv_ns, identity.set_mtu, vm_config(lab), 70000, vm_name="vm1")
    assert link(vm.netns, "eth0")["mtu"] == link(lab.hv_ns, vm.interface)["mtu"] == 1500


def test_missing_host_interface_is_a_clear_error(lab):
    config = vm_config(lab, interface="tap-nosuch")
    with pytest.raises(IdentityError, match=r"host-side interface 'tap-nosuch' not found"):
        in_netns(lab.hv_ns, identity.set_mtu, config, 1400, vm_name="vm1")


# --- claiming skin addresses ------------------------------------------------------------------


def proxy_entries(ns: str) -> set[tuple[str, str]]:
    return {(e["dst"], e["dev"]) for e in ip_json(ns, "neigh", "show", "proxy")}


def host_routes_to(ns: str, address: str) -> list[dict]:
    return ip_json(ns, "-4", "route", "show", "exact", f"{address}/32")


def test_claim_and_release_an_address_on_a_connected_subnet(lab):
    config = vm_config(lab)
    skin = "10.77.0.50"  # inside up0's 10.77.0.0/24: the inet namespace ARPs for it
    claimed = in_netns(lab.hv_ns, identity.claim_address, skin, config, vm_name="vm1")
    assert claimed == {"address": skin, "route_interface": "tap-vm1", "proxy_interfaces": ["up0"]}
    assert proxy_entries(lab.hv_ns) == {(skin, "up0")}
    assert [r["dev"] for r in host_routes_to(lab.hv_ns, skin)] == ["tap-vm1"]

    assert in_netns(lab.hv_ns, identity.claim_address, skin, config, vm_name="vm1") == claimed  # idempotent
    assert proxy_entries(lab.hv_ns) == {(skin, "up0")}
    assert len(host_routes_to(lab.hv_ns, skin)) == 1

    # Proxy ARP really answers: the inet namespace learns the hv's up0 MAC for the skin address.
    up0_mac = link(lab.hv_ns, "up0")["address"]

    def inet_knows_skin_address():
        with lab.socket("inet") as sock:
            sock.sendto(b"arp?", (skin, 9))
        return any(e.get("lladdr") == up0_mac for e in ip_json(lab.inet_ns, "neigh", "show", skin))

    wait_for(inet_knows_skin_address, timeout_s=5, what="proxy ARP reply for the skin address")

    released = in_netns(lab.hv_ns, identity.release_address, skin, config, vm_name="vm1")
    assert released == claimed
    assert proxy_entries(lab.hv_ns) == set()
    assert host_routes_to(lab.hv_ns, skin) == []
    assert in_netns(lab.hv_ns, identity.release_address, skin, config, vm_name="vm1") == {}


def test_a_routed_skin_address_needs_no_claim(lab):
    # The inet namespace routes all of 10.77.0.0/16 to the hv: nobody ARPs for 10.77.100.1.
    claimed = in_netns(lab.hv_ns, identity.claim_address, "10.77.100.1", vm_config(lab), vm_name="vm1")
    assert claimed == {}
    assert proxy_entries(lab.hv_ns) == set()
    assert host_routes_to(lab.hv_ns, "10.77.100.1") == []


def test_claiming_the_hosts_own_address_is_refused(lab):
    with pytest.raises(IdentityError, match=r"10\.77\.0\.1 is the host's own address on up0"):
        in_netns(lab.hv_ns, identity.claim_address, "10.77.0.1", vm_config(lab), vm_name="vm1")
