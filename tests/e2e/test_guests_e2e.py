"""Real QEMU guests in the lab: boot, console, ping, iperf3, and a latency skin, per layout.

Two labs, built once each for the module (boot is the cost): one guest on a routed tap, and two
guests as ports of a bridge that the hv namespace routes and NATs for (libvirt's default). Three
paths are measured from inside guest vm1 through its console:

    routed          vm1 ── tap-vm1 ── hv (routes) ── inet
    bridge-peer     vm1 ── tap-vm1 ── br0 ── tap-vm2 ── vm2     (bridged)
    bridge-routed   vm1 ── tap-vm1 ── br0 ── hv (routes, NAT) ── inet
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import tomllib

import pytest

from interceptor.schema import load_host_config
from manager import guests, measure
from manager.process import DaemonProcess
from tests.conftest import lab_skip_reason, unique_lab_prefix

pytestmark = pytest.mark.e2e

LATENCY_MS = 100
LATENCY_TOLERANCE_MS = 25  # TCG guests add a few ms of scheduling noise to each RTT
MIN_TCP_MBITS = 20.0  # TCG moves hundreds of Mbit/s; this only says "iperf3 works"
PATHS = ("routed", "bridge-peer", "bridge-routed")


def _skip_reason() -> str | None:
    reason = lab_skip_reason()
    if reason:
        return reason
    missing = [t for t in ("qemu-system-x86_64", "apt-get", "dpkg-deb") if shutil.which(t) is None]
    if missing:
        return f"guests need {', '.join(missing)} (apt-get install qemu-system-x86)"
    return None


def _build(request, guest_count: int, bridge: bool):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from manager.lab import lab_down, lab_up

    prefix = unique_lab_prefix()
    request.addfinalizer(lambda: lab_down(prefix))
    lab = lab_up(prefix, vms=0, guests=guest_count, bridge=bridge)
    print(f"\nlab {prefix} ({'bridge' if bridge else 'routed'}): {lab.accel.upper()}, boot "
          + ", ".join(f"{name} {s:.1f} s" for name, s in lab.boot_s.items()))
    return lab


@pytest.fixture(scope="module")
def routed_lab(request):
    return _build(request, 1, bridge=False)


@pytest.fixture(scope="module")
def bridge_lab(request):
    return _build(request, 2, bridge=True)


class MeasuredPath:
    """One measured path: the lab, and vm1's peer on it (an address and how to reach it)."""

    def __init__(self, name: str, lab) -> None:
        self.name, self.lab = name, lab
        self.peer = "vm2" if name == "bridge-peer" else "inet"
        self.target = lab.vm("vm2").address if self.peer == "vm2" else lab.inet_address
        self.target6 = lab.vm("vm2").address6 if self.peer == "vm2" else lab.inet_address6


@pytest.fixture(scope="module", params=PATHS)
def path(request):
    lab = request.getfixturevalue("routed_lab" if request.param == "routed" else "bridge_lab")
    return MeasuredPath(request.param, lab)


def guest_ping(lab, vm: str, target: str, count: int = 10, interval: float = 0.2) -> dict:
    done = lab.console(vm).run(f"ping -c {count} -i {interval} -W 2 {target}", timeout=count * interval + 20)
    return guests.parse_busybox_ping(done.output)


def guest_iperf3(lab, vm: str, target: str, reverse: bool, seconds: int = 2) -> float:
    """bit/s as the receiving end measured it, run from inside guest vm."""
    done = lab.console(vm).run(f"iperf3 --json -c {target} -p {guests.IPERF3_PORT} -t {seconds}"
                               + (" -R" if reverse else ""), timeout=seconds + 30)
    report = json.loads(done.output)
    assert "error" not in report, report["error"]
    return float(report["end"]["sum_received"]["bits_per_second"])


# --- the guests themselves -------------------------------------------------------------------


@pytest.mark.parametrize("which", ["routed_lab", "bridge_lab"])
def test_guests_boot_and_the_console_runs_commands(request, which):
    lab = request.getfixturevalue(which)
    assert lab.accel in ("kvm", "tcg")
    for vm in lab.guests:
        console = lab.console(vm.name)
        done = console.run("cat /proc/cmdline; ip -o addr show dev eth0; cat /sys/class/net/eth0/mtu")
        assert done.exit_code == 0
        assert f"netskin.name={vm.name}" in done.output
        assert f"{vm.address}/24" in done.output and vm.address6 in done.output
        assert done.output.split()[-1] == "1500"
        assert console.run("exit 7").exit_code == 7  # exit codes come back as they are
        assert console.run("printf 'a\\nb'").output == "a\nb"  # output exactly, no trailing newline added
    if os.access("/dev/kvm", os.W_OK) and lab.accel == "tcg":
        print(f"\n/dev/kvm is present but did not boot the guest; {lab.prefix} runs on TCG")


