"""The daemon's NAT rules in the lab's hv namespace: skin addresses, DNS redirection, ownership.

``install_nat`` and friends act on the namespace they run in (the daemon runs inside hv), so each
call runs in a forked child that entered hv; the test process never changes namespace. Effects
are checked with traffic between the lab's namespaces and with ``iptables-save``.
"""

from __future__ import annotations

import os
import socket

import pytest

from interceptor import nat
from interceptor.nat import NatPlan
from tests.e2e.netns_helpers import in_netns

pytestmark = pytest.mark.e2e

SKIN_ADDRESS = "10.77.100.1"
PORT = 9100  # a receiver of our own in the inet namespace reports the peer address it sees


@pytest.fixture
def hv(lab):
    """The lab, with whatever NAT the test installs removed again from its hv namespace."""
    yield lab
    in_netns(lab.hv_ns, nat.remove_nat)


def plan(lab, vm="vm1", **kwargs) -> NatPlan:
    v = lab.vm(vm)
    return NatPlan(vm=vm, interface=v.interface, address=v.address, address6=v.address6, **kwargs)


def nat_table(lab, tool="iptables-save") -> str:
    return lab.exec("hv", [tool, "-t", "nat"], check=True).stdout


def our_lines(lab, tool="iptables-save") -> list[str]:
    return [line for line in nat_table(lab, tool).splitlines() if "NETSKIN" in line or "netskin" in line]


def seen_from(lab, vm_sock: socket.socket, receiver: socket.socket) -> str:
    """Send one datagram from the VM to the receiver; the source address the receiver saw.

    The receiver answers, and the answer must reach the VM from the address it sent to.
    """
    payload = os.urandom(8)
    vm_sock.sendto(payload, (lab.inet_address, PORT))
    data, peer = receiver.recvfrom(2048)
    assert data == payload
    receiver.sendto(data[::-1], peer)
    answer, source = vm_sock.recvfrom(2048)
    assert (answer, source) == (payload[::-1], (lab.inet_address, PORT))
    return peer[0]


@pytest.fixture
def sockets(lab):
    """(vm1 socket, receiver in inet on inet_address:PORT), both with a timeout."""
    receiver = lab.socket("inet")
    receiver.bind((lab.inet_address, PORT))
    vm_sock = lab.socket("vm1")
    for sock in (receiver, vm_sock):
        sock.settimeout(3)
    yield vm_sock, receiver
    vm_sock.close()
    receiver.close()


def test_skin_address_is_what_peers_see_and_replies_reach_the_vm(hv, sockets):
    lab = hv
    vm_sock, receiver = sockets
    assert seen_from(lab, vm_sock, receiver) == lab.vm("vm1").address
    in_netns(lab.hv_ns, nat.install_nat, [plan(lab, ip_address=SKIN_ADDRESS)])
    with lab.socket("vm1") as fresh:  # a new flow: NAT applies from its first packet
        fresh.settimeout(3)
        assert seen_from(lab, fresh, receiver) == SKIN_ADDRESS
    # vm2 is "any device other than" vm1's: it sees the skin address too.
    with lab.socket("vm2") as vm2_sock, lab.socket("vm1") as vm1_sock:
        vm2_sock.settimeout(3)
        vm2_sock.bind((lab.vm("vm2").address, PORT))
        vm1_sock.sendto(b"hi", (lab.vm("vm2").address, PORT))
        assert vm2_sock.recvfrom(64) == (b"hi", (SKIN_ADDRESS, vm1_sock.getsockname()[1]))


