"""The iptables-restore text netskin renders: steering, per-VM firewall chains, leftovers, counters.

Pure functions only; tests/e2e/test_rules_e2e.py feeds the same text to the kernel.
"""

from __future__ import annotations

import re
import sys

import pytest

from interceptor import firewall, rules
from interceptor.profiles import compile_profile, load_profile, profile_dirs, validate_profile

IN, OUT = firewall.chain_names("vm1")


def shipped(name: str):
    return load_profile(name, profile_dirs(None))


def profile(name: str = "test", **document):
    document.setdefault("default_in", "drop")
    document.setdefault("default_out", "allow")
    return compile_profile(validate_profile(document), name)


def vm(name: str = "vm1", profile=None, interface: str | None = None, index: int = 1) -> rules.VmRules:
    return rules.VmRules(name, interface or f"tap-{name}", 7700 + 2 * index, 7701 + 2 * index, profile)


def section(text: str, table: str) -> list[str]:
    """The lines of one table's section of restore input, without the header and COMMIT."""
    match = re.search(rf"^\*{table}\n(.*?)^COMMIT$", text, re.S | re.M)
    return match[1].splitlines() if match else []


def chain(text: str, name: str) -> list[str]:
    """The rule specs appended to one chain."""
    return [line.split(None, 2)[2] for line in section(text, "filter") if line.startswith(f"-A {name} ")]


ESTABLISHED = '-m conntrack --ctstate ESTABLISHED,RELATED -m comment --comment "netskin established" -j RETURN'


# --- steering ---------------------------------------------------------------------------------


def test_steering_is_uplink_in_prerouting_and_downlink_in_postrouting():
    text = rules.render_install("", [vm()], fail_open=False, version=4)
    mangle = section(text, "mangle")
    up = '-m comment --comment "netskin vm=vm1 uplink" -j NFQUEUE --queue-num 7702'
    down = '-m comment --comment "netskin vm=vm1 downlink" -j NFQUEUE --queue-num 7703'
    assert mangle == [
        ":NETSKIN-UP - [0:0]",
        ":NETSKIN-DOWN - [0:0]",
        ":NETSKIN-UP-PORTS - [0:0]",
        ":NETSKIN-DOWN-PORTS - [0:0]",
        ":NETSKIN-SEEN - [0:0]",
        # A bridge port's packet passes PREROUTING twice when the queue cut a GSO packet: once only.
        '-A NETSKIN-UP -m mark --mark 0x100000/0x100000 -m comment --comment "netskin queued already" -j RETURN',
        "-A NETSKIN-SEEN -m mark --mark 0x100000/0x100000 -j MARK --set-xmark 0x0/0x100000",
        f"-A NETSKIN-UP -i tap-vm1 {up}",
        '-A NETSKIN-UP -m physdev --physdev-is-in -m comment --comment "netskin" -j NETSKIN-UP-PORTS',
        "-A NETSKIN-UP-PORTS -m physdev --physdev-in tap-vm1 -j MARK --set-xmark 0x100000/0x100000",
        f"-A NETSKIN-UP-PORTS -m physdev --physdev-in tap-vm1 {up}",  # bridged or routed from a bridge port
        f"-A NETSKIN-DOWN -o tap-vm1 {down}",
        '-A NETSKIN-DOWN -m set --match-set netskin-7703-v4 dst,dst '
        '-m comment --comment "netskin downlink routed onto a bridge" -j NFQUEUE --queue-num 7703',
        '-A NETSKIN-DOWN -m physdev --physdev-is-bridged -m comment --comment "netskin" -j NETSKIN-DOWN-PORTS',
        f"-A NETSKIN-DOWN-PORTS -m physdev --physdev-out tap-vm1 --physdev-is-bridged {down}",
        '-A PREROUTING -m comment --comment "netskin" -j NETSKIN-UP',
        '-A POSTROUTING -m comment --comment "netskin" -j NETSKIN-DOWN',
        '-I FORWARD 1 -m comment --comment "netskin" -j NETSKIN-SEEN',  # clears the bit after routing
        '-I INPUT 1 -m comment --comment "netskin" -j NETSKIN-SEEN',
    ]


def test_the_steering_mark_is_one_configurable_bit_used_only_in_mangle():
    text = rules.render_install("", [vm(profile=shipped("restricted"))], fail_open=False, version=4, mark=0x40)
    marks = [line for line in text.splitlines() if "mark" in line.lower()]
    assert marks and all("0x40/0x40" in line or "0x0/0x40" in line for line in marks)
    assert not any("mark" in line.lower() for line in section(text, "filter"))


