"""The fleet's key layout, its JSON values, and the store's wire helpers (no etcd needed)."""

from __future__ import annotations

import base64
import json

import pytest

from interceptor.schema import ConfigError, HostConfig, load_host_config
from manager import fleet, store
from manager.fleet import Desired, HostKey, SkinDocument, Status


def test_keys():
    assert fleet.skin_key("3g") == "/netskin/skins/3g"
    assert fleet.desired_key("hv1", "vm1") == "/netskin/hosts/hv1/desired/vm1"
    assert fleet.status_key("hv1", "vm1") == "/netskin/hosts/hv1/status/vm1"
    assert fleet.conditions_key("hv1", "vm1") == "/netskin/hosts/hv1/conditions/vm1"
    assert fleet.alive_key("hv1") == "/netskin/hosts/hv1/alive"
    assert fleet.desired_key("hv1", "vm1").startswith(fleet.host_prefix("hv1"))
    assert not fleet.desired_key("hv10", "vm1").startswith(fleet.host_prefix("hv1"))


@pytest.mark.parametrize("bad", ["", "a/b", "..", "-x", "x" * 65, "a b"])
def test_names_that_cannot_be_a_key_segment(bad):
    with pytest.raises(fleet.LayoutError, match="not a valid VM name"):
        fleet.status_key("hv1", bad)


def test_parse_host_key_roundtrips_and_ignores_the_rest():
    for key, parsed in [(fleet.desired_key("h", "v"), HostKey("h", "desired", "v")),
                        (fleet.status_key("h", "v"), HostKey("h", "status", "v")),
                        (fleet.conditions_key("h", "v"), HostKey("h", "conditions", "v")),
                        (fleet.alive_key("h"), HostKey("h", "alive", None))]:
        assert fleet.parse_host_key(key) == parsed
    for key in ("/netskin/skins/x", "/netskin/hosts/h/other/v", "/netskin/hosts/h/desired/v/w", "/elsewhere"):
        assert fleet.parse_host_key(key) is None


def test_values_roundtrip_and_ignore_unknown_fields():
    desired = Desired(skin=SkinDocument(name="slow", document={"latency_ms": 100}), generation=3, at=12.5)
    assert Desired.decode(desired.encode()) == desired
    assert b"shadow" not in desired.encode()  # None is left out
    newer = json.loads(desired.encode()) | {"added_later": 1}
    assert Desired.decode(json.dumps(newer)) == desired
    with pytest.raises(ValueError, match="not a Desired value"):
        Desired.decode(b'{"skin": {"name": "x"}}')
    with pytest.raises(ValueError, match="not a Desired value"):
        Desired.decode(b"not json")


def test_status_from_daemon():
    vm_status = {"active": "slow", "shadow": None, "generation": 4, "enforced_generation": 4,
                 "verify_problems": [], "original": {"mtu": 1500}, "conditions": {}}
    desired = Desired(skin=SkinDocument(name="slow", document={}), generation=2, op="op1")
    status = fleet.status_from_daemon(vm_status, applied_rev=17, state="enforced", desired=desired, error=None, now=1.0)
    assert (status.applied_rev, status.generation, status.desired_generation, status.op) == (17, 4, 2, "op1")
    assert status.original == {"mtu": 1500}
    assert Status.decode(status.encode()) == status
    conditions = fleet.conditions_from_daemon({"active": "slow", "generation": 4, "conditions": {"uplink": {}},
                                               "out_of_tolerance": ["uplink: late"]}, now=2.0)
    assert conditions.out_of_tolerance == ["uplink: late"] and conditions.generation == 4


def test_wire_helpers():
    assert store.prefix_end("/a/") == b"/a0"
    assert store.prefix_end(b"a\xff") == b"b"
    assert store.prefix_end(b"\xff") == b"\0"
    cmp = store.compare("/k", "mod", "==", 5)
    assert cmp == {"key": base64.b64encode(b"/k").decode(), "target": "MOD", "result": "EQUAL", "mod_revision": "5"}
    assert store.compare("/k", "create", "==", 0)["create_revision"] == "0"
    put = store.put_op("/k", {"b": 1, "a": 2}, lease=7)["request_put"]
    assert base64.b64decode(put["value"]) == b'{"a":2,"b":1}' and put["lease"] == "7"
    assert "range_end" in store.delete_op("/p/", prefix=True)["request_delete_range"]