def test_connections_to_the_skin_address_reach_the_vm(hv):
    lab = hv
    vm = lab.vm("vm1")
    in_netns(lab.hv_ns, nat.install_nat, [plan(lab, ip_address=SKIN_ADDRESS)])
    with lab.socket("vm1") as vm_sock, lab.socket("inet") as peer, lab.socket("hv") as host:
        for sock in (vm_sock, peer, host):
            sock.settimeout(3)
        vm_sock.bind(("0.0.0.0", PORT))
        # From a peer (PREROUTING) ...
        peer.sendto(b"from inet", (SKIN_ADDRESS, PORT))
        data, source = vm_sock.recvfrom(64)
        assert (data, source[0]) == (b"from inet", lab.inet_address)
        vm_sock.sendto(b"back", source)
        assert peer.recvfrom(64) == (b"back", (SKIN_ADDRESS, PORT))
        # ... and from the host itself (OUTPUT). The lab's hv has no default route, so give the
        # skin address one that points elsewhere: the DNAT must re-route it to the VM.
        lab.exec("hv", ["ip", "route", "add", f"{SKIN_ADDRESS}/32", "via", lab.inet_address], check=True)
        host.sendto(b"from host", (SKIN_ADDRESS, PORT))
        data, source = vm_sock.recvfrom(64)
        assert data == b"from host"
        vm_sock.sendto(b"back", source)
        assert host.recvfrom(64) == (b"back", (SKIN_ADDRESS, PORT))
    # Both flows were opened towards the VM: flush_conntrack finds them by their reply source.
    assert in_netns(lab.hv_ns, nat.flush_conntrack, vm.address) == 2


@pytest.mark.parametrize("server", ["10.77.0.2", "fd77::2"])
@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_dns_queries_are_answered_by_the_skin_server(hv, server, transport):
    lab = hv
    dig = ["dig", "+time=2", "+tries=1", transport, f"@{server}", "www.example.test"]
    before = lab.exec("vm1", dig, check=True).stdout
    assert "192.0.2.10" in before  # the primary answers when nothing redirects
    in_netns(lab.hv_ns, nat.install_nat,
             [plan(lab, ip_address=SKIN_ADDRESS, dns4="10.77.0.3", dns6="fd77::3")])
    after = lab.exec("vm1", dig, check=True).stdout
    answers = [line.split()[-1] for line in after.split(";; ANSWER SECTION:")[1].strip().splitlines()
               if line and not line.startswith(";")]
    assert answers == ["192.0.2.99"], after  # the secondary's answer ...
    assert f";; SERVER: {server}#53({server})" in after  # ... from the server the VM asked
    # vm2 has no DNS redirect.
    assert "192.0.2.10" in lab.exec("vm2", dig, check=True).stdout


def test_remove_nat_leaves_nothing(hv):
    lab = hv
    in_netns(lab.hv_ns, nat.install_nat, [plan(lab, ip_address=SKIN_ADDRESS, dns4="10.77.0.3", dns6="fd77::3")])
    assert our_lines(lab) and our_lines(lab, "ip6tables-save")
    assert in_netns(lab.hv_ns, nat.remove_nat) is True
    assert our_lines(lab) == []
    assert our_lines(lab, "ip6tables-save") == []
    assert in_netns(lab.hv_ns, nat.remove_nat) is False
    done = lab.exec("vm1", ["dig", "+short", "+time=2", "+tries=1", "@10.77.0.2", "www.example.test"], check=True)
    assert done.stdout.split() == ["192.0.2.10"]