def test_host_config_names_each_guest_by_its_tap_without_netns(bridge_lab):
    config = load_host_config(bridge_lab.config_path)
    for vm in bridge_lab.guests:
        assert config.vms[vm.name].interface == vm.interface
        assert config.vms[vm.name].netns is None
    raw = tomllib.loads(bridge_lab.config_path.read_text())
    assert all("netns" not in table for table in raw["vms"].values())


# --- per path: ping and iperf3 -------------------------------------------------------------


def test_ping_both_families_and_both_ways(path):
    lab = path.lab
    for target in (path.target, path.target6):
        result = guest_ping(lab, "vm1", target, count=5, interval=0.1)
        print(f"\n{path.name}: vm1 -> {target}: RTT median {result['rtt_median_ms']:.2f} ms")
        assert result["loss_percent"] == 0, result
    back_to = lab.vm("vm1").address
    if path.peer == "vm2":
        result = guest_ping(lab, "vm2", back_to, count=5, interval=0.1)
    else:  # the routed side reaches the guest too (the bridge layout NATs only what leaves)
        result = measure.ping(lab, "inet", back_to, count=5, interval=0.1)
    assert result["loss_percent"] == 0, result


def test_iperf3_both_ways(path):
    lab = path.lab
    up = guest_iperf3(lab, "vm1", path.target, reverse=False) / 1e6
    down = guest_iperf3(lab, "vm1", path.target, reverse=True) / 1e6
    print(f"\n{path.name}: iperf3 TCP from vm1 {up:.0f} Mbit/s, to vm1 {down:.0f} Mbit/s")
    assert up > MIN_TCP_MBITS and down > MIN_TCP_MBITS
    if path.peer == "inet":  # and the guest's own iperf3 server, from the internet side
        inbound = measure.iperf3(lab, "inet", port=guests.IPERF3_PORT, target=lab.vm("vm1").address, seconds=2)
        assert inbound / 1e6 > MIN_TCP_MBITS


def test_tcp_and_udp_echo_in_the_guest_answer(routed_lab):
    lab, guest = routed_lab, routed_lab.vm("vm1")
    probe = measure.udp_probe(lab, "inet", guest.address, guests.ECHO_PORT, count=20, rate_pps=50, warm_up=True)
    assert probe["loss_percent"] == 0, probe
    for family, address in ((socket.AF_INET, guest.address), (socket.AF_INET6, guest.address6)):
        with lab.socket("inet", family, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect((address, guests.ECHO_PORT))
            sock.sendall(b"hello guest\n")
            received = b""
            while not received.endswith(b"\n"):
                chunk = sock.recv(100)
                assert chunk, f"echo at {address} closed after {received!r}"
                received += chunk
        assert received == b"hello guest\n"


# --- per path: netskin's latency skin --------------------------------------------------------


@pytest.fixture(scope="module")
def daemons(request):
    """One daemon per lab, started at first use; every VM left without a skin at the end."""
    running: dict[str, DaemonProcess] = {}

    def get(lab) -> DaemonProcess:
        if lab.prefix not in running:
            skins_dir = load_host_config(lab.config_path).skins_dir
            (skins_dir / "lat100.json").write_text(json.dumps({"name": "lat100", "latency_ms": LATENCY_MS}))
            running[lab.prefix] = DaemonProcess(lab.config_path).start()
        return running[lab.prefix]

    yield get
    for daemon in running.values():
        daemon.stop()


@pytest.mark.parametrize("path", [
    "routed",
    "bridge-peer",
    "bridge-routed",
], indirect=True)
def test_latency_skin_adds_its_latency_to_the_guests_rtt(path, daemons):
    lab = path.lab
    daemon = daemons(lab)
    base = guest_ping(lab, "vm1", path.target)
    assert base["loss_percent"] == 0, base
    try:
        state = daemon.request("apply", vm="vm1", skin="lat100")["vms"]["vm1"]
        assert state["active"] == "lat100" and state["enforced_generation"] == state["generation"]
        skinned = guest_ping(lab, "vm1", path.target)
    finally:
        daemon.request("revert", vm="vm1")
    after = guest_ping(lab, "vm1", path.target, count=5, interval=0.1)
    rise = skinned["rtt_median_ms"] - base["rtt_median_ms"]
    print(f"\n{path.name}: RTT median {base['rtt_median_ms']:.2f} ms -> {skinned['rtt_median_ms']:.2f} ms "
          f"with latency_ms {LATENCY_MS} (rise {rise:.1f} ms); after revert {after['rtt_median_ms']:.2f} ms")
    assert skinned["loss_percent"] == 0, skinned
    assert abs(rise - LATENCY_MS) <= LATENCY_TOLERANCE_MS, f"{path.name}: RTT rose by {rise:.1f} ms, asked {LATENCY_MS}"
    assert statistics.median(after["rtts_ms"]) < base["rtt_median_ms"] + LATENCY_TOLERANCE_MS
