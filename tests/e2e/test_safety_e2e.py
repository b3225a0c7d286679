"""A firewall that holds when the daemon cannot, and a daemon that survives its own errors.

vm2 wears the shipped ``restricted`` profile (new incoming connections: tcp/22 only). Its port 80
must stay closed while vm1 floods the daemon, while the daemon is dead (kill -9) in either fail
mode, and after it restarts. A packet handler that raises must not end the daemon.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from manager import measure
from manager.process import DaemonProcess
from tests.e2e.netns_helpers import ready_script
from tests.e2e.test_firewall_dns_e2e import CONNECT, LISTENER
from tests.e2e.test_manager_e2e import netskin, write_skin

pytestmark = pytest.mark.e2e

# As fast as Python can send: 1400-byte UDP datagrams from vm1 to the internet for ``seconds``.
FLOOD = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
data = b"x" * 1400
end = time.monotonic() + float(sys.argv[3])
sent = 0
print("ready", flush=True)
while time.monotonic() < end:
    for _ in range(256):
        try:
            s.sendto(data, (sys.argv[1], int(sys.argv[2])))
            sent += 1
        except OSError:
            pass
print(sent, flush=True)
"""


def set_fail_mode(lab, mode: str) -> None:
    text = lab.config_path.read_text()
    for old in ('fail_mode = "open"', 'fail_mode = "closed"'):
        text = text.replace(old, f'fail_mode = "{mode}"')
    lab.config_path.write_text(text)


def connect_vm2(lab, ports=(22, 80), timeout_s: float = 1.0) -> dict[int, str]:
    script = CONNECT.replace("s.settimeout(1.5)", f"s.settimeout({timeout_s})")
    out = lab.exec("inet", [sys.executable, "-c", script, lab.vm("vm2").address, *ports], check=True)
    return {int(port): value["outcome"] for port, value in json.loads(out.stdout).items()}


@pytest.fixture
def vm2_listens(lab):
    with ready_script(lab, "vm2", LISTENER, 22, 80):
        yield


def wear_restricted(lab) -> None:
    write_skin(lab, "locked", security_profile="restricted", latency_ms=10)
    write_skin(lab, "slow", latency_ms=200)  # vm1: every packet is held for 100 ms each way
    assert netskin(lab.config_path, "apply", "vm2", "locked").returncode == 0
    assert netskin(lab.config_path, "apply", "vm1", "slow").returncode == 0


def test_a_flood_from_one_vm_does_not_open_another_vms_firewall(lab, vm2_listens):
    # A small per-VM cap makes the flood overflow at once: the engine drops ("overflow") before
    # the kernel queue fills and fail_mode "open" would bypass the daemon.
    text = lab.config_path.read_text()
    lab.config_path.write_text("max_held_packets = 256\n" + text)
    with DaemonProcess(lab.config_path) as daemon:
        wear_restricted(lab)
        assert connect_vm2(lab) == {22: "open", 80: "timeout"}
        flood = lab.popen("vm1", [sys.executable, "-c", FLOOD, lab.inet_address, "9", "8"],
                          stdout=subprocess.PIPE, text=True)
        try:
            assert flood.stdout.readline().strip() == "ready"
            outcomes = []
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline:
                outcomes.append(connect_vm2(lab, ports=(80,), timeout_s=0.5)[80])
            sent = int(flood.stdout.readline())
        finally:
            flood.kill()
            flood.wait()
        status = daemon.status()
        assert outcomes and all(outcome != "open" for outcome in outcomes), outcomes
        assert sent > 10_000, sent  # it really was a flood
        assert status["vm1"]["uplink"]["drops"]["overflow"] > 0, status["vm1"]["uplink"]
        # vm2 is still served: its own port 22 opens and its pings get through with its skin.
        assert connect_vm2(lab, ports=(22,)) == {22: "open"}
        assert status["vm2"]["firewall"]["default_hits"]["in"] >= len(outcomes), status["vm2"]["firewall"]


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_the_firewall_holds_while_the_daemon_is_dead_and_after_it_restarts(lab, vm2_listens, mode):
    set_fail_mode(lab, mode)
    daemon = DaemonProcess(lab.config_path).start()
    wear_restricted(lab)
    assert connect_vm2(lab) == {22: "open", 80: "timeout"}
    daemon.stop(signal.SIGKILL)
    dead = connect_vm2(lab)
    assert dead[80] != "open", dead
    if mode == "open":
        # Impairments are bypassed, the profile is not: SSH still reaches the VM.
        assert dead[22] == "open", dead
    else:
        # closed: a dead daemon blocks all of the VM's traffic until it is back.
        assert dead[22] == "timeout", dead
    with DaemonProcess(lab.config_path) as restarted:
        assert connect_vm2(lab) == {22: "open", 80: "timeout"}
        assert restarted.status("vm2")["vm2"]["firewall"]["profile"] == "restricted"
    # A clean stop keeps the profile in the kernel too (only --cleanup removes it).
    assert connect_vm2(lab) == {22: "open", 80: "timeout"}


