"""netskin's netfilter rules in a real kernel: steering in mangle, firewalls in filter.

Each test builds the namespace lab, installs the rules inside its hypervisor namespace and sends
real traffic between the lab's namespaces. A bare NFQUEUE accept loop in the hypervisor stands
in for the daemon and counts the packets it sees per queue.
"""

from __future__ import annotations

import json
import re
import socket
import time

import pytest

from interceptor import rules
from interceptor.profiles import compile_profile, load_profile, profile_dirs, validate_profile
from manager.lab import QUEUE_BASE
from tests.e2e.netns_helpers import in_netns, ready_script

pytestmark = pytest.mark.e2e

UP, DOWN = QUEUE_BASE, QUEUE_BASE + 1  # vm1's queues
CONNECT_TIMEOUT_S = 1.0

# Accepts every packet of the queues given and keeps a count per queue in a JSON file.
ACCEPT_LOOP = r"""
import json, os, sys, threading
from netfilterqueue import NetfilterQueue
path, numbers = sys.argv[1], [int(n) for n in sys.argv[2:]]
counts, lock = {n: 0 for n in numbers}, threading.Lock()
def counting(number):
    def accept(packet):
        packet.accept()
        with lock:
            counts[number] += 1
            with open(path + ".tmp", "w") as f:
                json.dump(counts, f)
            os.replace(path + ".tmp", path)
    return accept
queues = []
for number in numbers:
    queue = NetfilterQueue()
    queue.bind(number, counting(number))
    queues.append(queue)
for queue in queues[1:]:
    threading.Thread(target=queue.run, daemon=True).start()
print("ready", flush=True)
queues[0].run()
"""

# With the shell's stamping socket open (interceptor.shell.Shell), accepts each packet of the
# queues given and writes [queue, kernel stamp, wall clock at read] of each to a JSON file.
STAMP_LOOP = r"""
import json, os, sys, threading, time
from netfilterqueue import NetfilterQueue
from interceptor.shell import Shell
path, numbers = sys.argv[1], [int(n) for n in sys.argv[2:]]
shell = Shell(fail_open=True)  # keeps a socket with SO_TIMESTAMPNS open, as the daemon does
seen, lock = [], threading.Lock()
def recording(number):
    def record(packet):
        stamp, read = packet.get_timestamp(), time.time()
        packet.accept()
        with lock:
            seen.append([number, stamp, read])
            with open(path + ".tmp", "w") as f:
                json.dump(seen, f)
            os.replace(path + ".tmp", path)
    return record
queues = []
for number in numbers:
    queue = NetfilterQueue()
    queue.bind(number, recording(number))
    queues.append(queue)
for queue in queues[1:]:
    threading.Thread(target=queue.run, daemon=True).start()
print("ready", flush=True)
queues[0].run()
"""

