"""The fleet lab end to end: 3 hosts × 2 VMs, etcd (TLS + auth) in its own namespace.

One scenario, in order: one apply of six VMs on three hosts changes every VM's RTT (with --at, then
without; the spread of swap times printed); etcd stopped, every host keeps its skins (RTT
measured); hv2's daemon and agent restarted while etcd is down, the skin in force on the first
packet; etcd started again, a skin changed, every host converges (time printed); `lab down`
leaves no namespace and no process.
"""

from __future__ import annotations

import time

import pytest

from manager import fleetctl, measure
from manager.etcd_lab import etcd_skip_reason
from manager.fleet_demo import SKINS, create_skins, fleet_apply, rtts
from manager.fleet_lab import fleet_lab_down, fleet_lab_up
from manager.lab import _lab_ns_re, lab_down
from tests.conftest import lab_skip_reason, unique_lab_prefix

pytestmark = pytest.mark.e2e

SLOW, STEADY = SKINS  # 200 ms and 50 ms of added RTT


def _alive(pid: int) -> bool:
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _wait(what: str, predicate, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout:g} s: {what}")


@pytest.fixture
def fleet(request):
    reason = lab_skip_reason() or etcd_skip_reason()
    if reason:
        pytest.skip(reason)
    prefix = unique_lab_prefix()
    request.addfinalizer(lambda: lab_down(prefix))
    return fleet_lab_up(prefix, hosts=3, vms=2, lease_ttl_s=3)


def apply_in_process(lab, skin: str) -> tuple[float, dict]:
    """The fleet apply as `netskin apply` does it; seconds from the committed transaction to every
    VM reported enforced, and the outcome's statuses."""
    async def go(store):
        view = await fleetctl.read_view(store)
        targets = fleetctl.resolve(view, lab.vms())
        document, revision = await fleetctl.find_skin(store, skin)
        change = fleetctl.plan_apply(view, targets, document, skin_revision=revision)
        committed = await fleetctl.commit(store, change)
        t0 = time.monotonic()
        import trio

        outcome = await fleetctl.wait_for(store, change, committed, trio.current_time() + 15)
        return time.monotonic() - t0, outcome

    seconds, outcome = lab.store_call(go)
    assert outcome.verified, (outcome.failed, outcome.pending)
    return seconds, outcome


def test_fleet_lab_apply_fail_static_and_down(fleet):
    lab = fleet
    configs = [lab.host_config(h).read_text() for h in lab.hosts]
    # NFQUEUE is per network namespace: every host's daemon binds the same queue numbers.
    assert len({line for c in configs for line in c.splitlines() if line.startswith("queue_base")}) == 1
    create_skins(lab)
    base = rtts(lab)
    assert set(base) == {f"vm{n}" for n in range(1, 7)}

    # One apply, six VMs on three hosts, swapped at one instant.
    with_at = fleet_apply(lab, SLOW, "+2s")
    assert sorted((t["host"], t["vm"], t["state"]) for t in with_at["targets"]) == [
        (f"hv{(n + 1) // 2}", f"vm{n}", "done") for n in range(1, 7)]
    slow = rtts(lab)
    for vm in base:
        assert slow[vm] > base[vm] + 150, (vm, base[vm], slow[vm])
    without_at = fleet_apply(lab, STEADY)
    steady = rtts(lab)
    for vm in base:
        assert base[vm] + 40 < steady[vm] < base[vm] + 120, (vm, base[vm], steady[vm])
    print(f"\nswap spread across 3 hosts: {with_at['spread_ms']} ms with --at "
          f"(late by {[t['late_ms'] for t in with_at['targets']]} ms), {without_at['spread_ms']} ms without")
    assert with_at["spread_ms"] < 500 and without_at["spread_ms"] < 2000

    # etcd gone: every host keeps enforcing.
    lab.stop_etcd()
    offline = rtts(lab)
    for vm in base:
        assert offline[vm] > base[vm] + 40, (vm, offline[vm])

    # hv2's daemon and agent restarted while etcd is down: the daemon re-applies its own state,
    # so the very first packet of each VM already carries the skin's delay.
    lab.stop("agent-hv2")
    lab.stop("daemon-hv2")
    lab.start_daemon("hv2")
    first = {vm: measure.ping(lab.lab_of(vm), vm, lab.inet_address, count=1)["rtt_median_ms"] for vm in ("vm3", "vm4")}
    print(f"first ping after hv2's daemon restarted with etcd down: {first} ms")
    for vm, rtt in first.items():
        assert rtt > base[vm] + 40, (vm, rtt)
    lab.start_agent("hv2")

    # etcd back: the agents reconnect; a change reaches every host.
    t0 = time.monotonic()
    lab.start_etcd()
    etcd_up_s = time.monotonic() - t0
    reconnect_s = _wait("every agent alive again", lambda: lab.alive_hosts() == set(lab.hosts), 20)
    converge_s, _ = apply_in_process(lab, SLOW)
    print(f"etcd answering after {etcd_up_s:.2f} s, every agent alive {reconnect_s:.2f} s later; "
          f"a change enforced on every host {converge_s * 1000:.0f} ms after its transaction")
    back = rtts(lab)
    for vm in base:
        assert back[vm] > base[vm] + 150, (vm, back[vm])

    # lab down (as `netskin lab down` does it): nothing left.
    pids = [p["pid"] for p in lab._state()["processes"]]
    t0 = time.monotonic()
    fleet_lab_down(lab.prefix)
    print(f"lab down in {time.monotonic() - t0:.1f} s")
    from pyroute2 import netns

    assert not [n for n in netns.listnetns() if _lab_ns_re(lab.prefix).fullmatch(n)]
    assert not [pid for pid in pids if _alive(pid)]