def test_a_packet_handler_that_raises_does_not_stop_the_daemon(lab, monkeypatch):
    monkeypatch.setenv("NETSKIN_FAULT_INJECTION", "1")
    with DaemonProcess(lab.config_path) as daemon:
        daemon.request("fault", vm="vm1", count=40)
        first = measure.ping(lab, "vm1", lab.inet_address, count=60, interval=0.01)
        # fail_mode "open": the packets whose handling raised were accepted, so none was lost.
        assert first["loss_percent"] == 0.0, first
        status = daemon.status("vm1")["vm1"]
        assert status["errors"] == 40, status
        assert daemon.proc.poll() is None
        # The daemon goes on forwarding and counting.
        before = status["uplink"]["packets"]
        again = measure.ping(lab, "vm1", lab.inet_address, count=20, interval=0.01)
        assert again["loss_percent"] == 0.0
        after = daemon.status("vm1")["vm1"]
        assert after["uplink"]["packets"] - before >= 20 and after["errors"] == 40
        assert daemon.request("status")["host"]["errors"] == 40
    assert daemon.log().count("handling a packet raised") == 1  # 40 errors of one kind, logged once


def test_a_raising_handler_under_fail_closed_drops_and_counts(lab, monkeypatch):
    set_fail_mode(lab, "closed")
    monkeypatch.setenv("NETSKIN_FAULT_INJECTION", "1")
    with DaemonProcess(lab.config_path) as daemon:
        daemon.request("fault", vm="vm1", count=10)
        result = measure.ping(lab, "vm1", lab.inet_address, count=30, interval=0.02, wait_s=0.5)
        # Only the first direction's packets can raise: ten echo requests are dropped.
        assert result["received"] == 20, result
        status = daemon.status("vm1")["vm1"]
        assert status["errors"] == 10 and status["uplink"]["drops"]["error"] == 10, status
        assert measure.ping(lab, "vm1", lab.inet_address, count=5, interval=0.02)["loss_percent"] == 0.0


def test_cleanup_after_a_crash_removes_nat_chains_and_address_claims(lab):
    skin_address = "10.77.0.50"  # inside up0's subnet: the daemon claims it with proxy ARP + a /32
    write_skin(lab, "claimed", ip_address=skin_address, security_profile="restricted")
    daemon = DaemonProcess(lab.config_path).start()
    assert netskin(lab.config_path, "apply", "vm1", "claimed").returncode == 0

    def leftovers() -> dict:
        nat = lab.exec("hv", ["iptables-save", "-t", "nat"], check=True).stdout
        proxies = lab.exec("hv", ["ip", "neigh", "show", "proxy"], check=True).stdout
        route = lab.exec("hv", ["ip", "-4", "route", "show", "exact", f"{skin_address}/32"], check=True).stdout
        filt = lab.exec("hv", ["iptables-save", "-t", "filter"], check=True).stdout
        return {"nat": "NETSKIN" in nat, "proxy": skin_address in proxies, "route": bool(route.strip()),
                "firewall": "NSKFW" in filt}

    assert leftovers() == {"nat": True, "proxy": True, "route": True, "firewall": True}
    daemon.stop(signal.SIGKILL)
    assert leftovers() == {"nat": True, "proxy": True, "route": True, "firewall": True}  # a crash cleans nothing
    out = subprocess.run([*DaemonProcess.command(lab.config_path), "--cleanup"], capture_output=True, text=True,
                         check=True)
    assert "NAT chains" in out.stdout and skin_address in out.stdout, out.stdout
    assert leftovers() == {"nat": False, "proxy": False, "route": False, "firewall": False}