def walk(mangle: list[str], chain: str, device: str) -> tuple[int, str | None]:
    """(rules a packet from ``device`` walks from ``chain``, the VM whose uplink queue takes it)."""
    walked = 0
    for line in mangle:
        if not line.startswith(f"-A {chain} -i "):
            continue
        walked += 1
        name = line.split()[3]
        if name.endswith("+") and device.startswith(name[:-1]):
            below, vm_name = walk(mangle, line.split()[-1], device)
            walked += below
            if vm_name:
                return walked, vm_name
        elif name == device:
            return walked, re.search(r"vm=(\S+)", line)[1]
    return walked, None


@pytest.mark.parametrize("names", [
    [f"tap{i}" for i in range(500)],
    [f"idle{i}" for i in range(499)] + ["tap-vm1"],
    [f"vnet{i}" for i in range(0, 5000, 7)] + ["tap", "tap0", "tap01", "x"],
])
def test_every_vm_is_found_by_walking_a_few_rules_whatever_their_number(names):
    many = [rules.VmRules(f"vm-{name}", name, 7700, 7701) for name in names]
    mangle = section(rules.render_install("", many, fail_open=True, version=4), "mangle")
    worst = 0
    for name in names:
        walked, found = walk(mangle, "NETSKIN-UP", name)
        assert found == f"vm-{name}"
        worst = max(worst, walked)
    assert worst <= 40, worst  # one VM: 1; 500 VMs in a line: 500
    assert walk(mangle, "NETSKIN-UP", "eth0") == (walk(mangle, "NETSKIN-UP", "eth0")[0], None)
    assert walk(mangle, "NETSKIN-UP", "tap9999")[1] is None


@pytest.mark.parametrize("version, address", [(4, "10.77.100.2/32"), (6, "fd77:100::2/128")])
def test_the_set_holds_a_bridge_ports_address_on_its_bridge(version, address):
    port = rules.VmRules("vm1", "tap-vm1", 7700, 7701, bridge="br0", address="10.77.100.2",
                         address6="fd77:100::2")
    routed = rules.VmRules("vm2", "tap-vm2", 7700, 7701, address="10.77.2.2")
    assert rules.set_entries([port, routed], 7701, version) == [f"{address},br0"]
    assert rules.set_entries([port, routed], 7700, version) == []


def test_the_sets_are_filled_under_a_temporary_name_and_swapped_in():
    port = rules.VmRules("vm1", "tap-vm1", 7700, 7701, bridge="br0", address="10.77.100.2")
    lines = rules.render_sets([port], [4, 6]).splitlines()
    assert rules.set_names([port], [4, 6]) == ["netskin-7701-v4", "netskin-7701-v6"]
    first = lines[: lines.index("destroy netskin-7701-v4-new") + 1]
    assert first[0].startswith("create netskin-7701-v4-new hash:net,iface family inet ")
    assert first[1:3] == ["flush netskin-7701-v4-new", "add netskin-7701-v4-new 10.77.100.2/32,br0"]
    assert first[3].startswith("create netskin-7701-v4 hash:net,iface family inet ") and first[3].endswith("-exist")
    assert first[4:] == ["swap netskin-7701-v4-new netskin-7701-v4", "destroy netskin-7701-v4-new"]
    assert "family inet6" in lines[len(first)]
    assert rules.render_sets([], [4, 6]) == ""


def test_each_direction_goes_to_its_own_queue_and_each_downlink_queue_has_one_set():
    """VMs split over the per-segment pair (7700/7701) and the GSO pair (7702/7703), per direction."""
    vms = [rules.VmRules("a", "tap-a", 7700, 7701, bridge="br0", address="10.0.0.2"),
           rules.VmRules("b", "tap-b", 7702, 7701, bridge="br0", address="10.0.0.3"),
           rules.VmRules("c", "tap-c", 7702, 7703, bridge="br0", address="10.0.0.4")]
    assert rules.set_names(vms, [4]) == ["netskin-7701-v4", "netskin-7703-v4"]
    sets = rules.render_sets(vms, [4])
    assert sets.count("create netskin-7701-v4 ") == 1 and sets.count("create netskin-7703-v4 ") == 1
    assert rules.set_entries(vms, 7701, 4) == ["10.0.0.2/32,br0", "10.0.0.3/32,br0"]
    assert rules.set_entries(vms, 7703, 4) == ["10.0.0.4/32,br0"]
    mangle = section(rules.render_install("", vms, fail_open=False, version=4), "mangle")
    for name, up, down in (("a", 7700, 7701), ("b", 7702, 7701), ("c", 7702, 7703)):
        assert any(f"vm={name} uplink\" -j NFQUEUE --queue-num {up}" in line for line in mangle)
        assert any(f"vm={name} downlink\" -j NFQUEUE --queue-num {down}" in line for line in mangle)
    by_set = [line for line in mangle if "--match-set" in line]
    assert len(by_set) == 2 and by_set[0].endswith("--queue-num 7701") and by_set[1].endswith("--queue-num 7703")


