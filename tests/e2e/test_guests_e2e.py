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
import subprocess
import threading
import time
import tomllib

import pytest

from bench.stats import binomial_interval
from interceptor.schema import load_host_config
from manager import guests, measure
from manager.process import DaemonProcess
from tests.conftest import lab_skip_reason, unique_lab_prefix
from tests.e2e.test_manager_e2e import netskin

pytestmark = pytest.mark.e2e

LATENCY_MS = 100
LATENCY_TOLERANCE_MS = 25  # TCG guests add a few ms of scheduling noise to each RTT
MIN_TCP_MBITS = 20.0  # TCG moves hundreds of Mbit/s; this only says "iperf3 works"
RATE_KBPS = 2000
RATE_TOLERANCE = 0.10
LOSS_PERCENT = 20  # each way: a ping's round trip survives with (1 - 0.2)²
GUEST_MAC = "52:54:00:aa:bb:cc"
SKINS = {
    "lat100": {"latency_ms": LATENCY_MS},
    "rate2000": {"bandwidth_limit_kbps": RATE_KBPS},
    "loss20": {"packet_loss_percent": LOSS_PERCENT},
    "locked": {"security_profile": "restricted"},
    "lat30-mac": {"latency_ms": 30, "mac_address": GUEST_MAC},
    "mtu1400": {"mtu": 1400},
    "mtu1400-path": {"mtu": 1400, "optional": ["mtu"]},
}
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
            for name, fields in SKINS.items():
                (skins_dir / f"{name}.json").write_text(json.dumps({"name": name, **fields}))
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


# --- per path: rate, loss, a firewall profile, and an exact revert ----------------------------


def guest_identity(lab, vm: str = "vm1") -> dict:
    """What the guest and the host side say of the VM's identity: compared before and after."""
    out = lab.console(vm).run("cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu").output.split()
    tap = lab.vm(vm).interface
    host_mtu = subprocess.run(["ip", "netns", "exec", lab.hv_ns, "cat", f"/sys/class/net/{tap}/mtu"],
                              capture_output=True, text=True, check=True).stdout.strip()
    return {"mac": out[0], "mtu": int(out[1]), "host_mtu": int(host_mtu)}


def netskin_chains(lab) -> list[str]:
    """The chains that jump to a per-VM firewall chain in the hv namespace's filter table, one per jump."""
    saved = subprocess.run(["ip", "netns", "exec", lab.hv_ns, "iptables-save", "-t", "filter"],
                           capture_output=True, text=True, check=True).stdout
    return sorted(line.split()[1] for line in saved.splitlines()
                  if line.startswith("-A NETSKIN") and "-j NSKFW-" in line)


