"""The daemon's data path for real: rules, NFQUEUE, counters, clean exit, crash behaviour."""

from __future__ import annotations

import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from manager import measure
from manager.process import DaemonProcess

pytestmark = pytest.mark.e2e


def ruleset(lab) -> str:
    """The hv namespace's whole ruleset, minus the timestamp comments and the tables that hold
    nothing (iptables-save lists a table once it has been used, even when it is empty again)."""
    out = []
    for cmd in ("iptables-save", "ip6tables-save"):
        text = lab.exec("hv", [cmd], check=True).stdout
        table: list[str] = []
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            table.append(line)
            if line == "COMMIT":
                empty = all(entry.startswith(("*", "COMMIT")) or (entry.startswith(":") and " ACCEPT " in entry)
                            for entry in table)
                if not empty:
                    out += table
                table = []
    return "\n".join(out)


def our_rules(lab) -> list[str]:
    text = lab.exec("hv", ["iptables-save"], check=True).stdout
    return [line for line in text.splitlines() if "netskin" in line or "NETSKIN" in line]


@pytest.fixture
def foreign_rules(lab):
    """A host firewall that is not ours: it must be left exactly as it was."""
    lab.exec("hv", ["iptables", "-N", "HOST-OWN"], check=True)
    lab.exec("hv", ["iptables", "-A", "HOST-OWN", "-p", "tcp", "--dport", "2222", "-j", "ACCEPT"], check=True)
    lab.exec("hv", ["iptables", "-A", "FORWARD", "-j", "HOST-OWN"], check=True)
    lab.exec("hv", ["ip6tables", "-A", "INPUT", "-p", "udp", "--dport", "5353", "-j", "ACCEPT"], check=True)
    return ruleset(lab)


def test_every_packet_passes_through_the_queues_in_both_directions(lab):
    with DaemonProcess(lab.config_path) as daemon:
        before = daemon.status("vm1")["vm1"]
        result = measure.ping(lab, "vm1", lab.inet_address, count=20, interval=0.02)
        assert result["loss_percent"] == 0.0
        udp = measure.udp_probe(lab, "vm1", count=200, rate_pps=1000)
        assert udp["received"] == udp["sent"] == 200
        tcp = lab.exec("vm1", ["python3", "-c", TCP_ECHO.format(addr=lab.inet_address, port=lab.echo_port)])
        assert tcp.returncode == 0, tcp.stderr
        after = daemon.status("vm1")["vm1"]

    up = after["uplink"]["packets"] - before["uplink"]["packets"]
    down = after["downlink"]["packets"] - before["downlink"]["packets"]
    # 20 pings + 200 UDP probes each way, plus the TCP exchange (handshake, data, acks, fin).
    assert up >= 220 + 5 and down >= 220 + 5
    assert after["uplink"]["passed_packets"] == after["uplink"]["packets"]
    assert after["downlink"]["passed_packets"] == after["downlink"]["packets"]
    assert after["uplink"]["bytes"] > 0 and after["downlink"]["bytes"] > 0


def test_ipv6_passes_through_too(lab):
    with DaemonProcess(lab.config_path) as daemon:
        before = daemon.status("vm1")["vm1"]["uplink"]["packets"]
        result = measure.ping(lab, "vm1", lab.inet_address6, count=10, interval=0.02)
        assert result["loss_percent"] == 0.0
        assert daemon.status("vm1")["vm1"]["uplink"]["packets"] - before >= 10


def test_sigterm_restores_the_ruleset_exactly(lab, foreign_rules):
    daemon = DaemonProcess(lab.config_path).start()
    # Four trees (device and bridge port, each way) of the VMs, and a routed-onto-a-bridge set
    # rule per downlink queue in use: each worker's GSO pair's (VMs without a skin decide nothing
    # per packet; worker k's pair is 7702 + 4k / 7703 + 4k).
    downlinks = {vm["queues"]["downlink"] for vm in daemon.status().values()}
    assert downlinks <= {7703 + 4 * k for k in range(len(lab.vms))}
    assert len([r for r in our_rules(lab) if "NFQUEUE" in r]) == 4 * len(lab.vms) + len(downlinks)
    assert set(our_sets(lab)) == {f"netskin-{queue}-v{version}" for queue in downlinks for version in (4, 6)}
    assert daemon.stop(signal.SIGTERM) == 0
    assert ruleset(lab) == foreign_rules
    assert our_sets(lab) == []  # destroyed after the rules that used them