def test_reinstalling_with_fewer_vms_deletes_the_tree_chains_no_longer_needed():
    many = [rules.VmRules(f"vm{i}", f"tap{i}", 7700, 7701) for i in range(30)]
    saved = _as_saved(rules.render_install("", many, fail_open=True, version=4))
    text = rules.render_install(saved, many[:1], fail_open=True, version=4)
    mangle = section(text, "mangle")
    deleted = {line[3:] for line in mangle if line.startswith("-X ")}
    assert deleted and all(chain.startswith("NETSKIN-T") for chain in deleted)
    removed = section(rules.render_remove(saved), "mangle")
    assert {line[3:] for line in removed if line.startswith("-X ")} >= deleted | {"NETSKIN-UP", "NETSKIN-DOWN"}


@pytest.mark.parametrize("version, address", [(4, "10.77.100.2/32"), (6, "fd77:100::2/128")])
def test_a_bridge_port_also_gets_what_the_host_routes_onto_its_bridge(version, address):
    port = rules.VmRules("vm1", "tap-vm1", 7702, 7703, profile=shipped("restricted"), bridge="br0",
                         address="10.77.100.2", address6="fd77:100::2")
    text = rules.render_install("", [port], fail_open=False, version=version)
    assert rules.set_entries([port], 7703, version) == [f"{address},br0"]  # steered by the set
    tag = '-m comment --comment "netskin vm=vm1 profile=restricted"'
    assert f"-A NETSKIN -o br0 -d {address} {tag} -j {IN}" in section(text, "filter")


def test_fail_open_adds_queue_bypass_to_every_queue_rule():
    text = rules.render_install("", [vm(), vm("vm2", index=2)], fail_open=True, version=6)
    queue_rules = [line for line in section(text, "mangle") if "NFQUEUE" in line]
    assert len(queue_rules) == 4 * 2 + 2  # four trees of two VMs, and a set rule per downlink queue
    assert all(line.endswith("--queue-bypass") for line in queue_rules)


@pytest.mark.parametrize("version", [4, 6])
def test_no_accept_anywhere_and_no_marks_in_the_firewall(version):
    vms = [vm(profile=shipped("restricted")), vm("vm2", index=2, profile=profile(default_in="reject"))]
    text = rules.render_install("", vms, fail_open=True, version=version)
    assert "mark" not in "\n".join(section(text, "filter")).lower()
    assert "-j ACCEPT" not in text


def test_a_vm_without_profile_has_no_filter_rules():
    text = rules.render_install("", [vm(), vm("vm2", index=2)], fail_open=False, version=4)
    assert section(text, "filter") == []
    text = rules.render_install("", [vm(), vm("vm2", index=2, profile=shipped("open"))], fail_open=False, version=4)
    assert "tap-vm1" not in "\n".join(section(text, "filter"))


# --- firewall chains from the shipped profiles ----------------------------------------------------


def test_restricted_renders_established_ssh_then_drop():
    text = rules.render_install("", [vm(profile=shipped("restricted"))], fail_open=False, version=4)
    assert chain(text, IN) == [
        ESTABLISHED,
        '-p tcp --dport 22 -m comment --comment "netskin rule 1: in tcp 22 any → allow" -j RETURN',
        '-m comment --comment "netskin default in: drop" -j DROP',
    ]
    assert chain(text, OUT) == [ESTABLISHED, '-m comment --comment "netskin default out: allow" -j RETURN']


def test_restricted_in_ip6tables_lets_neighbour_discovery_pass_first():
    text = rules.render_install("", [vm(profile=shipped("restricted"))], fail_open=False, version=6)
    for name in (IN, OUT):
        specs = chain(text, name)
        assert specs[0] == ESTABLISHED
        assert [re.search(r"--icmpv6-type (\d+)", s)[1] for s in specs[1:6]] == ["133", "134", "135", "136", "137"]
        assert all(s.startswith("-p ipv6-icmp -m icmp6") and s.endswith("-j RETURN") for s in specs[1:6])


