"""VMs found through libvirt, against a real libvirtd: the lab's own, in its hv namespace, with a
lab guest as a domain. The source must see the domain start (with its tap, bridge, MAC, MTU and
the skin in its metadata), a metadata change, a destroy, a start with a new tap, and a libvirtd
restart, each as an event within seconds; the guest answers ping from the hv side."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import trio
from pyroute2 import IPRoute

from tests.conftest import lab_skip_reason

pytestmark = pytest.mark.e2e

DOMAIN = "nskguest"
BRIDGE = "lvbr0"
EVENT_TIMEOUT_S = 20.0


def _skip_reason() -> str | None:
    from manager.libvirt_lab import libvirt_skip_reason

    if shutil.which("qemu-system-x86_64") is None:
        return "the libvirt lab needs qemu-system-x86_64: apt-get install qemu-system-x86"
    if shutil.which("virsh") is None:
        return "the libvirt lab needs virsh: apt-get install libvirt-clients"
    return lab_skip_reason() or libvirt_skip_reason()


@pytest.fixture
def libvirt_lab(lab_prefix, request):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from manager import libvirt_lab
    from manager.lab import lab_up

    lab = lab_up(lab_prefix, vms=1)
    with IPRoute(netns=lab.hv_ns, flags=0) as hv:
        hv.link("add", ifname=BRIDGE, kind="bridge")
        hv.link("set", index=hv.link_lookup(ifname=BRIDGE)[0], state="up")
    holder = {"libvirtd": libvirt_lab.start_libvirt(lab)}
    request.addfinalizer(lambda: libvirt_lab.stop_libvirt(holder["libvirtd"]))  # lab_down sweeps the rest
    return lab, holder


async def _expect(receive, wanted: dict[str, type], timeout: float = EVENT_TIMEOUT_S) -> dict:
    """The next events until each VM name in ``wanted`` had its event of that type; {name: event}."""
    got = {}
    with trio.fail_after(timeout):
        while set(got) != set(wanted):
            event = await receive.receive()
            name = event.vm.name
            assert name in wanted and isinstance(event, wanted[name]), f"unexpected {event}"
            got[name] = event
    return got


def test_a_libvirt_domain_is_followed_from_start_to_destroy_and_back(libvirt_lab):
    from interceptor.libvirt_source import NETSKIN_XMLNS, Appeared, Changed, Gone, LibvirtSource
    from manager import libvirt_lab as lvl

    lab, holder = libvirt_lab
    libvirtd = holder["libvirtd"]
    guest_dir = lab.workdir / "guests"
    guest_dir.mkdir(parents=True, exist_ok=True)
    guest = lvl.GuestDomain(name=DOMAIN, address="10.77.201.2/24", gateway="10.77.201.1", tap="lvtap0",
                            mac="02:77:00:00:c9:02", console_path=guest_dir / f"{DOMAIN}.console",
                            serial_log=guest_dir / f"{DOMAIN}.serial.log", mtu=1400, bridge=BRIDGE, skin="3g")
    primary, secondary = f"{DOMAIN}/net0", f"{DOMAIN}/net1"
    timings = {}

    # `netskin vms --watch` follows the same events from another process, as a user would.
    watch_log, watch_err = lab.workdir / "logs" / "vms-watch.jsonl", lab.workdir / "logs" / "vms-watch.err"
    with open(watch_log, "wb") as out, open(watch_err, "wb") as err:
        watcher = subprocess.Popen([sys.executable, "-m", "manager.cli", "vms", "--libvirt", libvirtd.uri_ro,
                                    "--watch", "--json"], stdout=out, stderr=err)

    async def main():
        conn = await trio.to_thread.run_sync(libvirtd.open)
        send, receive = trio.open_memory_channel(100)
        source = LibvirtSource(libvirtd.uri_ro, reconnect_min_s=0.2, reconnect_max_s=1.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, send)
            assert source.inventory.vms == {}
            dom = await trio.to_thread.run_sync(lvl.define_guest, conn, guest)
            # Defining a domain makes no VM: it does not run.
            with trio.move_on_after(1.0):
                assert False, f"event for a defined domain: {await receive.receive()}"

            t0 = time.monotonic()
            await trio.to_thread.run_sync(lvl.start_guest, dom, guest)
            t1 = time.monotonic()
            started = await _expect(receive, {primary: Appeared, secondary: Appeared})
            timings["start call (virDomainCreate)"] = t1 - t0
            timings["start → appeared"] = time.monotonic() - t0
            timings["start returned → appeared"] = time.monotonic() - t1
            net0, net1 = started[primary].vm, started[secondary].vm
            assert (net0.kind, net0.tap, net0.bridge, net0.mac, net0.mtu, net0.skin, net0.domain) == (
                "ethernet", "lvtap0", None, "02:77:00:00:c9:02", 1400, "3g", DOMAIN)
            assert (net1.kind, net1.bridge, net1.mac, net1.mtu, net1.skin) == (
                "bridge", BRIDGE, "02:77:00:00:c9:12", 1500, "3g")
            assert net1.tap and net1.tap.startswith("vnet")

            boot_s = await trio.to_thread.run_sync(lvl.wait_guest_ready, guest)
            timings["start → console answers"] = time.monotonic() - t0
            ping = await trio.to_thread.run_sync(lambda: lab.exec("hv", ["ping", "-c", "3", "-i", "0.2", "-W", "2",
                                                                        "10.77.201.2"]))
            assert ping.returncode == 0, ping.stdout + ping.stderr
            mtu = await trio.to_thread.run_sync(
                lambda: lvl.guest_console(guest).run("cat /sys/class/net/eth0/mtu", check=True).output.strip())
            assert mtu == "1400"
            listed = await trio.to_thread.run_sync(lambda: subprocess.run(
                [sys.executable, "-m", "manager.cli", "vms", "--libvirt", libvirtd.uri_ro, "--json", "--config",
                 str(lab.config_path)], capture_output=True, text=True, timeout=60))
            assert listed.returncode == 0, listed.stderr
            rows = {row["name"]: row for row in json.loads(listed.stdout)["vms"]}
            assert rows["vm1"]["source"] == "config"  # the lab's namespace VM
            assert (rows[primary]["source"], rows[primary]["tap"], rows[primary]["skin"]) == ("libvirt", "lvtap0", "3g")
            assert rows[secondary]["bridge"] == BRIDGE

            # virsh, as a libvirt user would: the skin in the domain's metadata changes.
            t0 = time.monotonic()
            virsh = await trio.to_thread.run_sync(lambda: subprocess.run(
                ["virsh", "-c", libvirtd.uri, "metadata", DOMAIN, "--uri", NETSKIN_XMLNS, "--key", "netskin",
                 "--set", '<skin name="edge"/>', "--live", "--config"], capture_output=True, text=True, timeout=30))
            assert virsh.returncode == 0, virsh.stderr
            changed = await _expect(receive, {primary: Changed, secondary: Changed})
            timings["metadata → changed"] = time.monotonic() - t0
            assert {e.vm.skin for e in changed.values()} == {"edge"}
            assert {e.before.skin for e in changed.values()} == {"3g"}

            def virsh_metadata(*argv: str) -> None:
                done = subprocess.run(["virsh", "-c", libvirtd.uri, "metadata", DOMAIN, "--uri", NETSKIN_XMLNS,
                                       *argv, "--live", "--config"], capture_output=True, text=True, timeout=30)
                assert done.returncode == 0, done.stderr

            await trio.to_thread.run_sync(virsh_metadata, "--remove")
            removed = await _expect(receive, {primary: Changed, secondary: Changed})
            assert {e.vm.skin for e in removed.values()} == {None}
            await trio.to_thread.run_sync(virsh_metadata, "--key", "netskin", "--set", '<skin name="edge"/>')
            await _expect(receive, {primary: Changed, secondary: Changed})

            # A NIC plugged into the running domain is a VM of its own (libvirt's next alias).
            t0 = time.monotonic()
            plugged = await trio.to_thread.run_sync(lambda: subprocess.run(
                ["virsh", "-c", libvirtd.uri, "attach-interface", DOMAIN, "bridge", BRIDGE, "--model", "virtio",
                 "--mac", "02:77:00:00:c9:22", "--live"], capture_output=True, text=True, timeout=60))
            assert plugged.returncode == 0, plugged.stderr
            third = f"{DOMAIN}/net2"
            added = await _expect(receive, {third: Appeared})
            timings["attach-interface → appeared"] = time.monotonic() - t0
            assert (added[third].vm.mac, added[third].vm.bridge, added[third].vm.skin) == (
                "02:77:00:00:c9:22", BRIDGE, "edge")

            t0 = time.monotonic()
            await trio.to_thread.run_sync(lvl.destroy_guest, dom)
            t1 = time.monotonic()
            gone = await _expect(receive, {primary: Gone, secondary: Gone, third: Gone})
            timings["destroy call (virDomainDestroy)"] = t1 - t0
            timings["destroy returned → gone"] = time.monotonic() - t1
            assert gone[secondary].vm.tap == net1.tap

            await trio.to_thread.run_sync(lvl.start_guest, dom, guest)
            t1 = time.monotonic()
            again = await _expect(receive, {primary: Appeared, secondary: Appeared})
            timings["start again returned → appeared"] = time.monotonic() - t1
            assert again[primary].vm.tap == "lvtap0"  # the name we chose
            assert again[secondary].vm.tap != net1.tap  # libvirt's vnetN: a new tap
            assert {e.vm.skin for e in again.values()} == {"edge"}  # --config kept it

            # libvirtd restarts; the guest runs on, so nothing is gone; events flow again after.
            await trio.to_thread.run_sync(conn.close)
            t0 = time.monotonic()
            holder["libvirtd"] = await trio.to_thread.run_sync(lvl.restart_libvirt, lab, libvirtd)
            with trio.fail_after(EVENT_TIMEOUT_S):
                while not source.connected or time.monotonic() - t0 < 0.5:
                    await trio.sleep(0.05)
            timings["libvirtd restart → reconnected"] = time.monotonic() - t0
            with trio.move_on_after(1.0):
                assert False, f"event from a libvirtd restart: {await receive.receive()}"
            conn = await trio.to_thread.run_sync(holder["libvirtd"].open)
            dom = await trio.to_thread.run_sync(conn.lookupByName, DOMAIN)
            await trio.to_thread.run_sync(lvl.destroy_guest, dom)
            t1 = time.monotonic()
            await _expect(receive, {primary: Gone, secondary: Gone})
            timings["destroy after reconnect returned → gone"] = time.monotonic() - t1
            await trio.to_thread.run_sync(dom.undefine)
            await trio.to_thread.run_sync(conn.close)
            nursery.cancel_scope.cancel()
        timings["guest boot (console)"] = boot_s

    try:
        deadline = time.monotonic() + 30
        while "following" not in watch_err.read_text():
            assert watcher.poll() is None and time.monotonic() < deadline, watch_err.read_text()
            time.sleep(0.05)
        trio.run(main)
    finally:
        watcher.terminate()
        watcher.wait(timeout=10)
    watched = [json.loads(line) for line in watch_log.read_text().splitlines() if line.startswith("{")]
    seen = [(e["event"], e["vm"]["skin"]) for e in watched if e["vm"]["name"] == primary]
    assert seen[:3] == [("appeared", "3g"), ("changed", "edge"), ("changed", None)], watch_log.read_text()[-2000:]
    assert seen[-1] == ("gone", "edge")
    print("\nlibvirt source event latencies:")
    for what, seconds in timings.items():
        print(f"  {what}: {seconds * 1000:.0f} ms")
