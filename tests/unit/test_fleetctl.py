"""The manager's fleet side without etcd: names, planned transactions, verification, status rows, --at."""

from __future__ import annotations

import datetime as dt

import pytest

from manager import fleet, fleetctl
from manager.fleet import Alive, Conditions, Desired, Inventory, SkinDocument, Status
from manager.fleetctl import Change, FleetError, FleetView, Step, Target
from manager.store import KeyValue, b64, unb64

SLOW = SkinDocument(name="slow", document={"name": "slow", "latency_ms": 200})
FAST = SkinDocument(name="fast", document={"name": "fast", "latency_ms": 5})


def kv(key: str, value, mod: int = 1) -> KeyValue:
    data = value.encode() if hasattr(value, "encode") and not isinstance(value, str) else value
    return KeyValue(key=key, value=data if isinstance(data, bytes) else data.encode(), create_revision=mod,
                    mod_revision=mod, version=1)


def alive(host: str) -> Alive:
    return Alive(host=host, pid=7, started_at=1.0, beat_at=99.0, in_sync=True, lease_ttl_s=10)


def inventory(host: str, *vms: str) -> Inventory:
    return Inventory(host=host, vms={vm: {"interface": f"tap-{vm}", "address": "10.0.0.2"} for vm in vms}, at=1.0)


def view(*kvs: KeyValue, revision: int = 50) -> FleetView:
    return FleetView.from_kvs(revision, kvs)


def fleet_of_two() -> FleetView:
    """hv1 (alive): web1 wearing slow at revision 10, web2 bare; hv2 (stale): db1, and dup on both."""
    return view(
        kv(fleet.alive_key("hv1"), alive("hv1")),
        kv(fleet.inventory_key("hv1"), inventory("hv1", "web1", "web2", "dup")),
        kv(fleet.desired_key("hv1", "web1"), Desired(skin=SLOW, shadow=FAST, generation=3), mod=10),
        kv(fleet.status_key("hv1", "web1"), Status(applied_rev=10, state="enforced", skin="slow", generation=7,
                                                  enforced_generation=7, at=2.0), mod=11),
        kv(fleet.inventory_key("hv2"), inventory("hv2", "db1", "dup")),
        kv("/netskin/hosts/hv2/something-else", b"x"),
    )


def test_view_hosts_alive_or_stale_and_their_vms():
    v = fleet_of_two()
    assert list(v.hosts) == ["hv1", "hv2"]
    assert v.hosts["hv1"].state == "alive" and v.hosts["hv2"].state == "stale"
    assert v.hosts["hv1"].vms() == ["dup", "web1", "web2"]
    assert v.hosts["hv2"].vms() == ["db1", "dup"]
    assert v.hosts["hv1"].desired["web1"][0] == 10


def test_a_vm_known_only_from_its_status_or_desired_key_is_listed():
    v = view(kv(fleet.status_key("hv3", "old"), Status(applied_rev=0, state="reverted", at=1.0)))
    assert v.hosts["hv3"].vms() == ["old"]


def test_resolve_names():
    v = fleet_of_two()
    assert fleetctl.resolve(v, ["web1", "db1", "hv2/dup", "web1"]) == [
        Target("hv1", "web1"), Target("hv2", "db1"), Target("hv2", "dup")]
    with pytest.raises(FleetError) as err:
        fleetctl.resolve(v, ["dup", "web9", "hv9/web1", "hv1/db1"])
    assert err.value.lines == [
        "VM 'dup' is on hosts hv1, hv2; name it as HOST/VM (hv1/dup, hv2/dup)",
        "unknown VM 'web9' (did you mean 'web2'?); `netskin status` lists the fleet's VMs",
        "unknown host 'hv9' in 'hv9/web1' (did you mean 'hv2'?); `netskin status` lists the fleet's hosts",
        "host 'hv1' has no VM 'db1'; its VMs: dup, web1, web2",
    ]


def test_split_names():
    assert fleetctl.split_names("web1, hv2/db1") == ["web1", "hv2/db1"]
    with pytest.raises(FleetError, match="empty VM name"):
        fleetctl.split_names("web1,,db1")


