"""interceptor.vmset: libvirt events → what the daemon does, names, state file names; and the
pure helpers the daemon builds a libvirt VM with."""

from __future__ import annotations

import pytest

from interceptor import vmset
from interceptor.assignments import Assignment, AssignmentStore, file_name
from interceptor.engine.classify import Classifier
from interceptor.libvirt_source import Appeared, Changed, Gone, LibvirtVm

UUID = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"


def vm(name: str = "web", **fields) -> LibvirtVm:
    base = dict(name=name, domain=name.partition("/")[0], uuid=UUID, iface="net0", kind="ethernet",
                tap="vnet3", mac="52:54:00:12:34:56", mtu=1500, skin="3g", running=True)
    return LibvirtVm(**{**base, **fields})


def test_a_vm_that_appears_is_added():
    assert vmset.actions(Appeared(vm()), static=(), steered={}) == [vmset.AddVm(vm())]
    two = vm("web/net1", iface="net1")
    assert vmset.actions(Appeared(two), static=(), steered={}) == [vmset.AddVm(two)]


def test_a_static_vm_of_the_same_name_wins():
    [action] = vmset.actions(Appeared(vm()), static={"web"}, steered={})
    assert isinstance(action, vmset.Refuse)
    assert "[vms.web]" in action.reason and "wins" in action.reason


@pytest.mark.parametrize("name", ["my web", "_web", "web/net 1", "x" * 65, "a/b/c", "wéb"])
def test_a_name_outside_the_rule_is_refused_with_the_fix(name):
    [action] = vmset.actions(Appeared(vm(name)), static=(), steered={})
    assert isinstance(action, vmset.Refuse)
    assert "rename the domain" in action.reason and "alias" in action.reason


@pytest.mark.parametrize("name", ["web", "web-1.example", "web/net0", "web/uplink"])
def test_names_inside_the_rule(name):
    assert vmset.libvirt_name_ok(name)


def test_gone_removes_only_the_vm_of_that_domain():
    steered = {"web": vm()}
    assert vmset.actions(Gone(vm()), static=(), steered=steered) == [vmset.RemoveVm("web")]
    assert vmset.actions(Gone(vm(uuid="other")), static=(), steered=steered) == []
    assert vmset.actions(Gone(vm()), static=(), steered={}) == []  # refused before: nothing to do


def test_changes_split_into_wiring_entry_and_skin():
    steered = {"web": vm()}
    assert vmset.actions(Changed(vm(tap="vnet9"), vm()), (), steered) == [vmset.Rewire(vm(tap="vnet9"))]
    assert vmset.actions(Changed(vm(address="10.0.0.5"), vm()), (), steered) == [
        vmset.Rewire(vm(address="10.0.0.5"))]
    assert vmset.actions(Changed(vm(mtu=1400), vm()), (), steered) == [vmset.UpdateEntry(vm(mtu=1400))]
    # The entry is kept up to date whatever changed; a new metadata skin is acted on besides.
    assert vmset.actions(Changed(vm(skin="edge"), vm()), (), steered) == [
        vmset.UpdateEntry(vm(skin="edge")), vmset.MetadataSkin("web", "edge")]
    assert vmset.actions(Changed(vm(skin=None, mtu=9000), vm()), (), steered) == [
        vmset.UpdateEntry(vm(skin=None, mtu=9000)), vmset.MetadataSkin("web", None)]


def test_a_change_of_a_vm_not_steered_is_looked_at_as_new():
    assert vmset.actions(Changed(vm(), vm(skin=None)), (), {}) == [vmset.AddVm(vm())]


def test_the_skin_on_appearing():
    # First start: the metadata skin, if any.
    assert vmset.skin_on_appear(False, None, "3g") == ("apply", "3g")
    assert vmset.skin_on_appear(False, None, None) == ("keep", None)
    # Later starts: the stored assignment follows the VM (whatever was applied since)...
    assert vmset.skin_on_appear(True, "3g", "3g") == ("keep", None)
    assert vmset.skin_on_appear(True, None, None) == ("keep", None)
    # ...unless the metadata changed while the domain was off: that is the new desired skin.
    assert vmset.skin_on_appear(True, "3g", "edge") == ("apply", "edge")
    assert vmset.skin_on_appear(True, "3g", None) == ("revert", None)


def test_state_file_names_escape_the_slash_only_where_needed(tmp_path):
    assert file_name("vm1") == "vm1.json"
    assert file_name("web/net0") == "web%2Fnet0.json"
    assert file_name("a%2Fb") == "a%252Fb.json"  # cannot collide with an escaped name
    store = AssignmentStore(tmp_path)
    store.save(Assignment(vm="web/net0", generation=3, metadata_skin="3g"))
    assert [p.name for p in (tmp_path / "vms").iterdir()] == ["web%2Fnet0.json"]
    loaded = store.load("web/net0")
    assert (loaded.vm, loaded.generation, loaded.metadata_skin) == ("web/net0", 3, "3g")


def test_an_old_state_file_without_metadata_skin_loads(tmp_path):
    store = AssignmentStore(tmp_path)
    (tmp_path / "vms").mkdir()
    (tmp_path / "vms" / "vm1.json").write_text('{"vm": "vm1", "generation": 2}')
    assert store.load("vm1").metadata_skin is None


def test_a_removed_interface_is_no_longer_found():
    classifier: Classifier[str] = Classifier()
    classifier.add("vnet3", "web", ["10.0.0.5"])
    classifier.add("vnet4", "db")
    classifier.set_indexes({"vnet3": 7, "vnet4": 8})
    classifier.remove("vnet3")
    assert classifier.uplink(7, 0) is None and classifier.uplink(8, 0) == "db"
    assert classifier.by_address == {}
    classifier.add("vnet3", "web2")  # the name is free again (a new tap of the same name)
    classifier.set_indexes({"vnet3": 9, "vnet4": 8})
    assert classifier.uplink(9, 0) == "web2"


def test_a_libvirt_vm_as_the_daemon_sees_it():
    from interceptor import identity
    from interceptor.daemon import libvirt_original, libvirt_vm_config

    config = libvirt_vm_config(vm(address="10.0.0.5"))
    assert (config.interface, str(config.address), config.address6, config.netns) == ("vnet3", "10.0.0.5", None, None)
    assert libvirt_vm_config(vm()).address is None
    read = identity.Original(address="None", mac="aa:bb:cc:dd:ee:ff", host_mtu=1450, readable=("mac", "host_mtu"))
    original = libvirt_original(vm(mtu=1400), read)
    # MAC and MTU from the domain XML, never from a neighbour entry; the tap's MTU as read.
    assert (original["address"], original["mac"], original["mtu"], original["host_mtu"], original["readable"]) == (
        None, "52:54:00:12:34:56", 1400, 1450, ["host_mtu"])