def our_sets(lab) -> list[str]:
    return [name for name in lab.exec("hv", ["ipset", "list", "-n"], check=True).stdout.split()
            if name.startswith("netskin-")]


def test_sigint_restores_the_ruleset_too(lab, foreign_rules):
    daemon = DaemonProcess(lab.config_path).start()
    daemon.stop(signal.SIGINT)
    assert ruleset(lab) == foreign_rules


def test_after_sigkill_a_restart_leaves_one_copy_and_cleanup_removes_it(lab, foreign_rules):
    first = DaemonProcess(lab.config_path).start()
    installed = our_rules(lab)
    first.stop(signal.SIGKILL)
    assert our_rules(lab) == installed  # a killed daemon cannot clean up
    with DaemonProcess(lab.config_path):
        assert our_rules(lab) == installed  # leftovers replaced, not duplicated
    assert ruleset(lab) == foreign_rules
    # --cleanup after another crash removes everything that is ours and nothing else.
    DaemonProcess(lab.config_path).start().stop(signal.SIGKILL)
    out = subprocess.run(
        [*DaemonProcess.command(lab.config_path), "--cleanup"], capture_output=True, text=True, check=True
    )
    assert "removed" in out.stdout
    assert ruleset(lab) == foreign_rules
    assert our_sets(lab) == []


def test_fail_open_traffic_flows_after_sigkill(lab):
    DaemonProcess(lab.config_path).start().stop(signal.SIGKILL)
    assert our_rules(lab), "rules of the killed daemon are still there"
    result = measure.ping(lab, "vm1", lab.inet_address, count=5, interval=0.05)
    assert result["loss_percent"] == 0.0


def test_fail_closed_traffic_stops_after_sigkill(lab):
    text = lab.config_path.read_text().replace('fail_mode = "open"', 'fail_mode = "closed"')
    assert 'fail_mode = "closed"' in text
    lab.config_path.write_text(text)
    DaemonProcess(lab.config_path).start().stop(signal.SIGKILL)
    result = measure.ping(lab, "vm1", lab.inet_address, count=5, interval=0.05, wait_s=0.5)
    assert result["loss_percent"] == 100.0
    with DaemonProcess(lab.config_path):  # a restart brings traffic back
        assert measure.ping(lab, "vm1", lab.inet_address, count=3, interval=0.05)["loss_percent"] == 0.0


TCP_ECHO = """
import socket
s = socket.create_connection(("{addr}", {port}), timeout=5)
data = bytes(range(256)) * 64
s.sendall(data)
got = b""
while len(got) < len(data):
    chunk = s.recv(65536)
    assert chunk, "connection closed early"
    got += chunk
assert got == data
"""


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL], ids=["stop", "kill"])
def test_held_packets_leave_early_at_a_stop_and_never_after_a_kill(lab, skins, stop_signal):
    # The engine worker is a child process: on the daemon's stop it releases what it holds (a
    # stopped daemon must not eat packets); when the daemon dies unannounced it must not, or
    # the held packets would pass without the rest of their delay.
    skins("hold-4s", uplink={"delay_ms": 4000})
    daemon = DaemonProcess(lab.config_path).start()
    try:
        assert daemon.request("apply", vm="vm1", skin="hold-4s")["vms"]["vm1"]["active"] == "hold-4s"
        with ThreadPoolExecutor(1) as pool:
            probe = pool.submit(measure.udp_probe, lab, "vm1", count=20, rate_pps=100, timeout_s=6.0)
            time.sleep(1.0)  # every datagram sent and held
            daemon.stop(stop_signal)
            result = probe.result()
    finally:
        daemon.stop(signal.SIGKILL)
    if stop_signal == signal.SIGTERM:
        assert result["received"] == 20 and result["rtt_max_ms"] < 3000, result  # released at the stop
    else:
        assert result["received"] == 0, result  # dropped with the queue, none early
