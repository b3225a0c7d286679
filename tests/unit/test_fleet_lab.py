"""The fleet lab's description, without building it: names, addresses, what `lab down` finds."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.fleet import round_robin
from manager.fleet_lab import _idle_toml, _make_fleet_lab, fleet_lab_up
from manager.lab import LabError, _lab_ns_re, host_config_toml


def test_vms_are_numbered_across_the_fleet_with_addresses_of_their_own():
    lab = _make_fleet_lab("nsk", hosts=3, vms=2, members=1, workdir=Path("/tmp/x"))
    assert {name: [vm.name for vm in host.vms] for name, host in lab.hosts.items()} == {
        "hv1": ["vm1", "vm2"], "hv2": ["vm3", "vm4"], "hv3": ["vm5", "vm6"]}
    vms = [vm for host in lab.hosts.values() for vm in host.vms]
    assert len({vm.address for vm in vms}) == len({vm.mac for vm in vms}) == len({vm.netns for vm in vms}) == 6
    assert lab.lab_of("vm4").hv_ns == "nsk-hv2" and lab.host_of("vm5") == "hv3"
    assert all(host.inet_ns == "nsk-inet" for host in lab.hosts.values())
    with pytest.raises(LabError, match="no VM 'vm7'"):
        lab.host_of("vm7")


def test_lab_down_finds_every_namespace_of_a_fleet_lab():
    lab = _make_fleet_lab("nsk", hosts=12, vms=2, members=3, workdir=Path("/tmp/x"))
    pattern = _lab_ns_re("nsk")
    assert all(pattern.fullmatch(name) for name in lab.namespaces)
    assert not pattern.fullmatch("nsk1-hv1") and not pattern.fullmatch("nsk-hvx")
    assert lab.endpoints == [f"https://10.76.0.{j}:23790" for j in (1, 2, 3)]


def test_every_host_uses_the_same_queue_numbers_in_its_own_namespace():
    lab = _make_fleet_lab("nsk", hosts=2, vms=2, members=1, workdir=Path("/tmp/x"))
    configs = [host_config_toml(host) for host in lab.hosts.values()]
    assert [c.count("queue_base = 7700") for c in configs] == [1, 1]
    assert 'host_netns = "nsk-hv1"' in configs[0] and 'host_netns = "nsk-hv2"' in configs[1]


def test_idle_vms_and_the_benchmark_round_robin():
    lab = _make_fleet_lab("nsk", hosts=2, vms=1, members=1, workdir=Path("/tmp/x"), idle_vms=2)
    assert lab.idle == {"hv1": ["idle1", "idle2"], "hv2": ["idle3", "idle4"]}
    assert round_robin(lab) == ["vm1", "vm2", "idle1", "idle3", "idle2", "idle4"]
    assert '[vms.idle3]\ninterface = "idle3"\naddress = "10.78.0.4"' in _idle_toml(["idle3"])


@pytest.mark.parametrize("kwargs, message", [
    ({"hosts": 0}, "between 1 and 16"), ({"hosts": 50, "vms": 2}, "between 1 and 16"),
    ({"hosts": 10, "vms": 10}, "at most 99"), ({"etcd_members": 2}, "choose 1 or 3"),
    ({"prefix": "Bad-Prefix"}, "lowercase"),
])
def test_refused_before_anything_is_built(kwargs, message):
    with pytest.raises(LabError, match=message):
        fleet_lab_up(**kwargs)
