"""The daemon following libvirt, against the lab's libvirtd: a domain started with a skin in its
metadata wears it from its first packets; destroyed and started again (a new tap) it wears it
again; a skin applied through the CLI follows the VM across the next stop/start; `netskin status`
names the domain; a metadata change while it runs applies the new skin, its removal reverts. Pings from the hv side start right after each start, so the first reply is
among the guest's first packets."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from tests.e2e.test_libvirt_e2e import _skip_reason

pytestmark = pytest.mark.e2e

DOMAIN = "nskskin"
ADDRESS = "10.77.203.2"
PING_DEADLINE_S = 90  # a TCG guest on a busy 2-core host boots in ~15 s


@pytest.fixture
def libvirt_daemon_lab(lab_prefix, request):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from manager import libvirt_lab
    from manager.lab import lab_up

    lab = lab_up(lab_prefix, vms=1)
    libvirtd = libvirt_lab.start_libvirt(lab)
    request.addfinalizer(lambda: libvirt_lab.stop_libvirt(libvirtd))  # lab_down sweeps the rest
    return lab, libvirtd


def _first_reply_ms(lab, daemon, started: float) -> tuple[float, float]:
    """Ping the guest from the hv side until it answers: (the first reply's RTT, seconds from
    ``started`` to that reply). One echo request at a time (ping gives up on "host unreachable"
    while the guest boots). ``-U``: user-to-user time; the kernel's receive timestamp is taken
    before the uplink's NFQUEUE hold on the host, so without it a host-side ping misses half."""
    deadline = time.monotonic() + PING_DEADLINE_S
    output = ""
    while time.monotonic() < deadline:
        output = lab.exec("hv", ["ping", "-n", "-U", "-c", "1", "-W", "1", ADDRESS], timeout=10).stdout
        found = re.search(r"time=([\d.]+) ms", output)
        if found:
            return float(found.group(1)), time.monotonic() - started
        time.sleep(0.1)
    pytest.fail(f"the guest never answered ping within {PING_DEADLINE_S} s: {output}\n{daemon.log()}")


