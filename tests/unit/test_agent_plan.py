"""The agent's decision, desired vs applied → actions, as a pure function."""

from __future__ import annotations

from manager.agent import Apply, Backoff, Refuse, Revert, plan
from manager.fleet import Desired, SkinDocument, Status


def want(name: str, generation: int = 1, at: float | None = None) -> Desired:
    return Desired(skin=SkinDocument(name=name, document={"latency_ms": 10}), generation=generation, at=at)


def done(rev: int, state: str = "enforced") -> Status:
    return Status(applied_rev=rev, state=state, at=0.0)


NOW = 1000.0


def test_new_desired_is_applied_and_applied_revision_is_skipped():
    desired = {"vm1": (5, want("slow")), "vm2": (6, want("fast"))}
    result = plan(desired, {"vm2": done(6)}, {"vm1": None, "vm2": "fast"}, NOW)
    assert result.actions == (Apply("vm1", 5, desired["vm1"][1]),)
    assert result.wake_at is None


def test_a_changed_revision_is_applied_again():
    desired = {"vm1": (9, want("slow", 2))}
    assert plan(desired, {"vm1": done(5)}, {"vm1": "slow"}, NOW).actions == (Apply("vm1", 9, desired["vm1"][1]),)


def test_drift_on_the_daemon_is_corrected():
    # The status says revision 5 is applied, but the daemon wears something else (a local apply).
    desired = {"vm1": (5, want("slow"))}
    assert plan(desired, {"vm1": done(5)}, {"vm1": "other"}, NOW).actions == (Apply("vm1", 5, desired["vm1"][1]),)


def test_a_failed_revision_is_not_retried_until_it_changes():
    desired = {"vm1": (5, want("broken"))}
    assert plan(desired, {"vm1": done(5, "failed")}, {"vm1": None}, NOW).actions == ()
    desired = {"vm1": (7, want("fixed"))}
    assert plan(desired, {"vm1": done(5, "failed")}, {"vm1": None}, NOW).actions == (Apply("vm1", 7, desired["vm1"][1]),)


def test_removed_desired_reverts_only_what_the_agent_applied():
    status = {"vm1": done(5), "vm2": done(0, "reverted"), "vm3": done(4)}
    active = {"vm1": "slow", "vm2": None, "vm3": None, "local": "hand-applied"}
    assert plan({}, status, active, NOW).actions == (Revert("vm1", on_daemon=True), Revert("vm3", on_daemon=False))


def test_unknown_vm_and_unreadable_value_are_refused_once():
    desired = {"ghost": (3, want("slow")), "vm1": (4, "not a Desired value: ...")}
    actions = plan(desired, {}, {"vm1": None}, NOW).actions
    assert [type(a) for a in actions] == [Refuse, Refuse]
    assert "not configured on this host" in actions[0].reason and "unreadable" in actions[1].reason
    assert plan(desired, {"ghost": done(3, "failed"), "vm1": done(4, "failed")}, {"vm1": None}, NOW).actions == ()


def test_a_scheduled_swap_waits_for_its_time():
    desired = {"vm1": (5, want("slow", at=NOW + 2)), "vm2": (6, want("fast", at=NOW + 1)),
               "vm3": (7, want("late", at=NOW - 1))}
    result = plan(desired, {}, {"vm1": None, "vm2": None, "vm3": None}, NOW)
    assert result.actions == (Apply("vm3", 7, desired["vm3"][1]),)
    assert result.wake_at == NOW + 1
    assert [a.vm for a in plan(desired, {}, {"vm1": None, "vm2": None, "vm3": None}, NOW + 2).actions] == \
        ["vm1", "vm2", "vm3"]


def test_backoff_doubles_to_its_cap_and_resets():
    backoff = Backoff(0.5, 3.0)
    assert [backoff.next() for _ in range(4)] == [0.5, 1.0, 2.0, 3.0]
    backoff.reset()
    assert backoff.next() == 0.5