def test_plan_apply_guards_every_key_and_keeps_the_shadow():
    v = fleet_of_two()
    change = fleetctl.plan_apply(v, [Target("hv1", "web1"), Target("hv1", "web2")], FAST, skin_revision=4,
                                 at=123.0, op="op1")
    first, second = change.steps
    assert (first.revision, first.after.generation, first.after.shadow, first.after.at) == (10, 4, SLOW, 123.0)
    assert (second.revision, second.before, second.after.generation, second.after.shadow) == (0, None, 1, None)
    compares = change.compares()
    assert [unb64(c["key"]).decode() for c in compares] == [fleet.desired_key("hv1", "web1"),
                                                          fleet.desired_key("hv1", "web2"), fleet.skin_key("fast")]
    assert [c["mod_revision"] for c in compares] == ["10", "0", "4"]
    writes = change.writes()
    assert Desired.decode(unb64(writes[1]["request_put"]["value"])).op == "op1"


def test_plan_rollback_swaps_skin_and_shadow_and_needs_a_shadow():
    v = fleet_of_two()
    change = fleetctl.plan_rollback(v, [Target("hv1", "web1")], op="op2")
    after = change.steps[0].after
    assert (after.skin, after.shadow, after.generation) == (FAST, SLOW, 4)
    with pytest.raises(FleetError, match="hv1/web2: no shadow skin in the store"):
        fleetctl.plan_rollback(v, [Target("hv1", "web1"), Target("hv1", "web2")])


def test_plan_revert_deletes_the_desired_key():
    v = fleet_of_two()
    change = fleetctl.plan_revert(v, [Target("hv1", "web1")])
    assert change.steps[0].after is None
    assert "request_delete_range" in change.writes()[0]
    with pytest.raises(FleetError, match="hv1/web2: wears no skin from the fleet"):
        fleetctl.plan_revert(v, [Target("hv1", "web2")])


def test_plan_restore_puts_back_what_was_there():
    v = fleet_of_two()
    change = fleetctl.plan_apply(v, [Target("hv1", "web1"), Target("hv1", "web2")], FAST, at=500.0, op="op3")
    back = fleetctl.plan_restore(change, 60)
    web1, web2 = back.steps
    assert web1.revision == web2.revision == 60
    assert (web1.after.skin, web1.after.shadow, web1.after.generation, web1.after.at) == (SLOW, FAST, 5, None)
    assert web2.after is None  # it had no desired key: the key goes again
    # Restoring a revert: the key is absent now (revision 0) and comes back.
    reverted = fleetctl.plan_revert(v, [Target("hv1", "web1")])
    again = fleetctl.plan_restore(reverted, 61).steps[0]
    assert again.revision == 0 and again.after.skin == SLOW and again.after.generation == 4


def test_conflicts_name_what_moved():
    v = fleet_of_two()
    change = fleetctl.plan_apply(v, [Target("hv1", "web1"), Target("hv1", "web2")], FAST, skin_revision=4)
    now = [[kv(fleet.desired_key("hv1", "web1"), b"{}", mod=10)], [kv(fleet.desired_key("hv1", "web2"), b"{}", mod=55)],
           [kv(fleet.skin_key("fast"), b"{}", mod=4)]]
    lines = fleetctl.conflicts(change, now)
    assert len(lines) == 1 and lines[0].startswith("hv1/web2 changed meanwhile (its desired key is at revision 55, "
                                                   "expected absent)")
    now[2] = [kv(fleet.skin_key("fast"), b"{}", mod=9)]
    assert "skin 'fast' changed in the store meanwhile" in fleetctl.conflicts(change, now)[1]


def status(rev: int, state: str = "enforced", skin: str = "fast", **extra) -> Status:
    return Status(applied_rev=rev, state=state, skin=skin, generation=5, enforced_generation=5, at=1.0, **extra)


def test_step_done():
    step = Step(Target("h", "v"), 10, None, Desired(skin=FAST, generation=1))
    assert fleetctl.step_done(step, 60, None) == "pending"
    assert fleetctl.step_done(step, 60, status(10)) == "pending"  # an older revision
    assert fleetctl.step_done(step, 60, status(60)) == "done"
    assert fleetctl.step_done(step, 60, status(60, "failed", error="boom")) == "failed"
    assert fleetctl.step_done(step, 60, status(60, verify_problems=["mtu is 1500"])) == "failed"
    lagging = Status(applied_rev=60, state="enforced", skin="fast", generation=6, enforced_generation=5, at=1.0)
    assert fleetctl.step_done(step, 60, lagging) == "pending"
    revert = Step(Target("h", "v"), 10, Desired(skin=FAST, generation=1), None)
    assert fleetctl.step_done(revert, 60, status(10)) == "pending"
    assert fleetctl.step_done(revert, 60, status(0, "reverted", skin=None)) == "done"