def test_standard_uses_one_multiport_rule():
    text = rules.render_install("", [vm(profile=shipped("standard"))], fail_open=False, version=4)
    assert chain(text, IN)[1] == (
        '-p tcp -m multiport --dports 22,80,443 -m comment --comment "netskin rule 1: in tcp 22,80,443 any → allow" -j RETURN'
    )


def test_open_returns_everything():
    text = rules.render_install("", [vm(profile=shipped("open"))], fail_open=False, version=4)
    assert chain(text, IN) == [ESTABLISHED, '-m comment --comment "netskin default in: allow" -j RETURN']


def test_jumps_name_vm_and_profile_and_sit_at_position_one():
    text = rules.render_install("", [vm(profile=shipped("standard"))], fail_open=False, version=4)
    filter_ = section(text, "filter")
    tag = '-m comment --comment "netskin vm=vm1 profile=standard"'
    assert [line for line in filter_ if line.startswith("-A NETSKIN")] == [
        f"-A NETSKIN -i tap-vm1 {tag} -j {OUT}",
        f"-A NETSKIN -o tap-vm1 {tag} -j {IN}",
        '-A NETSKIN -m physdev --physdev-is-in -m comment --comment "netskin" -j NETSKIN-FROM-PORTS',
        f"-A NETSKIN-FROM-PORTS -m physdev --physdev-in tap-vm1 {tag} -j {OUT}",
        '-A NETSKIN -m physdev --physdev-is-bridged -m comment --comment "netskin" -j NETSKIN-TO-PORTS',
        f"-A NETSKIN-TO-PORTS -m physdev --physdev-out tap-vm1 --physdev-is-bridged {tag} -j {IN}",
    ]
    assert filter_[-3:] == [f'-I {hook} 1 -m comment --comment "netskin" -j NETSKIN' for hook in ("FORWARD", "INPUT", "OUTPUT")]


def judge(filter_: list[str], chain: str, packet: dict) -> tuple[int, list[str]]:
    """(rules ``packet`` walks from ``chain`` in filter, the firewall chains it is sent to, in
    order); ``packet`` holds its devices ("-i", "-o", "--physdev-in", "--physdev-out") and
    flags ("--physdev-is-in", "--physdev-is-bridged"). Every firewall chain RETURNs."""
    walked, judged = 0, []
    for line in filter_:
        if not line.startswith(f"-A {chain} "):
            continue
        walked += 1
        tokens = line.split()
        matches = True
        for i, token in enumerate(tokens):
            if token in ("-i", "-o", "--physdev-in", "--physdev-out"):
                name, device = tokens[i + 1], packet.get(token, "")
                matches &= device.startswith(name[:-1]) if name.endswith("+") else device == name
            elif token in ("--physdev-is-in", "--physdev-is-bridged", "-d"):
                matches &= bool(packet.get(token))
        if not matches:
            continue
        target = tokens[-1]
        if firewall.is_firewall_chain(target):
            judged.append(target)
        else:
            below, more = judge(filter_, target, packet)
            walked, judged = walked + below, judged + more
    return walked, judged


@pytest.mark.parametrize("count", [1, 500])
def test_every_profiled_vm_is_judged_after_walking_a_few_rules_whatever_their_number(count):
    many = [rules.VmRules(f"vm{i}", f"tap{i}", 7700, 7701, profile("test")) for i in range(count)]
    filter_ = section(rules.render_install("", many, fail_open=False, version=4), "filter")
    worst = 0
    for i in range(count):
        out_, in_ = firewall.chain_names(f"vm{i}")[1], firewall.chain_names(f"vm{(i + 1) % count}")[0]
        routed = {"-i": f"tap{i}", "-o": "eth0"}
        walked, judged = judge(filter_, "NETSKIN", routed)
        assert judged == [out_]
        worst = max(worst, walked)
        between = {"-i": f"tap{i}", "-o": f"tap{(i + 1) % count}"}
        walked, judged = judge(filter_, "NETSKIN", between)
        assert judged == [out_, in_]
        worst = max(worst, walked)
        bridged = {"-i": "br0", "-o": "br0", "--physdev-in": f"tap{i}", "--physdev-out": f"tap{(i + 1) % count}",
                   "--physdev-is-in": True, "--physdev-is-bridged": True}
        walked, judged = judge(filter_, "NETSKIN", bridged)
        assert judged == [out_, in_]
        worst = max(worst, walked)
    assert worst <= 100, worst  # up to four trees of about 20 rules each; 500 VMs in a line: 2000 rules
    assert judge(filter_, "NETSKIN", {"-i": "eth0", "-o": "eth1"})[1] == []
    assert judge(filter_, "NETSKIN", {"-i": "tap9999", "-o": "eth1"})[1] == []