def _wait_enforced(daemon, skin: str, started: float, timeout: float = 20.0) -> float:
    """Seconds from ``started`` until the daemon steers the domain's VM with ``skin`` in force."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        vm = daemon.status().get(DOMAIN)
        if vm and vm["active"] == skin and vm["enforced_generation"] == vm["generation"]:
            return time.monotonic() - started
        time.sleep(0.01)
    pytest.fail(f"{skin} not in force on {DOMAIN} within {timeout} s:\n{daemon.log()}")


def _wait_gone(daemon, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while DOMAIN in daemon.status():
        assert time.monotonic() < deadline, f"{DOMAIN} still steered after destroy:\n{daemon.log()}"
        time.sleep(0.05)


def _cli(lab, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "manager.cli", *argv, "--config", str(lab.config_path)],
                          capture_output=True, text=True, timeout=60)


def test_a_skin_follows_its_libvirt_vm_from_its_first_packets(libvirt_daemon_lab):
    from interceptor.libvirt_source import NETSKIN_XMLNS
    from interceptor.schema import load_host_config
    from manager import libvirt_lab as lvl
    from manager.process import DaemonProcess

    lab, libvirtd = libvirt_daemon_lab
    skins_dir = load_host_config(lab.config_path).skins_dir
    skins_dir.mkdir(parents=True, exist_ok=True)
    (skins_dir / "slow100.json").write_text(json.dumps({"name": "slow100", "latency_ms": 100}))
    (skins_dir / "slow40.json").write_text(json.dumps({"name": "slow40", "latency_ms": 40}))
    with open(lab.config_path, "a") as config:
        config.write(f"\n[libvirt]\nuri = {json.dumps(libvirtd.uri_ro)}\n")
    guest_dir = lab.workdir / "guests"
    guest_dir.mkdir(parents=True, exist_ok=True)
    guest = lvl.GuestDomain(name=DOMAIN, address=f"{ADDRESS}/24", gateway="10.77.203.1", tap="lvtap3",
                            mac="02:77:00:00:cb:02", console_path=guest_dir / f"{DOMAIN}.console",
                            serial_log=guest_dir / f"{DOMAIN}.serial.log", address6="fd77:cb::2/64",
                            gateway6="fd77:cb::1", skin="slow100")
    conn = libvirtd.open()
    dom = lvl.define_guest(conn, guest)
    times = {}
    daemon = DaemonProcess(lab.config_path, lab.workdir / "logs" / "interceptor-libvirt.log").start()
    try:
        assert DOMAIN not in daemon.status()  # defined, not running: no VM

        # First start: the metadata's skin.
        lvl.start_guest(dom, guest)
        started = time.monotonic()
        times["start returned → VM listed with its skin (1st start)"] = _wait_enforced(daemon, "slow100", started)
        rtt, times["start → first ping reply (1st start)"] = _first_reply_ms(lab, daemon, started)
        times["first reply RTT (1st start, skin 100 ms)"] = rtt / 1000
        assert rtt >= 95, f"first reply after start took {rtt} ms: the skin was not in force"
        status = daemon.status(DOMAIN)[DOMAIN]
        assert (status["domain"], status["interface"], status["original"]["mac"]) == (
            DOMAIN, "lvtap3", "02:77:00:00:cb:02")
        assert status["uplink"]["packets"] > 0

        # destroy + start: a new tap, the same skin, before the guest's first packet.
        lvl.destroy_guest(dom)
        _wait_gone(daemon)
        lvl.start_guest(dom, guest)
        started = time.monotonic()
        times["start returned → VM listed with its skin (2nd start)"] = _wait_enforced(daemon, "slow100", started)
        rtt, times["start → first ping reply (2nd start)"] = _first_reply_ms(lab, daemon, started)
        times["first reply RTT (2nd start, skin 100 ms)"] = rtt / 1000
        assert rtt >= 95, f"first reply after the restart took {rtt} ms: the skin did not come back"

        # A skin applied through the CLI is the VM's from now on, whatever the metadata says.
        applied = _cli(lab, "apply", DOMAIN, "slow40")
        assert applied.returncode == 0, applied.stdout + applied.stderr
        lvl.destroy_guest(dom)
        _wait_gone(daemon)
        lvl.start_guest(dom, guest)
        started = time.monotonic()
        times["start returned → VM listed with its skin (3rd start)"] = _wait_enforced(daemon, "slow40", started)
        rtt, times["start → first ping reply (3rd start)"] = _first_reply_ms(lab, daemon, started)
        times["first reply RTT (3rd start, skin 40 ms)"] = rtt / 1000
        assert rtt >= 38, f"first reply after the restart took {rtt} ms: slow40 was not in force"
        # The first reply may also wait for the guest's ARP; the next ones show it is slow40, not slow100.
        more = lab.exec("hv", ["ping", "-n", "-U", "-c", "3", "-i", "0.2", ADDRESS]).stdout
        rtts = sorted(float(x) for x in re.findall(r"time=([\d.]+) ms", more))
        assert len(rtts) == 3 and 38 <= rtts[1] < 95, more

        listed = _cli(lab, "status", "--json")
        assert listed.returncode == 0, listed.stderr
        vms = json.loads(listed.stdout)["vms"]
        assert (vms[DOMAIN]["domain"], vms[DOMAIN]["active"], vms[DOMAIN]["shadow"]) == (DOMAIN, "slow40", "slow100")
        assert vms["vm1"]["domain"] is None  # the lab's [vms.vm1]
        table = _cli(lab, "status")
        assert table.returncode == 0, table.stdout + table.stderr
        assert f"{DOMAIN}: libvirt domain {DOMAIN}, tap lvtap3" in table.stdout, table.stdout

        # A metadata change while the domain runs is a new desired skin; its removal reverts.
        def virsh_metadata(*argv: str) -> None:
            done = subprocess.run(["virsh", "-c", libvirtd.uri, "metadata", DOMAIN, "--uri", NETSKIN_XMLNS, *argv,
                                   "--live", "--config"], capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stderr

        # (The metadata still names slow100: removing it reverts, setting it again applies it.)
        virsh_metadata("--remove")
        deadline = time.monotonic() + 20
        while daemon.status(DOMAIN)[DOMAIN]["active"] is not None:
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        assert daemon.status(DOMAIN)[DOMAIN]["shadow"] == "slow40"
        started = time.monotonic()
        virsh_metadata("--key", "netskin", "--set", '<skin name="slow100"/>')
        times["virsh metadata --set → skin in force"] = _wait_enforced(daemon, "slow100", started)
    finally:
        lvl.destroy_guest(dom)
        dom.undefine()
        conn.close()
        daemon.stop()
    steered = re.findall(rf"vm {DOMAIN}: from libvirt domain .* steered in (\d+) ms", daemon.log())
    times.update({f"Appeared → rules installed, skin in force (daemon log, start {i})": int(ms) / 1000
                  for i, ms in enumerate(steered, 1)})
    print("\nlibvirt VM, skin from the domain's metadata:")
    for what, seconds in times.items():
        print(f"  {what}: {seconds * 1000:.0f} ms")