def test_install_replaces_leftovers_and_keeps_other_rules(hv):
    lab = hv
    other = ["-A", "POSTROUTING", "-o", "up0", "-m", "comment", "--comment", "someone-else", "-j", "RETURN"]
    lab.exec("hv", ["iptables", "-t", "nat", *other], check=True)

    first = [plan(lab, ip_address=SKIN_ADDRESS, dns4="10.77.0.3")]
    in_netns(lab.hv_ns, nat.install_nat, first)
    once = our_lines(lab)
    in_netns(lab.hv_ns, nat.install_nat, first)
    assert our_lines(lab) == once  # idempotent: no duplicate jumps or rules

    # A crashed run's duplicate jump and a stale rule in our chain are both gone after install.
    lab.exec("hv", ["iptables", "-t", "nat", "-A", "PREROUTING", "-m", "comment", "--comment", "netskin",
                    "-j", "NETSKIN-PRE"], check=True)
    lab.exec("hv", ["iptables", "-t", "nat", "-A", "NETSKIN-POST", "-j", "RETURN"], check=True)
    second = [plan(lab, "vm2", ip_address="10.77.100.2")]
    in_netns(lab.hv_ns, nat.install_nat, second)
    lines = our_lines(lab)
    for hook, chain in nat.CHAINS.items():
        assert [line for line in lines if line.startswith(f"-A {hook} ")] == [
            f"-A {hook} -m comment --comment netskin -j {chain}"]
    rules = [line for line in lines if line.startswith("-A NETSKIN-")]
    assert sorted(rules) == sorted([
        "-A NETSKIN-OUT -d 10.77.100.2/32 -m comment --comment netskin -j DNAT --to-destination 10.77.2.2",
        "-A NETSKIN-POST -s 10.77.2.2/32 ! -o tap-vm2 -m comment --comment netskin -j SNAT --to-source 10.77.100.2",
        "-A NETSKIN-PRE -d 10.77.100.2/32 ! -i tap-vm2 -m comment --comment netskin -j DNAT --to-destination 10.77.2.2",
    ])
    # Our jumps come first, so our SNAT wins over a MASQUERADE someone else put in POSTROUTING.
    postrouting = [line for line in nat_table(lab).splitlines() if line.startswith("-A POSTROUTING")]
    assert postrouting[0].endswith("-j NETSKIN-POST")
    assert in_netns(lab.hv_ns, nat.remove_nat) is True
    assert "--comment someone-else" in nat_table(lab)
    lab.exec("hv", ["iptables", "-t", "nat", "-D", *other[1:]], check=True)


def test_flush_conntrack_makes_a_new_skin_address_apply_to_an_existing_flow(hv, sockets):
    lab = hv
    vm_sock, receiver = sockets
    # Any NAT rule turns conntrack on in the namespace (empty nat chains do not, under nft): from
    # here on the flow is tracked from its first packet, with no address translation.
    in_netns(lab.hv_ns, nat.install_nat, [plan(lab, dns4="10.77.0.3")])
    assert seen_from(lab, vm_sock, receiver) == lab.vm("vm1").address
    in_netns(lab.hv_ns, nat.install_nat, [plan(lab, ip_address=SKIN_ADDRESS)])
    # NAT is decided on a flow's first packet: the old flow keeps the VM's own address ...
    assert seen_from(lab, vm_sock, receiver) == lab.vm("vm1").address
    assert in_netns(lab.hv_ns, nat.flush_conntrack, lab.vm("vm1").address) >= 1
    # ... until its conntrack entry is gone.
    assert seen_from(lab, vm_sock, receiver) == SKIN_ADDRESS
    # IPv6 entries are flushed the same way.
    in_netns(lab.hv_ns, nat.install_nat, [plan(lab, dns6="fd77::3")])
    lab.exec("vm1", ["dig", "+time=2", "+tries=1", "@fd77::2", "www.example.test"], check=True)
    assert in_netns(lab.hv_ns, nat.flush_conntrack, lab.vm("vm1").address6) >= 1
    assert in_netns(lab.hv_ns, nat.flush_conntrack, lab.vm("vm1").address6) == 0


def test_bad_plans_are_refused_before_touching_iptables():
    with pytest.raises(ValueError, match="ip_address 'x; rm' is not an IPv4Address"):
        NatPlan(vm="vm1", interface="tap-vm1", address="10.77.1.2", ip_address="x; rm")
    with pytest.raises(ValueError, match="not an interface name"):
        NatPlan(vm="vm1", interface="tap vm1", address="10.77.1.2")
    twice = [NatPlan(vm=f"vm{i}", interface=f"tap-vm{i}", address=f"10.77.{i}.2", ip_address=SKIN_ADDRESS)
             for i in (1, 2)]
    with pytest.raises(ValueError, match="same skin ip_address"):
        nat.render(twice, socket.AF_INET, [])