def test_chain_names_are_short_stable_and_distinct():
    names = {firewall.chain_names(f"vm-{i}") for i in range(500)}
    assert len(names) == 500
    long_name = "v" * 64
    assert all(len(name) <= 28 for name in firewall.chain_names(long_name))
    assert firewall.chain_names("web1") == firewall.chain_names("web1")


# --- rule translation -------------------------------------------------------------------------


def _multiport_slots(spec: str) -> int:
    ports = re.search(r"--dports (\S+)", spec)[1].split(",")
    return sum(2 if ":" in port else 1 for port in ports)


def test_more_than_fifteen_ports_split_into_blocks_that_cover_them_all():
    ports = list(range(1000, 1012)) + ["2000-2010", "3000-3005", 4000, "5000-5001", 6000, 7000]
    p = profile(rules=[{"direction": "in", "proto": "udp", "ports": ports, "action": "allow"}])
    specs = [s for s in chain(rules.render_install("", [vm(profile=p)], False, 4), IN) if "rule 1" in s]
    assert len(specs) > 1
    assert all(_multiport_slots(s) <= 15 for s in specs)
    covered = []
    for spec in specs:
        assert spec.startswith("-p udp -m multiport --dports ")
        covered += re.search(r"--dports (\S+)", spec)[1].split(",")
    assert covered == [str(p) for p in range(1000, 1012)] + ["2000:2010", "3000:3005", "4000", "5000:5001", "6000", "7000"]


def test_a_single_range_needs_no_multiport():
    p = profile(rules=[{"direction": "out", "proto": "tcp", "ports": ["8000-8100"], "action": "drop"}])
    assert chain(rules.render_install("", [vm(profile=p)], False, 4), OUT)[1] == (
        '-p tcp --dport 8000:8100 -m comment --comment "netskin rule 1: out tcp 8000-8100 any → drop" -j DROP'
    )


def test_cidr_is_the_remote_peer_and_lives_only_in_its_family():
    p = profile(rules=[
        {"direction": "in", "proto": "tcp", "ports": [22], "cidr": "192.0.2.0/24", "action": "allow"},
        {"direction": "out", "proto": "any", "cidr": "2001:db8::/32", "action": "drop"},
    ])
    v4 = rules.render_install("", [vm(profile=p)], False, 4)
    v6 = rules.render_install("", [vm(profile=p)], False, 6)
    assert chain(v4, IN)[1].startswith("-s 192.0.2.0/24 -p tcp --dport 22 ")
    assert not any("rule 2" in s for s in chain(v4, OUT))
    assert not any("rule 1" in s for s in chain(v6, IN))
    assert [s for s in chain(v6, OUT) if "rule 2" in s] == [
        '-d 2001:db8::/32 -m comment --comment "netskin rule 2: out any any 2001:db8::/32 → drop" -j DROP'
    ]


@pytest.mark.parametrize("version, icmp", [(4, "icmp"), (6, "ipv6-icmp")])
def test_icmp_means_the_family_icmp(version, icmp):
    p = profile(rules=[{"direction": "in", "proto": "icmp", "action": "allow"}])
    specs = [s for s in chain(rules.render_install("", [vm(profile=p)], False, version), IN) if "rule 1" in s]
    assert specs == [f'-p {icmp} -m comment --comment "netskin rule 1: in icmp any any → allow" -j RETURN']


@pytest.mark.parametrize("version, unreachable", [(4, "icmp-port-unreachable"), (6, "icmp6-port-unreachable")])
def test_reject_answers_tcp_with_a_reset_and_the_rest_with_port_unreachable(version, unreachable):
    p = profile(default_in="reject", rules=[
        {"direction": "in", "proto": "tcp", "ports": [80], "action": "reject"},
        {"direction": "in", "proto": "udp", "ports": [53], "action": "reject"},
    ])
    specs = chain(rules.render_install("", [vm(profile=p)], False, version), IN)
    assert [s for s in specs if "rule" in s] == [
        '-p tcp --dport 80 -m comment --comment "netskin rule 1: in tcp 80 any → reject" -j REJECT --reject-with tcp-reset',
        f'-p udp --dport 53 -m comment --comment "netskin rule 2: in udp 53 any → reject" -j REJECT --reject-with {unreachable}',
    ]
    assert specs[-2:] == [
        '-p tcp -m comment --comment "netskin default in: reject" -j REJECT --reject-with tcp-reset',
        f'-m comment --comment "netskin default in: reject" -j REJECT --reject-with {unreachable}',
    ]