# TCP listeners (accept and close) and UDP echo on each port given, IPv4 and IPv6.
LISTENER = r"""
import socket, sys, threading
def tcp(s):
    while True:
        conn, _ = s.accept()
        conn.close()
def udp(s):
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(data, peer)
for port in map(int, sys.argv[1:]):
    for kind, serve in ((socket.SOCK_STREAM, tcp), (socket.SOCK_DGRAM, udp)):
        s = socket.socket(socket.AF_INET6, kind)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", port))
        if kind == socket.SOCK_STREAM:
            s.listen(64)
        threading.Thread(target=serve, args=(s,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


# --- helpers --------------------------------------------------------------------------------


def shipped(name):
    return load_profile(name, profile_dirs(None))


def vm1(lab, profile=None) -> rules.VmRules:
    return rules.VmRules("vm1", lab.vm("vm1").interface, UP, DOWN, profile)


def in_hv(lab, fn, *args, **kwargs):
    return in_netns(lab.hv_ns, fn, *args, **kwargs)


def hv(lab, *argv) -> str:
    return lab.exec("hv", list(argv), check=True).stdout


def saved(lab, counters: bool = False) -> str:
    flags = ["-c"] if counters else []
    return hv(lab, "iptables-save", *flags) + hv(lab, "ip6tables-save", *flags)


def normalized(save_text: str) -> list[str]:
    """A save without comments and counters, and without tables that hold nothing.

    iptables-nft cannot delete a table, so one created by the rules stays, empty, after they go.
    """
    out, table = [], []
    for line in save_text.splitlines():
        if line.startswith("#"):
            continue
        line = re.sub(r"^\[\d+:\d+\] ", "", line)
        line = re.sub(r" \[\d+:\d+\]$", "", line)
        table.append(line)
        if line == "COMMIT":
            if any(l.startswith("-A ") or l.endswith(" -") for l in table):
                out += table
            table = []
    return out


def counter(lab, rule_fragment: str) -> int:
    """Packets counted by the one saved rule containing rule_fragment."""
    hits = [line for line in saved(lab, counters=True).splitlines() if rule_fragment in line]
    assert len(hits) == 1, hits
    return int(re.match(r"\[(\d+):", hits[0])[1])


def _tcp(address: str, port: int) -> str:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(CONNECT_TIMEOUT_S)
        try:
            s.connect((address, port))
        except ConnectionRefusedError:
            return "refused"
        except (socket.timeout, TimeoutError):
            return "timeout"
        return "connected"


def _tcp_echo(address: str, port: int) -> bytes:
    with socket.create_connection((address, port), timeout=3) as s:
        s.sendall(b"ping")
        return s.recv(16)


def _udp(address: str, port: int, payload: bytes = b"hello") -> bytes | str:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(CONNECT_TIMEOUT_S)
        s.connect((address, port))
        s.send(payload)
        try:
            return s.recv(2048)
        except ConnectionRefusedError:
            return "refused"
        except (socket.timeout, TimeoutError):
            return "timeout"


def tcp(lab, where: str, address: str, port: int) -> str:
    return in_netns(lab.resolve_ns(where), _tcp, address, port)


def timed_tcp(lab, where: str, address: str, port: int) -> tuple[str, float]:
    start = time.monotonic()
    outcome = tcp(lab, where, address, port)
    return outcome, time.monotonic() - start


def udp(lab, where: str, address: str, port: int):
    return in_netns(lab.resolve_ns(where), _udp, address, port)


def tcp_echo(lab, where: str, address: str, port: int) -> bytes:
    return in_netns(lab.resolve_ns(where), _tcp_echo, address, port)


def accept_loop(lab, tmp_path, *queues):
    return ready_script(lab, "hv", ACCEPT_LOOP, str(tmp_path / "counts.json"), *map(str, queues))


def queue_counts(tmp_path) -> dict[int, int]:
    path = tmp_path / "counts.json"
    if not path.exists():
        return {}
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


def wait_for(predicate, timeout_s: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        time.sleep(0.05)


@pytest.fixture
def owned(lab):
    """The lab; whatever netskin installed in its hypervisor is removed after the test."""
    yield lab
    in_hv(lab, rules.remove)


# --- steering: the host's own rules still apply ---------------------------------------------------


def test_a_host_drop_rule_added_after_install_still_drops_queued_traffic(owned, tmp_path):
    lab = owned
    in_hv(lab, rules.install, [vm1(lab)], False)
    with accept_loop(lab, tmp_path, UP, DOWN):
        hv(lab, "iptables", "-w", "5", "-A", "FORWARD", "-i", "tap-vm1", "-p", "udp", "--dport", "9000", "-j", "DROP")
        assert tcp_echo(lab, "vm1", lab.inet_address, lab.echo_port) == b"ping"
        counts = queue_counts(tmp_path)
        assert counts[UP] >= 3 and counts[DOWN] >= 2  # the connection went through both queues

        assert udp(lab, "vm1", lab.inet_address, lab.echo_port) == "timeout"
        assert counter(lab, "-A FORWARD -i tap-vm1 -p udp") >= 1  # dropped by the host's rule...
        assert queue_counts(tmp_path)[UP] > counts[UP]  # ...after the queue accepted it
        # The same datagram over IPv6 has no host rule against it and passes.
        assert udp(lab, "vm1", lab.inet_address6, lab.echo_port) == b"hello"


def test_queued_packets_carry_the_kernels_arrival_stamp(owned, tmp_path):
    """The engine counts a delay from the kernel's stamp (interceptor.shell): the uplink queue
    (mangle PREROUTING) must deliver one with every packet, close to the time it was read. The
    downlink queue sees packets after forwarding, which clears the stamp: it falls back to the
    read time, so nothing is asserted of it."""
    lab = owned
    in_hv(lab, rules.install, [vm1(lab)], False)
    path = tmp_path / "stamps.json"
    with ready_script(lab, "hv", STAMP_LOOP, str(path), str(UP), str(DOWN)):
        for _ in range(3):
            assert udp(lab, "vm1", lab.inet_address, lab.echo_port) == b"hello"
        seen = json.loads(path.read_text())
    uplink = [(stamp, read) for queue, stamp, read in seen if queue == UP]
    assert len(uplink) >= 3
    for stamp, read in uplink:
        assert stamp > 0, "an uplink packet queued without NFQA_TIMESTAMP"
        assert 0 <= read - stamp < 1.0, (stamp, read)


def test_marks_of_other_tools_are_left_alone(owned, tmp_path):
    lab = owned
    mark = "0x20000000"
    # Another tool, set up before netskin (as at boot), marks the VM's traffic in mangle
    # PREROUTING with the bit the old layout used for rejects; after netskin starts it also marks
    # the hypervisor's own loopback traffic. What still carries the mark is counted later on.
    # (A mangle PREROUTING/POSTROUTING rule appended *after* netskin's jump is skipped for the
    # packets netskin queues: an accepted packet leaves the chain at the queue; see the README.)
    hv(lab, "iptables", "-w", "5", "-t", "mangle", "-A", "PREROUTING", "-i", "tap-vm1", "-j", "MARK", "--set-mark", f"{mark}/0xffffffff")
    in_hv(lab, rules.install, [vm1(lab, shipped("open"))], False)
    hv(lab, "iptables", "-w", "5", "-t", "mangle", "-A", "OUTPUT", "-o", "lo", "-j", "MARK", "--set-mark", f"{mark}/0xffffffff")
    hv(lab, "iptables", "-w", "5", "-A", "INPUT", "-i", "lo", "-m", "mark", "--mark", mark)
    hv(lab, "iptables", "-w", "5", "-A", "FORWARD", "-i", "tap-vm1", "-m", "mark", "--mark", mark)
    with accept_loop(lab, tmp_path, UP, DOWN), ready_script(lab, "hv", LISTENER, "7000"):
        assert tcp(lab, "hv", "127.0.0.1", 7000) == "connected"
        assert udp(lab, "hv", "127.0.0.1", 7000) == b"hello"
        assert counter(lab, "-A INPUT -i lo -m mark") >= 4
        assert tcp_echo(lab, "vm1", lab.inet_address, lab.echo_port) == b"ping"
        assert counter(lab, "-A FORWARD -i tap-vm1 -m mark") >= 3
        assert queue_counts(tmp_path)[UP] >= 3
    # netskin's own mark rules use only its steering bit, never the other tool's.
    ours = [line for line in saved(lab).splitlines() if "mark" in line and "NETSKIN" in line]
    assert ours and all(f"{rules.DEFAULT_MARK:#x}" in line and mark not in line for line in ours), ours


# --- the firewall in the kernel -------------------------------------------------------------------


def test_restricted_lets_only_ssh_in_and_everything_out(owned, tmp_path):
    lab = owned
    vm = lab.vm("vm1")
    in_hv(lab, rules.install, [vm1(lab, shipped("restricted"))], False)
    with accept_loop(lab, tmp_path, UP, DOWN), ready_script(lab, "vm1", LISTENER, "22", "80"):
        for ns in ("hv", "vm1"):  # IPv6 must find its neighbours through the firewall
            hv(lab, "ip", "netns", "exec", lab.resolve_ns(ns), "ip", "-6", "neigh", "flush", "all")
        for address in (vm.address, vm.address6):
            assert tcp(lab, "inet", address, 22) == "connected"
            assert tcp(lab, "inet", address, 80) == "timeout"
            assert udp(lab, "inet", address, 80) == "timeout"
        # The VM's own connections and their replies.
        assert tcp_echo(lab, "vm1", lab.inet_address, lab.echo_port) == b"ping"
        assert tcp_echo(lab, "vm1", lab.inet_address6, lab.echo_port) == b"ping"
        assert udp(lab, "vm1", lab.inet_address, lab.echo_port) == b"hello"
        assert queue_counts(tmp_path)[DOWN] >= 4

        counters = in_hv(lab, rules.firewall_counters)
        assert counters["vm1"]["profile"] == "restricted"
        assert counters["vm1"]["rules"][0]["rule"] == "in tcp 22 any → allow"
        assert counters["vm1"]["rules"][0]["hits"] >= 2  # one SYN per family
        assert counters["vm1"]["default_hits"]["in"] >= 4
        assert counters["vm1"]["default_hits"]["out"] >= 3  # the VM's opening packets


def test_reject_refuses_at_once_and_set_profile_swaps_one_vm(owned, tmp_path):
    lab = owned
    vm = lab.vm("vm1")
    in_hv(lab, rules.install, [vm1(lab, shipped("restricted"))], False)
    rejecting = compile_profile(validate_profile({
        "default_in": "drop",
        "default_out": "allow",
        "rules": [
            {"direction": "in", "proto": "tcp", "ports": [22], "action": "allow"},
            {"direction": "in", "proto": "tcp", "ports": [80], "action": "reject"},
            {"direction": "in", "proto": "udp", "ports": ["5000-5010", 80], "action": "reject"},
        ],
    }), "rejecting")
    with accept_loop(lab, tmp_path, UP, DOWN), ready_script(lab, "vm1", LISTENER, "22", "80", "5005"):
        assert udp(lab, "inet", vm.address, 5005) == "timeout"  # restricted drops
        in_hv(lab, rules.set_profile, vm1(lab, rejecting))
        for address in (vm.address, vm.address6):
            outcome, elapsed_s = timed_tcp(lab, "inet", address, 80)
            print(f"{address}:80 {outcome} in {elapsed_s * 1000:.1f} ms")
            assert outcome == "refused"  # an RST, not a drop's timeout
            assert udp(lab, "inet", address, 5005) == "refused"
            assert tcp(lab, "inet", address, 22) == "connected"
        counters = in_hv(lab, rules.firewall_counters)["vm1"]
        assert counters["profile"] == "rejecting"
        assert [rule["hits"] >= 2 for rule in counters["rules"]] == [True, True, True]

        in_hv(lab, rules.set_profile, vm1(lab, None))  # no profile: the listener answers
        assert tcp(lab, "inet", vm.address, 80) == "connected"
        assert udp(lab, "inet", vm.address, 5005) == b"hello"
        assert in_hv(lab, rules.firewall_counters) == {}
        after = saved(lab)
        assert "NSKFW" not in after
        assert not any("NETSKIN" in line for line in _table(after, "filter"))  # the last profile went


def test_the_profile_holds_with_no_queue_reader_and_after_the_reader_is_killed(owned, tmp_path):
    lab = owned
    vm = lab.vm("vm1")
    in_hv(lab, rules.install, [vm1(lab, shipped("restricted"))], True)
    with ready_script(lab, "vm1", LISTENER, "22", "80"):
        # Nobody reads the queues: --queue-bypass lets packets on, into the firewall.
        assert tcp(lab, "inet", vm.address, 22) == "connected"
        assert tcp(lab, "inet", vm.address, 80) == "timeout"
        with accept_loop(lab, tmp_path, UP, DOWN) as loop:
            assert tcp(lab, "inet", vm.address, 22) == "connected"
            assert queue_counts(tmp_path)[DOWN] >= 1
            loop.kill()  # SIGKILL: the queues' socket closes without a word
            loop.wait()
        assert tcp(lab, "inet", vm.address, 22) == "connected"
        assert tcp(lab, "inet", vm.address, 80) == "timeout"
        assert tcp(lab, "inet", vm.address6, 80) == "timeout"

        # A clean stop removes the steering only: the firewall stays in force.
        assert in_hv(lab, rules.remove_steering) is True
        assert tcp(lab, "inet", vm.address, 22) == "connected"
        assert tcp(lab, "inet", vm.address, 80) == "timeout"


# --- transactions ---------------------------------------------------------------------------------

OLD_LAYOUT = """\
*filter
:NETSKIN - [0:0]
-A NETSKIN -p tcp -m mark --mark 0x20000000/0x20000000 -j REJECT --reject-with tcp-reset
-A NETSKIN -m mark --mark 0x20000000/0x20000000 -j REJECT --reject-with {unreachable}
-A NETSKIN -i tap-vm1 -m comment --comment "netskin" -j NFQUEUE --queue-num 7700 --queue-bypass
-A NETSKIN -o tap-vm1 -m comment --comment "netskin" -j NFQUEUE --queue-num 7701 --queue-bypass
-I FORWARD 1 -m comment --comment "netskin" -j NETSKIN
-I INPUT 1 -m comment --comment "netskin" -j NETSKIN
-I OUTPUT 1 -m comment --comment "netskin" -j NETSKIN
COMMIT
"""


def test_remove_restores_the_ruleset_and_remove_steering_keeps_only_the_firewall(owned):
    lab = owned
    # The host's own rules, in the chains netskin uses too.
    for tool in ("iptables", "ip6tables"):
        hv(lab, tool, "-w", "5", "-A", "FORWARD", "-i", "up0", "-p", "tcp", "--dport", "25", "-j", "DROP")
        hv(lab, tool, "-w", "5", "-t", "mangle", "-A", "FORWARD", "-p", "tcp", "--tcp-flags", "SYN,RST", "SYN",
           "-j", "TCPMSS", "--clamp-mss-to-pmtu")
        hv(lab, tool, "-w", "5", "-N", "ADMIN")
        hv(lab, tool, "-w", "5", "-A", "ADMIN", "-j", "RETURN")
    before = normalized(saved(lab))

    # A killed run of the old layout, then two installs (a restart) over it.
    for tool, unreachable in (("iptables", "icmp-port-unreachable"), ("ip6tables", "icmp6-port-unreachable")):
        lab.exec("hv", [f"{tool}-restore", "--noflush"], input=OLD_LAYOUT.format(unreachable=unreachable), check=True)
    vms = [vm1(lab, shipped("restricted")),
           rules.VmRules("vm2", "tap-vm2", QUEUE_BASE + 2, QUEUE_BASE + 3, shipped("standard"))]
    in_hv(lab, rules.install, vms, True)
    in_hv(lab, rules.install, vms, True)
    installed = saved(lab)
    assert "REJECT" not in installed
    marks = [line for line in installed.splitlines() if "mark" in line]  # the steering bit only, in mangle
    assert marks and all(f"{rules.DEFAULT_MARK:#x}" in line for line in marks)
    assert not any("mark" in line for line in _table(installed, "filter"))
    assert all("NFQUEUE" not in line for line in _table(installed, "filter"))
    jumps = [line for line in _table(installed, "filter") if line.endswith("-j NETSKIN")]
    assert len(jumps) == 6, jumps  # FORWARD, INPUT, OUTPUT once, in each family
    for hook, chain in (("PREROUTING", "NETSKIN-UP"), ("POSTROUTING", "NETSKIN-DOWN")):
        jumps = [line for line in _table(installed, "mangle") if line.endswith(f"-j {chain}")]
        assert len(jumps) == 2 and all(line.startswith(f"-A {hook}") for line in jumps), jumps
    assert not any(line.endswith("-j NETSKIN") for line in _table(installed, "mangle"))  # the old layout went
    assert [line for line in _table(installed, "filter") if line.startswith("-A FORWARD")][0].endswith("-j NETSKIN")

    in_hv(lab, rules.set_profile, vm1(lab, shipped("open")))
    with_steering = "\n".join(normalized(saved(lab)))
    assert in_hv(lab, rules.remove_steering) is True
    without_steering = "\n".join(normalized(saved(lab)))
    assert _table(without_steering, "filter") == _table(with_steering, "filter")
    assert any(line.startswith("-A NSKFW") for line in _table(without_steering, "filter"))
    assert _table(without_steering, "mangle") == _table("\n".join(before), "mangle")
    assert in_hv(lab, rules.remove_steering) is False

    assert in_hv(lab, rules.remove) is True
    assert normalized(saved(lab)) == before
    assert in_hv(lab, rules.remove) is False
    assert not any(name.startswith("netskin-") for name in hv(lab, "ipset", "list", "-n").split())


def _table(save_text: str, table: str) -> list[str]:
    out, current = [], None
    for line in save_text.splitlines():
        if line.startswith("*"):
            current = line[1:]
        elif current == table:
            out.append(line)
    return out

