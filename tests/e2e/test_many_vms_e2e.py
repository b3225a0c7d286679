"""Many configured VMs: the steering a packet walks does not grow, and the last VM is shaped.

The lab's host config gets IDLE extra VMs listed before the lab's own (their interfaces do not
exist: configuring them is fine, applying a skin to them is refused). A packet of the measured
VM, listed after all of them, must walk about as many rules as with the lab's two VMs (the names
form a tree of chains), reach the daemon's one queue pair, and meet its skin.
"""

from __future__ import annotations

import time

import pytest

from manager import measure
from manager.process import DaemonProcess

pytestmark = pytest.mark.e2e

IDLE = 200


def with_idle_vms(lab, count: int) -> object:
    text = lab.config_path.read_text()
    head, first, rest = text.partition("\n[vms.")
    idle = "".join(f'\n[vms.idle{i}]\ninterface = "idle{i}"\naddress = "10.200.{i // 250}.{i % 250 + 1}"\n'
                   for i in range(count))
    path = lab.config_path.with_name(f"netskin-{count}-idle.toml")
    path.write_text(head + "\n" + idle + first + rest)
    return path


def mangle(lab) -> list[str]:
    return lab.exec("hv", ["iptables-save", "-t", "mangle"], check=True).stdout.splitlines()


def walked(rules: list[str], chain: str, device: str) -> int:
    """How many steering rules a packet entering from ``device`` walks before its queue."""
    count = 0
    for line in rules:
        if line.startswith(f"-A {chain} -i "):
            count += 1
            name = line.split()[3]
            if name == device:
                return count
            if name.endswith("+") and device.startswith(name[:-1]):
                return count + walked(rules, line.split()[-1], device)
    raise AssertionError(f"no steering rule for {device}")


def test_many_configured_vms_keep_the_steering_short_and_the_last_vm_shaped(lab, skins):
    few = DaemonProcess(lab.config_path).start()
    try:
        few_walk = walked(mangle(lab), "NETSKIN-UP", lab.vm("vm2").interface)
    finally:
        few.stop()

    path = with_idle_vms(lab, IDLE)
    started = time.monotonic()
    daemon = DaemonProcess(path).start(timeout=120)
    start_s = time.monotonic() - started
    try:
        assert list(daemon.status())[-1] == "vm2" and len(daemon.status()) == IDLE + 2
        rules = mangle(lab)
        many_walk = walked(rules, "NETSKIN-UP", lab.vm("vm2").interface)
        queue_rules = sum("NFQUEUE" in line for line in rules)
        print(f"\n{IDLE + 2} VMs: daemon answered after {start_s:.1f} s; {queue_rules} queue rules in all, "
              f"a packet of vm2 walks {many_walk} (with {len(lab.vms)} VMs: {few_walk})")
        # Four trees' leaves per VM, and one routed-onto-a-bridge set rule per downlink queue in use.
        downlinks = {vm["queues"]["downlink"] for vm in daemon.status().values()}
        assert queue_rules == 4 * (IDLE + 2) + len(downlinks)
        assert many_walk <= few_walk + 12  # a few levels of the name tree, not IDLE rules

        base = measure.ping(lab, "vm2", lab.inet_address, count=20, interval=0.05)
        state = daemon.request("apply", vm="vm2", skin=skins("rtt60", latency_ms=60))["vms"]["vm2"]
        assert state["enforced_generation"] == state["generation"]
        shaped = measure.ping(lab, "vm2", lab.inet_address, count=20, interval=0.05)
        assert base["received"] == shaped["received"] == 20
        rise = shaped["rtt_median_ms"] - base["rtt_median_ms"]
        print(f"vm2 (listed last) latency_ms 60 -> RTT median rise {rise:.2f} ms")
        assert 51 <= rise <= 69
        status = daemon.request("status")
        assert status["host"]["unclassified_packets"] == 0
        assert status["vms"]["vm2"]["uplink"]["packets"] >= 20
    finally:
        try:
            daemon.request("revert", vm="vm2")
        finally:
            daemon.stop()
    assert not any(name.startswith("netskin-") for name in lab.exec("hv", ["ipset", "list", "-n"]).stdout.split())


def test_a_recreated_tap_is_shaped_again_under_its_new_index(lab, skins):
    """A VM restarted gets a new tap: same name, new index. The kernel's rules match it by name at
    once; the daemon learns the new index from the first packet it cannot place (fail_mode's
    verdict for that one) or within a second, and shapes it again."""
    vm = lab.vm("vm1")
    daemon = DaemonProcess(lab.config_path).start()
    try:
        base = measure.ping(lab, "vm1", lab.inet_address, count=10, interval=0.05)["rtt_median_ms"]
        daemon.request("apply", vm="vm1", skin=skins("rtt40", latency_ms=40))
        before = lab.exec("hv", ["cat", f"/sys/class/net/{vm.interface}/ifindex"], check=True).stdout.strip()

        lab.exec("hv", ["ip", "link", "del", vm.interface], check=True)
        lab.exec("hv", ["ip", "link", "add", vm.interface, "type", "veth", "peer", "name", "eth0",
                        "netns", lab.resolve_ns("vm1")], check=True)
        lab.exec("hv", ["ip", "addr", "add", f"{vm.gateway}/24", "dev", vm.interface], check=True)
        lab.exec("hv", ["ip", "link", "set", vm.interface, "up"], check=True)
        for argv in (["ip", "link", "set", "eth0", "address", vm.mac], ["ip", "addr", "add", f"{vm.address}/24", "dev", "eth0"],
                     ["ip", "link", "set", "eth0", "up"], ["ip", "route", "add", "default", "via", vm.gateway]):
            lab.exec("vm1", argv, check=True)
        after = lab.exec("hv", ["cat", f"/sys/class/net/{vm.interface}/ifindex"], check=True).stdout.strip()
        assert after != before
        time.sleep(1.5)  # the link comes up (carrier) and the daemon has read the indexes again

        shaped = measure.ping(lab, "vm1", lab.inet_address, count=20, interval=0.05)
        rise = shaped["rtt_median_ms"] - base
        unclassified = daemon.request("status")["host"]["unclassified_packets"]
        print(f"\ntap recreated (index {before} -> {after}): RTT median rise {rise:.2f} ms for latency_ms 40; "
              f"{unclassified} packet(s) met fail_mode before the new index was known")
        assert shaped["received"] == 20
        assert 34 <= rise <= 46
    finally:
        try:
            daemon.request("revert", vm="vm1")
        finally:
            daemon.stop()
