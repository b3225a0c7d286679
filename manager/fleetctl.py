"""The manager's side of the fleet: what `netskin` and `netskin serve` do with a ``[store]`` and no VMs.

The pure part reads one snapshot of ``/netskin/hosts/`` (``FleetView``), resolves ``VM`` and
``HOST/VM`` names against what the hosts publish (inventory, desired and status keys), plans a
change of many desired keys as one guarded etcd transaction, tells alive from stale hosts and
builds the status rows. The async part below it is a thin shell over ``Store``: commit the
transaction, wait for every target to report the new revision enforced, and on a timeout write
the previous values back, again in one transaction.

A stale host (its alive key gone with its lease) is only reported: its VMs keep what they wear.
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import trio

from interceptor.library import Entry, preset_entries
from interceptor.schema import SkinError, UserError, validate_skin
from manager import fleet
from manager.fleet import Alive, Conditions, Desired, Inventory, SkinDocument, Status
from manager.store import KeyValue, Store, compare, delete_op, put_op, range_op

MAX_TARGETS = 100  # etcd allows 128 operations per transaction by default; the skin key is one more
POLL_S = 0.1
WAIT_S = 10.0


class FleetError(UserError):
    """A fleet request that cannot be done as asked (unknown VM or skin, ambiguous name): exit 1."""


class NotFound(FleetError):
    """An unknown VM, host or skin (the API's 404)."""


class Refused(FleetError):
    """Known names, refused for their state: a skin that exists or is worn, a VM without a shadow (409)."""


class Conflict(FleetError):
    """A target's desired key changed between reading and writing: nothing was written."""

    def __init__(self, lines: list[str], vms: list[str]) -> None:
        super().__init__(lines)
        self.vms = vms


# --- the snapshot -----------------------------------------------------------------------------


@dataclass
class HostView:
    name: str
    alive: Alive | None = None
    inventory: Inventory | None = None
    desired: dict[str, tuple[int, Desired | str]] = field(default_factory=dict)  # VM → (mod_revision, value)
    status: dict[str, Status] = field(default_factory=dict)
    conditions: dict[str, Conditions] = field(default_factory=dict)

    @property
    def state(self) -> Literal["alive", "stale"]:
        """Alive while its agent's leased key exists; stale once the lease expired (agent dead or cut off)."""
        return "alive" if self.alive is not None else "stale"

    def vms(self) -> list[str]:
        names = set(self.desired) | set(self.status)
        if self.inventory is not None:
            names |= set(self.inventory.vms)
        return sorted(names)


@dataclass
class FleetView:
    revision: int
    hosts: dict[str, HostView]

    @classmethod
    def from_kvs(cls, revision: int, kvs: Iterable[KeyValue]) -> FleetView:
        """From a range of ``/netskin/hosts/``; keys outside the layout and unreadable values are skipped
        (an unreadable desired value is kept as its problem: it still has a revision to compare)."""
        hosts: dict[str, HostView] = {}
        for kv in kvs:
            key = fleet.parse_host_key(kv.key)
            if key is None:
                continue
            host = hosts.setdefault(key.host, HostView(key.host))
            try:
                if key.kind == "desired":
                    host.desired[key.vm] = (kv.mod_revision, _desired_or_problem(kv.value))
                elif key.kind == "status":
                    host.status[key.vm] = Status.decode(kv.value)
                elif key.kind == "conditions":
                    host.conditions[key.vm] = Conditions.decode(kv.value)
                elif key.kind == "alive":
                    host.alive = Alive.decode(kv.value)
                elif key.kind == "inventory":
                    host.inventory = Inventory.decode(kv.value)
            except ValueError:
                continue
        return cls(revision, dict(sorted(hosts.items())))


def _desired_or_problem(value: bytes) -> Desired | str:
    try:
        return Desired.decode(value)
    except ValueError as exc:
        return str(exc)


# --- names --------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Target:
    host: str
    vm: str

    def __str__(self) -> str:
        return f"{self.host}/{self.vm}"


def split_names(text: str) -> list[str]:
    """``vm1,hv2/vm3`` → ["vm1", "hv2/vm3"]."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise FleetError(f"{text!r}: an empty VM name; give VM[,VM…] (HOST/VM names a VM on one host)")
    return names


def resolve(view: FleetView, names: Iterable[str]) -> list[Target]:
    """Each ``VM`` or ``HOST/VM`` as the one VM it names; ``FleetError`` with every problem otherwise."""
    targets: list[Target] = []
    problems: list[str] = []
    for name in names:
        try:
            target = _resolve_one(view, name)
        except FleetError as exc:
            problems += exc.lines
            continue
        if target not in targets:
            targets.append(target)
    if problems:
        raise (NotFound if all(p.startswith(("unknown", "host")) for p in problems) else FleetError)(problems)
    if len(targets) > MAX_TARGETS:
        raise FleetError(f"{len(targets)} VMs in one call; one transaction takes at most {MAX_TARGETS}: "
                         f"split them into several calls")
    return targets


def _resolve_one(view: FleetView, name: str) -> Target:
    if "/" in name:
        host, _, vm = name.partition("/")
        if host not in view.hosts:
            raise NotFound(f"unknown host {host!r} in {name!r}{_hint(host, view.hosts)}; "
                             f"`netskin status` lists the fleet's hosts")
        if vm not in view.hosts[host].vms():
            raise NotFound(f"host {host!r} has no VM {vm!r}{_hint(vm, view.hosts[host].vms())}; "
                             f"its VMs: {', '.join(view.hosts[host].vms()) or 'none published yet'}")
        return Target(host, vm)
    hosts = [host for host, hv in view.hosts.items() if name in hv.vms()]
    if not hosts:
        every = sorted({vm for hv in view.hosts.values() for vm in hv.vms()})
        raise NotFound(f"unknown VM {name!r}{_hint(name, every)}; `netskin status` lists the fleet's VMs")
    if len(hosts) > 1:
        raise FleetError(f"VM {name!r} is on hosts {', '.join(hosts)}; name it as HOST/VM "
                         f"({', '.join(f'{h}/{name}' for h in hosts)})")
    return Target(hosts[0], name)


def _hint(name: str, known: Iterable[str]) -> str:
    near = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


# --- planning a change ------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One target's desired key: from what (``revision``, 0 = absent; ``before``) to what (``after``,
    None = delete)."""

    target: Target
    revision: int
    before: Desired | None
    after: Desired | None


@dataclass(frozen=True)
class Change:
    op: str
    verb: str  # "apply", "rollback", "revert"
    steps: tuple[Step, ...]
    skin_guard: tuple[str, int] | None = None  # (skin key, mod_revision) the copies were taken at
    at: float | None = None

    def compares(self) -> list[dict]:
        guards = [compare(fleet.desired_key(s.target.host, s.target.vm), "mod", "==", s.revision) for s in self.steps]
        if self.skin_guard is not None:
            guards.append(compare(self.skin_guard[0], "mod", "==", self.skin_guard[1]))
        return guards

    def writes(self) -> list[dict]:
        return [_write(step.target, step.after) for step in self.steps]

    def reads(self) -> list[dict]:
        """On a failed compare: the compared keys as they are now, to name what moved."""
        keys = [fleet.desired_key(s.target.host, s.target.vm) for s in self.steps]
        return [range_op(key) for key in keys] + ([range_op(self.skin_guard[0])] if self.skin_guard else [])


def _write(target: Target, value: Desired | None) -> dict:
    key = fleet.desired_key(target.host, target.vm)
    return delete_op(key) if value is None else put_op(key, value.encode())


def new_op() -> str:
    return secrets.token_hex(4)


def _current(view: FleetView, target: Target) -> tuple[int, Desired | str | None]:
    return view.hosts[target.host].desired.get(target.vm, (0, None))


def plan_apply(view: FleetView, targets: list[Target], skin: SkinDocument, *, skin_revision: int | None = None,
               at: float | None = None, op: str | None = None) -> Change:
    """Every target wears ``skin`` (the copy taken now); what it wore becomes its shadow."""
    op = op or new_op()
    steps = []
    for target in targets:
        revision, before = _current(view, target)
        before = before if isinstance(before, Desired) else None
        after = Desired(skin=skin, generation=(before.generation + 1) if before else 1,
                        shadow=before.skin if before else None, at=at, op=op)
        steps.append(Step(target, revision, before, after))
    guard = (fleet.skin_key(skin.name), skin_revision) if skin_revision else None
    return Change(op, "apply", tuple(steps), guard, at)


def plan_rollback(view: FleetView, targets: list[Target], *, op: str | None = None) -> Change:
    """Every target swaps its skin and its shadow."""
    op = op or new_op()
    steps, problems = [], []
    for target in targets:
        revision, before = _current(view, target)
        if not isinstance(before, Desired) or before.shadow is None:
            problems.append(f"{target}: no shadow skin in the store to roll back to; "
                            f"`netskin apply {target} SKIN` sets one")
            continue
        after = Desired(skin=before.shadow, shadow=before.skin, generation=before.generation + 1, op=op)
        steps.append(Step(target, revision, before, after))
    if problems:
        raise Refused(problems)
    return Change(op, "rollback", tuple(steps))


def plan_revert(view: FleetView, targets: list[Target], *, op: str | None = None) -> Change:
    """Every target's desired key goes: its agent reverts the VM to its original configuration."""
    op = op or new_op()
    steps, problems = [], []
    for target in targets:
        revision, before = _current(view, target)
        if revision == 0:
            problems.append(f"{target}: wears no skin from the fleet (no desired key); nothing to revert")
            continue
        steps.append(Step(target, revision, before if isinstance(before, Desired) else None, None))
    if problems:
        raise Refused(problems)
    return Change(op, "revert", tuple(steps))


def plan_restore(change: Change, revision: int) -> Change:
    """Put back what every target had before ``change`` (committed at ``revision``); the generation
    still counts up, and a scheduled instant of the old value is not waited for again."""
    steps = []
    for step in change.steps:
        if step.before is None:
            after = None
        else:
            generation = max(step.before.generation, step.after.generation if step.after else 0) + 1
            after = step.before.model_copy(update={"generation": generation, "at": None, "op": change.op})
        steps.append(Step(step.target, revision if step.after is not None else 0, step.after, after))
    return Change(change.op, "restore", tuple(steps))


def conflicts(change: Change, current: list[list[KeyValue]]) -> list[str]:
    """The lines naming what moved, from ``Change.reads()`` answered after a failed compare."""
    lines = []
    for step, kvs in zip(change.steps, current):
        now = kvs[0].mod_revision if kvs else 0
        if now != step.revision:
            lines.append(f"{step.target} changed meanwhile (its desired key is at revision {now}, "
                         f"expected {step.revision or 'absent'}); nothing was written: check "
                         f"`netskin status` and run it again")
    if change.skin_guard is not None and len(current) > len(change.steps):
        kvs = current[len(change.steps)]
        if (kvs[0].mod_revision if kvs else 0) != change.skin_guard[1]:
            name = change.skin_guard[0].rsplit("/", 1)[-1]
            lines.append(f"skin {name!r} changed in the store meanwhile; nothing was written: run it again")
    return lines


# --- verification -----------------------------------------------------------------------------


def step_done(step: Step, revision: int, status: Status | None) -> Literal["done", "failed", "pending"]:
    """Has the target's agent carried out ``step`` (committed at ``revision``)?"""
    if status is None:
        return "pending"
    if step.after is None:
        return "done" if status.state == "reverted" else "pending"
    if status.applied_rev != revision:
        return "pending"
    if status.state != "enforced" or status.verify_problems or status.skin != step.after.skin.name:
        return "failed"
    if status.generation is not None and status.enforced_generation != status.generation:
        return "pending"
    return "done"


def status_problem(step: Step, status: Status | None) -> str:
    if status is None:
        return f"{step.target}: no report from its agent"
    if status.error:
        return f"{step.target}: {status.error}"
    if status.verify_problems:
        return f"{step.target}: {'; '.join(status.verify_problems)}"
    return f"{step.target}: its agent reported {status.state} (skin {status.skin or '-'})"


# --- status rows ---------------------------------------------------------------------------------


def host_rows(view: FleetView, now: float) -> list[dict[str, Any]]:
    rows = []
    for name, host in view.hosts.items():
        alive = host.alive
        rows.append({
            "host": name,
            "state": host.state,
            "in_sync": alive.in_sync if alive else None,
            "pid": alive.pid if alive else None,
            "beat_age_s": round(max(now - alive.beat_at, 0.0), 1) if alive else None,
            "lease_ttl_s": alive.lease_ttl_s if alive else None,
            "vms": host.vms(),
        })
    return rows


def vm_rows(view: FleetView) -> list[dict[str, Any]]:
    """Per VM: what is desired (skin, shadow, generation), what its agent last did (active,
    applied: the status is for the current desired revision, enforced: and in force, verified)."""
    rows = []
    for name, host in view.hosts.items():
        for vm in host.vms():
            revision, desired = host.desired.get(vm, (0, None))
            status = host.status.get(vm)
            row: dict[str, Any] = {
                "host": name, "vm": vm, "host_state": host.state,
                "desired": desired.skin.name if isinstance(desired, Desired) else None,
                "shadow": desired.shadow.name if isinstance(desired, Desired) and desired.shadow else None,
                "generation": desired.generation if isinstance(desired, Desired) else None,
                "desired_revision": revision or None,
                "at": desired.at if isinstance(desired, Desired) else None,
                "active": status.skin if status else None,
                "state": status.state if status else None,
                "applied": False, "enforced": False,
                "swapped_at": status.swapped_at if status else None,
                "problems": ([status.error] if status and status.error else [])
                            + (list(status.verify_problems) if status else []),
            }
            if isinstance(desired, str):
                row["problems"].insert(0, desired)
            if revision:
                row["applied"] = status is not None and status.applied_rev == revision
                row["enforced"] = bool(row["applied"] and status.state == "enforced" and not status.verify_problems
                                       and status.enforced_generation == status.generation)
            elif status is not None:
                row["applied"] = status.state == "reverted"
            rows.append(row)
    return rows


def top_rows(view: FleetView, previous: FleetView | None) -> list[dict[str, Any]]:
    """Per VM and direction, from the conditions the agents publish: rates between two snapshots
    (None until a VM's conditions changed), asked/measured delay and loss, findings."""
    rows = []
    for name, host in view.hosts.items():
        for vm, cond in sorted(host.conditions.items()):
            before = previous.hosts[name].conditions.get(vm) if previous and name in previous.hosts else None
            seconds = cond.at - before.at if before else 0.0
            for direction in ("uplink", "downlink"):
                now_c = cond.counters.get(direction, {})
                was = before.counters.get(direction, {}) if before and seconds > 0 else None
                rate = (lambda key: (now_c.get(key, 0) - was.get(key, 0)) / seconds) if was else None
                asked = (cond.conditions.get(direction) or {}).get("asked") or {}
                measured = (cond.conditions.get(direction) or {}).get("measured") or {}
                rows.append({
                    "host": name, "host_state": host.state, "vm": vm, "skin": cond.skin,
                    "generation": cond.generation, "direction": direction,
                    "packets_per_s": rate("packets") if rate else None,
                    "kbit_per_s": rate("bytes") * 8 / 1000 if rate else None,
                    "drops_per_s": rate("dropped_packets") if rate else None,
                    "held_packets": now_c.get("held_packets"),
                    "asked_delay_ms": asked.get("delay_ms"), "asked_loss_percent": asked.get("loss_percent"),
                    "measured_delay_ms": (measured.get("added_delay_ms") or {}).get("p50"),
                    "measured_loss_percent": measured.get("loss_percent"),
                    "out_of_tolerance": list(cond.out_of_tolerance), "at": cond.at,
                })
    return rows


# --- --at ---------------------------------------------------------------------------------------

_RELATIVE_RE = re.compile(r"^\+(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_at(text: str, now: float) -> float:
    """``--at``: ``+30s`` / ``+2m`` from now, Unix seconds, or an ISO 8601 time (UTC unless it names
    its zone; a bare ``HH:MM[:SS]`` is today, UTC). Unix seconds; ``FleetError`` if past or unreadable."""
    text = text.strip()
    match = _RELATIVE_RE.match(text)
    if match:
        at = now + float(match.group(1)) * _UNITS_S[match.group(2)]
    else:
        try:
            at = float(text)
        except ValueError:
            at = _iso(text, now)
    if at < now - 1:
        stamp = dt.datetime.fromtimestamp(at, dt.timezone.utc).isoformat(timespec="seconds")
        raise FleetError(f"--at {text}: {stamp} has passed; give a time ahead (e.g. +30s)")
    return at


def _iso(text: str, now: float) -> float:
    try:
        if re.fullmatch(r"\d{2}:\d{2}(:\d{2}(\.\d+)?)?", text):
            day = dt.datetime.fromtimestamp(now, dt.timezone.utc).date()
            moment = dt.datetime.combine(day, dt.time.fromisoformat(text))
        else:
            moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise FleetError(f"--at {text!r}: not a time; give +30s, +2m, Unix seconds, HH:MM[:SS] (UTC) "
                         f"or an ISO 8601 time such as 2026-12-02T10:30:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.timestamp()


# --- the library in the store -------------------------------------------------------------------


def skin_document(name: str, document: dict) -> SkinDocument:
    """A validated copy of a skin document, as the store keeps it; ``SkinError`` if invalid."""
    skin = validate_skin(document, default_name=name)
    if skin.name != name:
        raise SkinError(f"the document names skin {skin.name!r}, not {name!r}")
    return SkinDocument(name=name, document=document)


# --- the shell: a Store ---------------------------------------------------------------------------


async def read_view(store: Store) -> FleetView:
    revision, kvs = await store.get_prefix(fleet.hosts_prefix())
    return FleetView.from_kvs(revision, kvs)


async def commit(store: Store, change: Change) -> int:
    """Write ``change`` in one transaction; its revision, or ``Conflict`` naming what moved."""
    result = await store.txn(change.compares(), change.writes(), change.reads())
    if result.succeeded:
        return result.revision
    current = result.ranges()
    lines = conflicts(change, current) or ["the store refused the transaction; nothing was written: run it again"]
    moved = [str(step.target) for step, kvs in zip(change.steps, current)
             if (kvs[0].mod_revision if kvs else 0) != step.revision]
    raise Conflict(lines, moved)


async def statuses(store: Store, targets: Iterable[Target]) -> dict[Target, Status | None]:
    targets = list(targets)
    result = await store.txn([], [range_op(fleet.status_key(t.host, t.vm)) for t in targets])
    found: dict[Target, Status | None] = {}
    for target, kvs in zip(targets, result.ranges()):
        try:
            found[target] = Status.decode(kvs[0].value) if kvs else None
        except ValueError:
            found[target] = None
    return found


@dataclass
class Outcome:
    change: Change
    revision: int
    done: list[Target]
    failed: list[str]  # one line per target known not in force
    pending: list[Target]
    restored: list[Target] = field(default_factory=list)
    not_restored: list[str] = field(default_factory=list)
    statuses: dict[Target, Status | None] = field(default_factory=dict)

    @property
    def verified(self) -> bool:
        return not self.failed and not self.pending


async def wait_for(store: Store, change: Change, revision: int, deadline: float) -> Outcome:
    """Poll the targets' status keys until every one is done, or one failed, or ``deadline`` (trio clock)."""
    while True:
        found = await statuses(store, (step.target for step in change.steps))
        states = {step.target: step_done(step, revision, found[step.target]) for step in change.steps}
        failed = [status_problem(step, found[step.target]) for step in change.steps
                  if states[step.target] == "failed"]
        pending = [t for t, state in states.items() if state == "pending"]
        if failed or not pending or trio.current_time() >= deadline:
            done = [t for t, state in states.items() if state == "done"]
            return Outcome(change, revision, done, failed, pending, statuses=found)
        await trio.sleep(POLL_S)


async def restore(store: Store, outcome: Outcome) -> None:
    """Write back every target's previous desired value in one transaction; a target changed since
    by someone else is left alone (and named)."""
    back = plan_restore(outcome.change, outcome.revision)
    for _ in range(3):
        try:
            await commit(store, back)
            outcome.restored = [step.target for step in back.steps]
            return
        except Conflict as exc:
            moved = set(exc.vms)
            outcome.not_restored += [f"{target}: not restored, it changed meanwhile" for target in sorted(
                step.target for step in back.steps if str(step.target) in moved)]
            back = Change(back.op, back.verb, tuple(s for s in back.steps if str(s.target) not in moved))
            if not back.steps:
                return


async def carry_out(store: Store, change: Change, wait_s: float) -> Outcome:
    """Commit ``change``; with ``wait_s`` > 0 wait that long (after its ``at``, if any) for every
    target, and restore them all if any is not in force by then."""
    revision = await commit(store, change)
    if wait_s <= 0:
        return Outcome(change, revision, [], [], [])
    ahead = max((change.at or 0) - time.time(), 0.0)
    outcome = await wait_for(store, change, revision, trio.current_time() + ahead + wait_s)
    if not outcome.verified:
        await restore(store, outcome)
    return outcome


def _store_entry(doc: SkinDocument) -> Entry:
    try:
        skin = validate_skin(doc.document, default_name=doc.name)
    except SkinError as error:
        return Entry(doc.name, Path(fleet.skin_key(doc.name)), "store", errors=tuple(error.lines), document=doc.document)
    return Entry(doc.name, Path(fleet.skin_key(doc.name)), "store", skin=skin, document=doc.document)


def document_of(document: dict, name: str) -> dict:
    """The document as stored: as written, with its name added when only a file stem gave it."""
    return document if ("name" in document or "skin_name" in document) else {"name": name, **document}


async def library(store: Store) -> list[tuple[SkinDocument, int]]:
    _, kvs = await store.get_prefix(fleet.skins_prefix())
    found = []
    for kv in kvs:
        try:
            found.append((SkinDocument.decode(kv.value), kv.mod_revision))
        except ValueError:
            continue
    return found


async def entries(store: Store) -> list[Entry]:
    """The fleet's library: the store's skins, and the presets they do not override."""
    stored = {doc.name: _store_entry(doc) for doc, _ in await library(store)}
    presets = {entry.name: entry for entry in preset_entries() if entry.name not in stored}
    return sorted([*stored.values(), *presets.values()], key=lambda entry: entry.name)


async def entry(store: Store, name: str) -> Entry:
    found = {e.name: e for e in await entries(store)}
    if name not in found:
        raise NotFound(f"unknown skin {name!r}{_hint(name, found)}; `netskin skins list` shows the fleet's skins")
    return found[name]


async def find_skin(store: Store, name: str) -> tuple[SkinDocument, int | None]:
    """The valid skin ``name`` to copy into desired keys, with the store revision it was read at
    (None for a preset)."""
    kv = await store.get(fleet.skin_key(name))
    if kv is not None:
        doc = SkinDocument.decode(kv.value)
        found = _store_entry(doc)
        if found.skin is None:
            raise SkinError(list(found.errors))
        return doc, kv.mod_revision
    preset = await entry(store, name)
    if preset.skin is None:
        raise SkinError(list(preset.errors))
    return SkinDocument(name=name, document=preset.document or {}), None


async def create_skin(store: Store, document: dict, default_name: str | None = None) -> Entry:
    """A new skin in the store; its name must be free (a preset's name needs ``update``)."""
    skin = validate_skin(document, default_name=default_name)
    taken = {e.name: e for e in await entries(store)}
    if skin.name in taken:
        kind = "a preset" if taken[skin.name].origin == "preset" else "in the store"
        raise Refused(f"skin {skin.name!r} already exists ({kind}); use `netskin skins update {skin.name} FILE` "
                           f"to replace it")
    doc = SkinDocument(name=skin.name, document=document_of(document, skin.name))
    key = fleet.skin_key(skin.name)
    if not (await store.txn([compare(key, "create", "==", 0)], [put_op(key, doc.encode())])).succeeded:
        raise Refused(f"skin {skin.name!r} was created meanwhile; use `netskin skins update {skin.name} FILE`")
    return _store_entry(doc)


async def update_skin(store: Store, name: str, document: dict) -> Entry:
    """Replace skin ``name`` (a preset gets a store copy that overrides it). VMs already wearing it
    keep their copy until the next apply."""
    await entry(store, name)
    skin = validate_skin(document, default_name=name)
    if skin.name != name:
        raise FleetError(f"the document names skin {skin.name!r}, not {name!r}; change its name field or "
                           f"use `netskin skins create`")
    doc = SkinDocument(name=name, document=document_of(document, name))
    await store.put(fleet.skin_key(name), doc.encode())
    return _store_entry(doc)


async def delete_skin(store: Store, name: str) -> dict:
    found = await entry(store, name)
    if found.origin == "preset":
        raise Refused(f"skin {name!r} is a preset and cannot be deleted; presets ship with netskin")
    worn = wearers(await read_view(store), name)
    if worn:
        raise Refused(f"skin {name!r} is desired for VM {worn[0]}; apply another skin to it or "
                           f"`netskin revert {worn[0]}` first")
    await store.delete(fleet.skin_key(name))
    uncovered = any(e.name == name for e in preset_entries())
    return {"deleted": name, "path": fleet.skin_key(name), "preset_visible": uncovered}


def wearers(view: FleetView, name: str) -> list[Target]:
    """The VMs whose desired skin is ``name`` (as on one host, such a skin is not deleted)."""
    return [Target(host, vm) for host, hv in view.hosts.items() for vm, (_, d) in sorted(hv.desired.items())
            if isinstance(d, Desired) and d.skin.name == name]