def test_rules_keep_profile_order_within_each_direction():
    p = profile(rules=[
        {"direction": "in", "proto": "tcp", "ports": [22], "action": "allow"},
        {"direction": "out", "proto": "udp", "ports": [53], "action": "allow"},
        {"direction": "in", "proto": "tcp", "action": "reject"},
    ], default_out="drop")
    text = rules.render_install("", [vm(profile=p)], False, 4)
    assert [re.search(r"rule (\d)", s)[1] for s in chain(text, IN) if "netskin rule" in s] == ["1", "3"]
    assert [re.search(r"rule (\d)", s)[1] for s in chain(text, OUT) if "netskin rule" in s] == ["2"]
    assert chain(text, OUT)[-1] == '-m comment --comment "netskin default out: drop" -j DROP'


def test_long_descriptions_are_cut_to_what_the_kernel_keeps():
    p = profile(rules=[{"direction": "in", "proto": "tcp", "ports": [f"{n}-{n + 1}" for n in range(10000, 10400, 4)], "action": "allow"}])
    comments = re.findall(r'--comment "([^"]*)"', rules.render_install("", [vm(profile=p)], False, 4))
    assert max(len(c.encode()) for c in comments) <= 255


# --- transactions over what is there ------------------------------------------------------------

OLD_LAYOUT = """\
# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:NETSKIN - [0:0]
-A INPUT -m comment --comment netskin -j NETSKIN
-A FORWARD -m comment --comment netskin -j NETSKIN
-A FORWARD -i eth9 -j DROP
-A OUTPUT -m comment --comment netskin -j NETSKIN
-A NETSKIN -p tcp -m mark --mark 0x20000000/0x20000000 -j REJECT --reject-with tcp-reset
-A NETSKIN -m mark --mark 0x20000000/0x20000000 -j REJECT --reject-with icmp-port-unreachable
-A NETSKIN -i tap-vm1 -m comment --comment netskin -j NFQUEUE --queue-num 7700 --queue-bypass
-A NETSKIN -o tap-vm1 -m comment --comment netskin -j NFQUEUE --queue-num 7701 --queue-bypass
COMMIT
"""


def test_install_over_the_old_layout_deletes_its_jumps_and_flushes_its_chain():
    text = rules.render_install(OLD_LAYOUT, [vm()], fail_open=True, version=4)
    assert section(text, "filter") == [
        "-D INPUT -m comment --comment netskin -j NETSKIN",
        "-D FORWARD -m comment --comment netskin -j NETSKIN",
        "-D OUTPUT -m comment --comment netskin -j NETSKIN",
        ":NETSKIN - [0:0]",
        "-X NETSKIN",
    ]


def test_remove_of_the_old_layout_keeps_the_hosts_own_rules():
    filter_ = section(rules.render_remove(OLD_LAYOUT), "filter")
    assert "-X NETSKIN" in filter_
    assert not any("eth9" in line for line in filter_)


def test_install_over_a_killed_run_replaces_every_copy_once():
    first = rules.render_install("", [vm(profile=shipped("restricted"))], fail_open=True, version=4)
    saved = _as_saved(first) + _as_saved(first)  # two copies of the jumps, as after a race
    text = rules.render_install(saved, [vm(profile=shipped("restricted"))], fail_open=True, version=4)
    assert sum(line.startswith("-D FORWARD") for line in section(text, "filter")) == 2
    assert sum(line.startswith("-D PREROUTING") for line in section(text, "mangle")) == 2
    assert sum(line.startswith("-D POSTROUTING") for line in section(text, "mangle")) == 2
    assert sum(line.startswith("-I FORWARD") for line in section(text, "filter")) == 1
    assert sum(line.startswith("-A PREROUTING") for line in section(text, "mangle")) == 1
    assert sum(line.startswith("-A POSTROUTING") for line in section(text, "mangle")) == 1


def test_install_removes_the_chains_of_vms_no_longer_listed():
    saved = _as_saved(rules.render_install("", [vm(profile=shipped("restricted")), vm("gone", index=2, profile=shipped("open"))], False, 4))
    text = rules.render_install(saved, [vm(profile=shipped("restricted"))], False, 4)
    gone_in, gone_out = firewall.chain_names("gone")
    assert f"-X {gone_in}" in section(text, "filter") and f"-X {gone_out}" in section(text, "filter")
    assert f"-X {IN}" not in section(text, "filter")