def test_parse_watch_line():
    kv = {"key": base64.b64encode(b"/k").decode(), "value": base64.b64encode(b"v").decode(),
          "mod_revision": "9", "create_revision": "8", "version": "2"}
    assert store.parse_watch_line('{"result":{"header":{"revision":"9"},"created":true}}') is None
    batch = store.parse_watch_line(json.dumps({"result": {"header": {"revision": "9"},
                                                          "events": [{"kv": kv}, {"type": "DELETE", "kv": kv}]}}))
    assert [e.type for e in batch.events] == ["PUT", "DELETE"] and batch.events[0].kv.mod_revision == 9
    assert store.parse_watch_line('{"result":{"header":{"revision":"12"}}}') == store.WatchBatch(12)  # progress
    with pytest.raises(store.Compacted) as raised:
        store.parse_watch_line('{"result":{"header":{},"canceled":true,"compact_revision":"16"}}')
    assert raised.value.revision == 16
    with pytest.raises(store.StoreUnavailable):
        store.parse_watch_line('{"result":{"canceled":true}}')


def test_store_table_in_the_host_config(tmp_path):
    path = tmp_path / "netskin.toml"
    path.write_text('[store]\nendpoints = ["https://10.99.0.1:2379"]\nhost = "hv1"\n'
                    'ca_file = "ca.pem"\ncert_file = "hv1.pem"\nkey_file = "hv1-key.pem"\n'
                    'user = "hv1"\npassword_file = "/etc/netskin/etcd-password"\n')
    config = load_host_config(path)
    assert config.store.host == "hv1" and config.store.ca_file == tmp_path / "ca.pem"
    assert str(config.store.password_file) == "/etc/netskin/etcd-password"
    assert HostConfig().store is None
    path.write_text('[store]\nendpoints = ["https://10.99.0.1:2379"]\ncert_file = "hv1.pem"\n')
    with pytest.raises(ConfigError, match="cert_file and key_file"):
        load_host_config(path)
    path.write_text('[store]\nendpoints = []\n')
    with pytest.raises(ConfigError, match="endpoints"):
        load_host_config(path)


def test_inventory_key_and_value():
    from interceptor.schema import VmConfig

    assert fleet.inventory_key("hv1") == "/netskin/hosts/hv1/inventory"
    assert fleet.parse_host_key(fleet.inventory_key("hv1")) == HostKey("hv1", "inventory", None)
    vms = {"web2": VmConfig(interface="tap-web2", address="10.0.0.3"),
           "web1": VmConfig(interface="tap-web1", address="10.0.0.2")}
    inventory = fleet.inventory_from_config("hv1", vms, 5.0)
    assert list(inventory.vms) == ["web1", "web2"]
    assert inventory.vms["web1"] == {"interface": "tap-web1", "address": "10.0.0.2"}
    assert fleet.Inventory.decode(inventory.encode()) == inventory


def test_conditions_carry_the_counters_for_rates():
    vm_status = {"active": "slow", "generation": 2, "conditions": {}, "out_of_tolerance": [],
                 "uplink": {"packets": 10, "bytes": 1000, "dropped_packets": 1, "held_packets": 0, "other": 5},
                 "downlink": {"packets": 20, "bytes": 3000, "dropped_packets": 0, "held_packets": 2}}
    conditions = fleet.conditions_from_daemon(vm_status, 1.0)
    assert conditions.counters["uplink"] == {"packets": 10, "bytes": 1000, "dropped_packets": 1, "held_packets": 0}
    assert conditions.counters["downlink"]["held_packets"] == 2
    assert fleet.Conditions.decode(conditions.encode()) == conditions