def test_status_rows():
    v = fleet_of_two()
    hosts = {row["host"]: row for row in fleetctl.host_rows(v, now=100.0)}
    assert hosts["hv1"]["state"] == "alive" and hosts["hv1"]["beat_age_s"] == 1.0
    assert hosts["hv2"] == {"host": "hv2", "state": "stale", "in_sync": None, "pid": None, "beat_age_s": None,
                            "lease_ttl_s": None, "vms": ["db1", "dup"]}
    rows = {(row["host"], row["vm"]): row for row in fleetctl.vm_rows(v)}
    web1 = rows[("hv1", "web1")]
    assert (web1["desired"], web1["shadow"], web1["active"], web1["applied"], web1["enforced"]) == (
        "slow", "fast", "slow", True, True)
    assert rows[("hv1", "web2")]["applied"] is False and rows[("hv1", "web2")]["desired"] is None
    assert rows[("hv2", "db1")]["host_state"] == "stale"


def test_top_rows_rates_between_two_snapshots():
    def cond(at: float, packets: int) -> Conditions:
        return Conditions(skin="slow", generation=2, at=at, out_of_tolerance=["delay"],
                          conditions={"uplink": {"asked": {"delay_ms": 100, "loss_percent": 1},
                                                 "measured": {"added_delay_ms": {"p50": 99.5}, "loss_percent": 0.9}}},
                          counters={"uplink": {"packets": packets, "bytes": packets * 100, "dropped_packets": 0,
                                               "held_packets": 3}})
    first = view(kv(fleet.conditions_key("hv1", "web1"), cond(10.0, 100)))
    second = view(kv(fleet.conditions_key("hv1", "web1"), cond(12.0, 300)))
    assert fleetctl.top_rows(first, None)[0]["packets_per_s"] is None
    up = fleetctl.top_rows(second, first)[0]
    assert up["direction"] == "uplink" and up["packets_per_s"] == 100 and up["kbit_per_s"] == 80
    assert (up["asked_delay_ms"], up["measured_delay_ms"], up["held_packets"]) == (100, 99.5, 3)
    assert up["host_state"] == "stale"


def test_parse_at():
    now = 1_800_000_000.0
    assert fleetctl.parse_at("+30s", now) == now + 30
    assert fleetctl.parse_at("+2m", now) == now + 120
    assert fleetctl.parse_at("+500ms", now) == now + 0.5
    assert fleetctl.parse_at(str(now + 5), now) == now + 5
    stamp = dt.datetime.fromtimestamp(now + 3600, dt.timezone.utc)
    assert fleetctl.parse_at(stamp.isoformat().replace("+00:00", "Z"), now) == now + 3600
    assert fleetctl.parse_at(stamp.strftime("%H:%M:%S"), now) == now + 3600
    with pytest.raises(FleetError, match="has passed"):
        fleetctl.parse_at(str(now - 60), now)
    with pytest.raises(FleetError, match="not a time"):
        fleetctl.parse_at("soon", now)


def test_skin_document_is_validated():
    assert fleetctl.skin_document("slow", {"latency_ms": 100}).name == "slow"
    with pytest.raises(fleetctl.SkinError):
        fleetctl.skin_document("slow", {"latency_ms": -1})


def test_wearers():
    assert fleetctl.wearers(fleet_of_two(), "slow") == [Target("hv1", "web1")]
    assert fleetctl.wearers(fleet_of_two(), "fast") == []


def test_change_reads_cover_the_compared_keys():
    change = Change("op", "apply", (Step(Target("h", "v"), 3, None, Desired(skin=FAST, generation=1)),),
                    (fleet.skin_key("fast"), 2))
    assert [r["request_range"]["key"] for r in change.reads()] == [b64(fleet.desired_key("h", "v")),
                                                                   b64(fleet.skin_key("fast"))]