def test_set_profile_swaps_one_vm_and_replays_the_others():
    saved = _as_saved(rules.render_install("", [vm(profile=shipped("restricted")), vm("vm2", index=2, profile=shipped("open"))], False, 4))
    text = rules.render_set_profile(saved, vm(profile=shipped("standard")), 4)
    assert section(text, "mangle") == []
    filter_ = section(text, "filter")
    assert ":NETSKIN - [0:0]" in filter_ and f":{IN} - [0:0]" in filter_
    assert any("vm=vm2 profile=open" in line for line in filter_ if line.startswith("-A NETSKIN"))
    assert any("vm=vm1 profile=standard" in line for line in filter_ if line.startswith("-A NETSKIN"))
    assert not any("vm=vm1 profile=restricted" in line for line in filter_ if line.startswith("-A"))
    assert not any(line.startswith("-X") for line in filter_)


def test_set_profile_rebuilds_the_trees_from_the_other_vms_saved_leaves():
    many = [rules.VmRules(f"vm{i}", f"tap{i}", 7700, 7701, profile("test")) for i in range(30)]
    many.append(rules.VmRules("port", "vnet7", 7700, 7701, profile("test"), bridge="br0", address="10.77.100.2"))
    installed = rules.render_install("", many, fail_open=False, version=4)
    saved = _as_saved(installed)
    text = rules.render_set_profile(saved, rules.VmRules("vm3", "tap3", 7700, 7701, shipped("standard")), 4)
    filter_ = section(text, "filter")
    changed = [line.replace("profile=test", "profile=standard") if "vm=vm3 " in line else line
               for line in section(installed, "filter") if line.startswith("-A NETSKIN")]
    assert sorted(line for line in filter_ if line.startswith("-A NETSKIN")) == sorted(changed)
    assert not any(line.startswith("-X") for line in filter_)
    others = {chain for vm_ in many if vm_.name != "vm3" for chain in firewall.chain_names(vm_.name)}
    assert not {line.split()[0][1:] for line in filter_ if line.startswith(":")} & others  # kept as they are
    text = rules.render_set_profile(saved, rules.VmRules("vm3", "tap3", 7700, 7701), 4)
    filter_ = section(text, "filter")
    assert not any("vm=vm3 " in line for line in filter_)
    assert sum("vm=port " in line for line in filter_) == 5


def test_set_profile_none_removes_the_vms_chains_and_the_last_one_removes_netskin():
    saved = _as_saved(rules.render_install("", [vm(profile=shipped("restricted")), vm("vm2", index=2, profile=shipped("open"))], False, 4))
    text = rules.render_set_profile(saved, vm(), 4)
    deleted = {line[3:] for line in section(text, "filter") if line.startswith("-X")}
    assert {chain for chain in deleted if not chain.startswith("NETSKIN-T")} == {IN, OUT}  # and tree chains
    assert any("vm=vm2 profile=open" in line for line in section(text, "filter"))
    saved = _as_saved(rules.render_install("", [vm(profile=shipped("restricted"))], False, 4))
    filter_ = section(rules.render_set_profile(saved, vm(), 4), "filter")
    assert {line for line in filter_ if line.startswith("-X")} == {
        "-X NETSKIN", "-X NETSKIN-FROM-PORTS", "-X NETSKIN-TO-PORTS", f"-X {IN}", f"-X {OUT}"}
    assert filter_.index("-X NETSKIN") < filter_.index(f"-X {IN}")
    assert not any(line.startswith("-I") for line in filter_)


def test_remove_steering_leaves_the_firewall():
    saved = _as_saved(rules.render_install("", [vm(profile=shipped("restricted"))], False, 4))
    text = rules.render_remove_steering(saved)
    assert section(text, "filter") == []
    chains = ("NETSKIN-UP", "NETSKIN-DOWN", "NETSKIN-UP-PORTS", "NETSKIN-DOWN-PORTS", "NETSKIN-SEEN")
    assert sorted(section(text, "mangle")[-10:]) == sorted([f":{c} - [0:0]" for c in chains] + [f"-X {c}" for c in chains])
    assert [line[:2] for line in section(text, "mangle")[-10:]] == [":N"] * 5 + ["-X"] * 5  # flushed, then deleted
    assert rules.render_remove_steering(OLD_LAYOUT) == ""  # no steering in mangle: nothing to do