def peer_connects(path, port: int = guests.ECHO_PORT) -> bool:
    """Can vm1's peer on this path open a new TCP connection to vm1's port?"""
    address = path.lab.vm("vm1").address
    if path.peer == "vm2":
        done = path.lab.console("vm2").run(f"socat -u /dev/null TCP:{address}:{port},connect-timeout=2",
                                           timeout=20)
        return done.exit_code == 0
    with path.lab.socket("inet", socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect((address, port))
        except (TimeoutError, OSError):
            return False
        return True


@pytest.fixture
def skinned(path, daemons):
    """Apply skins to vm1 of the path's lab; at the end revert and check the revert was exact."""
    lab = path.lab
    daemon = daemons(lab)
    before = guest_identity(lab)

    def apply(skin: str) -> dict:
        state = daemon.request("apply", vm="vm1", skin=skin)["vms"]["vm1"]
        assert state["active"] == skin and state["enforced_generation"] == state["generation"], state
        return state

    yield apply
    daemon.request("revert", vm="vm1")
    state = daemon.status("vm1")["vm1"]
    assert state["active"] is None, state
    assert guest_identity(lab) == before  # MAC and MTU of the guest, MTU of the host side
    assert netskin_chains(lab) == []  # no firewall profile left in force
    assert peer_connects(path)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_rate_limit_both_ways_within_ten_percent(path, skinned):
    skinned("rate2000")
    lab = path.lab
    up = guest_iperf3(lab, "vm1", path.target, reverse=False, seconds=4) / 1000
    down = guest_iperf3(lab, "vm1", path.target, reverse=True, seconds=4) / 1000
    print(f"\n{path.name}: TCP through bandwidth_limit_kbps {RATE_KBPS}: from vm1 {up:.0f} kbit/s, "
          f"to vm1 {down:.0f} kbit/s")
    for kbps in (up, down):
        assert abs(kbps - RATE_KBPS) <= RATE_TOLERANCE * RATE_KBPS, (path.name, up, down)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_loss_inside_its_binomial_interval(path, skinned):
    skinned("loss20")
    count = 300
    result = guest_ping(path.lab, "vm1", path.target, count=count, interval=0.02)
    delivered = (1 - LOSS_PERCENT / 100) ** 2
    low, high = binomial_interval(result["sent"], delivered)
    print(f"\n{path.name}: {result['received']}/{result['sent']} pings answered with {LOSS_PERCENT} % loss "
          f"each way (99.9 % interval {low}..{high})")
    assert result["sent"] == count
    assert low <= result["received"] <= high, result


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_restricted_profile_holds_on_the_guest(path, skinned):
    assert peer_connects(path)  # the guest's TCP echo answers new connections before the profile
    skinned("locked")
    assert not peer_connects(path), f"{path.name}: a new inbound connection passed `restricted`"
    outbound = guest_ping(path.lab, "vm1", path.target, count=5, interval=0.1)  # out is allowed, replies too
    assert outbound["loss_percent"] == 0, outbound


# --- identity a guest's host cannot set --------------------------------------------------------


def test_a_mac_for_a_guest_fails_at_once_with_the_previous_skin_in_force(routed_lab, daemons):
    """1000 probes/s through the failed apply: every echo still carries the previous skin's delay."""
    lab, guest = routed_lab, routed_lab.vm("vm1")
    daemon = daemons(lab)
    try:
        daemon.request("apply", vm="vm1", skin="lat100")
        before = daemon.status("vm1")["vm1"]
        probe: dict = {}
        prober = threading.Thread(target=lambda: probe.update(measure.udp_probe(
            lab, "inet", guest.address, guests.ECHO_PORT, count=3000, rate_pps=1000, warm_up=True)))
        prober.start()
        time.sleep(1.0)
        started = time.monotonic()
        out = netskin(lab.config_path, "apply", "vm1", "lat30-mac")
        elapsed = time.monotonic() - started
        prober.join()
        after = daemon.status("vm1")["vm1"]
    finally:
        daemon.request("revert", vm="vm1")
    print(f"\nrefused in {elapsed:.2f} s: {out.stderr.strip()}\n"
          f"probe: {probe['received']}/{probe['sent']} echoed, RTT min {probe['rtt_min_ms']:.1f} ms")
    assert out.returncode == 3, out
    assert "mac_address" in out.stderr and "optional" in out.stderr
    # Refused before any swap: the same generation, active and shadow.
    assert (after["active"], after["shadow"], after["generation"], after["enforced_generation"]) == \
        (before["active"], before["shadow"], before["generation"], before["enforced_generation"])
    # No echo ever took the failed skin's 30 ms: every one carried lat100 (TCG drops a few at 1000/s).
    assert probe["received"] >= probe["sent"] // 2, probe
    assert probe["rtt_min_ms"] > LATENCY_MS - LATENCY_TOLERANCE_MS, probe


def test_a_guests_mtu_is_refused_unless_the_skin_takes_it_for_the_path(routed_lab, daemons):
    lab, guest = routed_lab, routed_lab.vm("vm1")
    daemon = daemons(lab)
    before = guest_identity(lab)
    out = netskin(lab.config_path, "apply", "vm1", "mtu1400")
    assert out.returncode == 3, out
    assert "mtu 1400" in out.stderr and "guest" in out.stderr and 'optional = ["mtu"]' in out.stderr
    try:
        state = daemon.request("apply", vm="vm1", skin="mtu1400-path")["vms"]["vm1"]
        assert state["active"] == "mtu1400-path" and not state.get("verify_problems"), state
        during = guest_identity(lab)
        # The path is 1400: 1372 bytes of ICMP payload fit, 1472 with don't-fragment do not.
        fits = measure.ping(lab, "inet", guest.address, count=3, interval=0.2, size=1372, dont_fragment=True)
        too_big = measure.ping(lab, "inet", guest.address, count=3, interval=0.2, size=1472, dont_fragment=True)
        original = state["original"]
    finally:
        daemon.request("revert", vm="vm1")
    assert during == {**before, "host_mtu": 1400}  # the guest's own eth0 untouched, the host side 1400
    assert original["mtu"] is None and original["host_mtu"] == before["host_mtu"]  # never guessed
    assert fits["loss_percent"] == 0, fits
    assert too_big["received"] == 0, too_big
    assert guest_identity(lab) == before