def test_remove_of_nothing_is_nothing():
    assert rules.render_remove("") == ""
    assert rules.render_remove("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -i eth9 -j DROP\nCOMMIT\n") == ""


def _as_saved(restore_text: str) -> str:
    """What iptables-save would print after applying restore_text to an empty ruleset (enough for these tests)."""
    out = []
    for table in ("mangle", "filter"):
        lines = section(restore_text, table)
        if not lines:
            continue
        chains = [line[1:].split()[0] for line in lines if line.startswith(":")]
        base = {"mangle": ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"], "filter": ["INPUT", "FORWARD", "OUTPUT"]}[table]
        out.append(f"*{table}")
        out += [f":{c} ACCEPT [0:0]" for c in base] + [f":{c} - [0:0]" for c in chains]
        for line in lines:
            if line.startswith("-I "):
                _, hook, _, spec = line.split(None, 3)
                out.append(f"-A {hook} {spec}")
            elif line.startswith("-A "):
                out.append(line)
        out.append("COMMIT")
    return "\n".join(out) + "\n"


# --- counters -------------------------------------------------------------------------------


def test_counters_sum_families_and_blocks_and_name_the_profile():
    p = profile(rules=[
        {"direction": "in", "proto": "tcp", "ports": list(range(1, 21)), "action": "allow"},
        {"direction": "in", "proto": "udp", "cidr": "2001:db8::/32", "action": "reject"},
    ])
    saves = []
    for version in (4, 6):
        saved = _as_saved(rules.render_install("", [vm(profile=p), vm("vm2", index=2)], False, version))
        # every rule of a firewall chain hit 3 times in each family
        saves.append("\n".join(f"[3:300] {line}" if line.startswith("-A NSKFW") else line for line in saved.splitlines()))
    counters = firewall.parse_counters(saves)
    assert list(counters) == ["vm1"]
    assert counters["vm1"]["profile"] == "test"
    assert counters["vm1"]["rules"] == [
        {"rule": "in tcp 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20 any → allow", "hits": 12},  # 2 blocks x 2 families
        {"rule": "in udp any 2001:db8::/32 → reject", "hits": 3},  # ip6tables only
    ]
    assert counters["vm1"]["default_hits"] == {"in": 6, "out": 6}


def test_counters_ignore_chains_no_jump_leads_to():
    saved = _as_saved(rules.render_install("", [vm(profile=shipped("open"))], False, 4))
    orphan = "\n".join(line for line in saved.splitlines() if not line.startswith("-A NETSKIN"))
    assert firewall.parse_counters([orphan]) == {}


# --- input checks and timeouts ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    rules.VmRules("bad name", "tap0", 1, 2),
    rules.VmRules("vm1", "tap 0", 1, 2),
    rules.VmRules("vm1", "a-very-long-interface-name", 1, 2),
    rules.VmRules("vm1", "tap0", 70000, 2),
])
def test_names_that_cannot_be_rules_are_refused(bad):
    with pytest.raises(rules.RulesError):
        rules.install([bad], fail_open=True)


def test_a_command_that_hangs_raises_rules_error_with_the_timeout():
    with pytest.raises(rules.RulesError, match=r"did not finish within 0\.3 s"):
        rules._run([sys.executable, "-c", "import time; time.sleep(5)"], timeout_s=0.3)


def test_install_replaces_the_previous_mangle_layout():
    previous = "\n".join([
        "*mangle", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]", ":NETSKIN - [0:0]",
        '-A FORWARD -m comment --comment "netskin" -j NETSKIN',
        '-A INPUT -m comment --comment "netskin" -j NETSKIN',
        '-A OUTPUT -m comment --comment "netskin" -j NETSKIN',
        '-A NETSKIN -i tap-vm1 -m comment --comment "netskin vm=vm1 uplink" -j NFQUEUE --queue-num 7702',
        "COMMIT", "",
    ])
    mangle = section(rules.render_install(previous, [vm()], fail_open=False, version=4), "mangle")
    assert [line for line in mangle if line.startswith("-D")] == [
        f'-D {hook} -m comment --comment "netskin" -j NETSKIN' for hook in ("FORWARD", "INPUT", "OUTPUT")]
    assert ":NETSKIN - [0:0]" in mangle and "-X NETSKIN" in mangle
    assert mangle.index("-X NETSKIN") > max(i for i, line in enumerate(mangle) if line.startswith("-D"))
