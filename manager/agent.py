"""The agent on each fleet host: this host's desired skins in etcd → the local daemon → status back.

Level-triggered, as Calico's list-then-watch and Neutron's full sync: the agent ranges its host's
prefix, converges every VM, then watches from that revision. A watch event only updates the
desired map; the whole map is converged again (``plan``, pure, below). After a compaction or a
broken stream it ranges again. Nothing is applied before the first range (in sync). What was
already applied is skipped: the status key records the desired key's mod_revision it acted on.

Fail-static: the daemon enforces on its own and keeps its assignments across restarts, so when
etcd or the agent is gone skins stay in force; the agent only retries, with backoff.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import time
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple

import trio

from interceptor import control
from interceptor.assignments import write_atomically
from interceptor.schema import HostConfig, UserError, validate_skin
from manager import assign, fleet
from manager.fleet import Desired, Status
from manager.store import Compacted, Store, StoreError, StoreUnavailable, WatchBatch, put_op

log = logging.getLogger("netskin.agent")

LEASE_TTL_S = 10
CONDITIONS_EVERY_S = 5.0
MAX_TXN_OPS = 100  # etcd's default limit is 128 per txn


# --- the decision: desired vs applied → actions (pure) -------------------------------------------


@dataclass(frozen=True)
class Apply:
    vm: str
    revision: int  # the desired key's mod_revision
    desired: Desired


@dataclass(frozen=True)
class Revert:
    vm: str
    on_daemon: bool  # False: the daemon has no skin on it any more, only the status is written


@dataclass(frozen=True)
class Refuse:
    vm: str
    revision: int
    reason: str


Action = Apply | Revert | Refuse


class Plan(NamedTuple):
    actions: tuple[Action, ...]
    wake_at: float | None  # Unix time of the earliest scheduled swap (``at``) still ahead


def plan(desired: Mapping[str, tuple[int, Desired | str]], status: Mapping[str, Status],
         active: Mapping[str, str | None], now: float) -> Plan:
    """What to do so the daemon wears what the store asks.

    ``desired``: VM → (mod_revision, value, or the reason the value is unreadable);
    ``status``: VM → what the agent last recorded; ``active``: the daemon's VMs → active skin.
    A VM is skipped when its status records this revision and the daemon still wears that skin
    (or the revision already failed: it is retried only when the desired key changes). VMs the
    store stopped asking for are reverted only if the agent had put a skin on them.
    """
    actions: list[Action] = []
    wake_at = None
    for vm in sorted(desired):
        revision, value = desired[vm]
        done = status.get(vm)
        settled = done is not None and done.applied_rev == revision
        if settled and done.state == "failed":
            continue
        if isinstance(value, str):
            actions.append(Refuse(vm, revision, f"the desired value is unreadable: {value}"))
        elif vm not in active:
            actions.append(Refuse(vm, revision, f"VM {vm!r} is not configured on this host"))
        elif settled and active[vm] == value.skin.name:
            continue
        elif value.at is not None and value.at > now:
            wake_at = value.at if wake_at is None else min(wake_at, value.at)
        else:
            actions.append(Apply(vm, revision, value))
    for vm in sorted(status):
        if vm in desired or status[vm].state == "reverted" or vm not in active:
            continue
        actions.append(Revert(vm, on_daemon=active[vm] is not None))
    return Plan(tuple(actions), wake_at)


class Backoff:
    def __init__(self, first_s: float = 0.2, max_s: float = 5.0) -> None:
        self.first_s, self.max_s, self._next = first_s, max_s, first_s

    def next(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self.max_s)
        return delay

    def reset(self) -> None:
        self._next = self.first_s


def drop_in_path(skins_dir: Path, name: str) -> Path:
    return Path(skins_dir) / f"{name}.json"


# --- the shell: store, daemon, timers ---------------------------------------------------------------


class Agent:
    def __init__(self, config: HostConfig, store: Store, *, host: str | None = None,
                 lease_ttl_s: int = LEASE_TTL_S, conditions_every_s: float = CONDITIONS_EVERY_S) -> None:
        self.config = config
        self.store = store
        self.host = host or (config.store.host if config.store else None) or socket.gethostname()
        self.prefix = fleet.host_prefix(self.host)
        self.lease_ttl_s = lease_ttl_s
        self.conditions_every_s = conditions_every_s
        self.desired: dict[str, tuple[int, Desired | str]] = {}
        self.status: dict[str, Status] = {}
        self.unsaved: set[str] = set()  # statuses written to memory but not yet to the store
        self.revision = 0
        self.in_sync = False
        self.lease_id: int | None = None
        self.started_at = time.time()
        self._store_backoff = Backoff()
        self._daemon_backoff = Backoff()
        self._inventory_saved = False
        self._prepared: dict[str, int] = {}  # VM → desired revision whose drop-in is already written

    async def run(self) -> None:
        """Until SIGTERM/SIGINT; then the lease is revoked so the host shows gone at once."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stop_on_signal, nursery.cancel_scope)
            nursery.start_soon(self._liveness)
            nursery.start_soon(self._publish_conditions)
            nursery.start_soon(self._sync_forever)
        if self.lease_id is not None:
            with trio.move_on_after(2), trio.CancelScope(shield=True):
                try:
                    await self.store.revoke(self.lease_id)
                except StoreError:
                    pass

    async def _stop_on_signal(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("%s: stopping", signal.Signals(signum).name)
                scope.cancel()
                return

    # -- list, then watch ----------------------------------------------------------------------

    async def _sync_forever(self) -> None:
        resume = False
        while True:
            try:
                await self._sync_once(resume)
            except Compacted as exc:
                log.warning("%s; resyncing from a fresh range", exc)
                resume = False
            except StoreUnavailable as exc:
                # The maps are right up to self.revision: the next watch resumes from there and
                # etcd says Compacted if it no longer has that history (OVN's monitor_cond_since).
                resume = self.in_sync
                delay = self._store_backoff.next()
                log.warning("store unavailable (%s); the daemon keeps enforcing; retrying in %.1f s", exc, delay)
                await trio.sleep(delay)
            except StoreError as exc:
                resume = False
                delay = self._store_backoff.next()
                log.error("store refused: %s; retrying in %.1f s", exc, delay)
                await trio.sleep(delay)

    async def _sync_once(self, resume: bool = False) -> None:
        """Range the host's prefix (or, with ``resume``, keep the maps and watch on from the
        revision they are at), converge, then converge again on every change until the watch fails."""
        if resume:
            log.info("resuming the watch after revision %d", self.revision)
        else:
            revision, kvs = await self.store.get_prefix(self.prefix)
            self._load(revision, kvs)
            self._store_backoff.reset()
            log.info("in sync with the store at revision %d: %d desired VMs", revision, len(self.desired))
        send, receive = trio.open_memory_channel(math.inf)
        failure: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, self.revision + 1, send)
            changed = True
            wake = None
            while True:
                if changed or (wake is not None and trio.current_time() >= wake):
                    try:
                        wake = await self._converge()
                    except StoreError as exc:  # a status write failed: resync, after backoff
                        failure = exc
                        nursery.cancel_scope.cancel()
                        break
                changed = False
                with trio.move_on_at(wake if wake is not None else math.inf):
                    item = await receive.receive()
                    while True:
                        if isinstance(item, BaseException):
                            failure = item
                            break
                        changed |= self._take(item)
                        try:
                            item = receive.receive_nowait()
                        except trio.WouldBlock:
                            break
                if failure is not None:
                    nursery.cancel_scope.cancel()
                    break
        raise failure

    async def _pump(self, start_revision: int, send: trio.MemorySendChannel) -> None:
        # Watching the whole host prefix also brings the agent's own heartbeats: a healthy watch is
        # never silent for long, so the idle bound tells a dead stream from a quiet one.
        try:
            async with aclosing(self.store.watch(self.prefix, start_revision,
                                                 idle_timeout_s=max(self.lease_ttl_s, 3))) as batches:
                async for batch in batches:
                    await send.send(batch)
        except StoreError as exc:
            await send.send(exc)

    def _load(self, revision: int, kvs) -> None:
        desired: dict[str, tuple[int, Desired | str]] = {}
        stored: dict[str, Status] = {}
        for kv in kvs:
            key = fleet.parse_host_key(kv.key)
            if key is None or key.vm is None:
                continue
            if key.kind == "desired":
                desired[key.vm] = (kv.mod_revision, _decode_desired(kv.value))
            elif key.kind == "status":
                try:
                    stored[key.vm] = Status.decode(kv.value)
                except ValueError as exc:
                    log.warning("vm %s: ignoring its status key: %s", key.vm, exc)
        # What this process applied but could not record yet is newer than the store's copy.
        for vm in self.unsaved:
            if vm in self.status:
                stored[vm] = self.status[vm]
        self.desired, self.status, self.revision, self.in_sync = desired, stored, revision, True

    def _take(self, batch: WatchBatch) -> bool:
        """Apply a watch batch to the desired map; True if a desired key changed."""
        changed = False
        for event in batch.events:
            key = fleet.parse_host_key(event.kv.key)
            if key is None or key.kind != "desired":
                continue
            changed = True
            if event.type == "DELETE":
                self.desired.pop(key.vm, None)
            else:
                self.desired[key.vm] = (event.kv.mod_revision, _decode_desired(event.kv.value))
        # A batch's header may run ahead of events still to come; a progress notification's does not.
        seen = max((event.kv.mod_revision for event in batch.events), default=batch.revision)
        if seen > self.revision:
            self.revision = seen
            self._store_backoff.reset()
        return changed

    # -- converging the daemon -------------------------------------------------------------------

    async def _converge(self) -> float | None:
        """Bring the daemon in line; return when (trio clock) to converge again, if ever."""
        for vm in sorted(self.unsaved):
            await self._save(vm)
        try:
            daemon = await trio.to_thread.run_sync(self._daemon_status)
            active = {vm: st["active"] for vm, st in daemon.items()}
            decided = plan(self.desired, self.status, active, time.time())
            for action in decided.actions:
                if not isinstance(action, Apply):
                    await self._do(action, daemon)
            await self._apply_together([a for a in decided.actions if isinstance(a, Apply)], daemon)
            await self._prepare_scheduled(active)
        except (control.DaemonUnreachable, assign.InProgress) as exc:
            delay = self._daemon_backoff.next()
            log.warning("daemon not answering (%s); converging again in %.1f s", exc, delay)
            return trio.current_time() + delay
        self._daemon_backoff.reset()
        if decided.wake_at is None:
            return None
        return trio.current_time() + max(decided.wake_at - time.time(), 0.0)

    async def _apply_together(self, applies: list[Apply], daemon: dict) -> None:
        """Every swap due now at once (the daemon locks per VM): a fleet's VMs scheduled for one
        instant swap together, not one after another's verification."""
        failures: list[Exception] = []

        async def one(action: Apply) -> None:
            try:
                await self._do(action, daemon)
            except (StoreError, control.DaemonUnreachable, assign.InProgress) as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            for action in applies:
                nursery.start_soon(one, action)
        if failures:
            raise failures[0]

    async def _prepare_scheduled(self, active: Mapping[str, str | None]) -> None:
        """Write the drop-in of every swap scheduled ahead now, so at its instant only the swap is left."""
        now = time.time()
        for vm, (revision, value) in sorted(self.desired.items()):
            if (isinstance(value, Desired) and value.at is not None and value.at > now and vm in active
                    and self._prepared.get(vm) != revision):
                try:
                    await trio.to_thread.run_sync(self._write_drop_in, value.skin.name, value.skin.document)
                except (UserError, OSError) as exc:  # the swap itself records the failure
                    log.warning("vm %s: cannot prepare %r ahead of its swap: %s", vm, value.skin.name, exc)
                    continue
                self._prepared[vm] = revision

    def _daemon_status(self) -> dict:
        return assign.status(self.config)["vms"]

    async def _do(self, action: Action, daemon: dict) -> None:
        now = time.time()
        if isinstance(action, Refuse):
            log.error("vm %s: not applied: %s", action.vm, action.reason)
            self._record(action.vm, Status(applied_rev=action.revision, state="failed", error=action.reason, at=now))
        elif isinstance(action, Revert):
            after = daemon[action.vm]
            if action.on_daemon:
                log.info("vm %s: no longer desired; reverting", action.vm)
                try:
                    after = await trio.to_thread.run_sync(assign.revert, self.config, action.vm)
                except assign.VerifyFailed as exc:
                    after = exc.status or after
            self._record(action.vm, fleet.status_from_daemon(after, applied_rev=0, state="reverted", desired=None,
                                                             error=None, now=now))
        else:
            await self._apply(action, daemon[action.vm], now)
        await self._save(action.vm)

    async def _apply(self, action: Apply, before: dict, now: float) -> None:
        name = action.desired.skin.name
        state, error, after, swapped_at = "enforced", None, before, None
        try:
            await trio.to_thread.run_sync(self._write_drop_in, name, action.desired.skin.document)
            swapped_at = time.time()
            after = await trio.to_thread.run_sync(assign.apply, self.config, action.vm, name)
            log.info("vm %s: %r applied (desired revision %d, daemon generation %s)", action.vm, name,
                     action.revision, after.get("generation"))
        except assign.VerifyFailed as exc:
            state, error, after = "failed", str(exc), exc.status or before
        except control.ControlError as exc:
            state, error, after = "failed", str(exc), (exc.vms or {}).get(action.vm) or before
        except UserError as exc:
            state, error = "failed", "; ".join(exc.lines)
        except OSError as exc:
            state, error = "failed", f"cannot write the skin into {self.config.skins_dir}: {exc}"
        if error:
            log.error("vm %s: %r not applied: %s", action.vm, name, error)
        self._record(action.vm, fleet.status_from_daemon(after, applied_rev=action.revision, state=state,
                                                         desired=action.desired, error=error, now=now,
                                                         swapped_at=swapped_at))

    def _write_drop_in(self, name: str, document: dict) -> None:
        """Put the desired copy of the skin into the daemon's library, unless it is there already."""
        skin = validate_skin(document, default_name=name)
        if skin.name != name:
            raise UserError(f"the desired document names skin {skin.name!r}, not {name!r}")
        path = drop_in_path(self.config.skins_dir, name)
        try:
            if json.loads(path.read_text()) == document:
                return
        except (OSError, ValueError):
            pass
        write_atomically(path, json.dumps(document, indent=2, sort_keys=True) + "\n", mode=0o644)

    def _record(self, vm: str, status: Status) -> None:
        self.status[vm] = status
        self.unsaved.add(vm)

    async def _save(self, vm: str) -> None:
        await self.store.put(fleet.status_key(self.host, vm), self.status[vm].encode())
        self.unsaved.discard(vm)

    # -- liveness and conditions -------------------------------------------------------------------

    def _alive(self) -> fleet.Alive:
        return fleet.Alive(host=self.host, pid=os.getpid(), started_at=self.started_at, beat_at=time.time(),
                           in_sync=self.in_sync, store_revision=self.revision, lease_ttl_s=self.lease_ttl_s)

    async def _liveness(self) -> None:
        """Publish the host's VM inventory once, then hold a lease with the alive key on it; its put
        every third of the TTL is also the watch's heartbeat. A lease that expired while etcd was
        away is replaced."""
        backoff = Backoff()
        while True:
            try:
                if not self._inventory_saved:
                    inventory = fleet.inventory_from_config(self.host, self.config.vms, time.time())
                    await self.store.put(fleet.inventory_key(self.host), inventory.encode())
                    self._inventory_saved = True
                lease = await self.store.grant(self.lease_ttl_s)
                self.lease_id = lease.id
                backoff.reset()
                while True:
                    await self.store.put(fleet.alive_key(self.host), self._alive().encode(), lease=lease.id)
                    await trio.sleep(self.lease_ttl_s / 3)
                    if await self.store.keepalive_once(lease.id) <= 0:
                        log.warning("lease %x expired; taking a new one", lease.id)
                        break
            except StoreError as exc:
                self.lease_id = None
                delay = backoff.next()
                log.debug("liveness: %s; again in %.1f s", exc, delay)
                await trio.sleep(delay)

    async def _publish_conditions(self) -> None:
        while True:
            await trio.sleep(self.conditions_every_s)
            lease = self.lease_id
            if lease is None or not self.in_sync:
                continue
            try:
                daemon = await trio.to_thread.run_sync(self._daemon_status)
            except control.DaemonUnreachable:
                continue
            now = time.time()
            ops = [put_op(fleet.conditions_key(self.host, vm), fleet.conditions_from_daemon(st, now).encode(), lease)
                   for vm, st in sorted(daemon.items())]
            try:
                for first in range(0, len(ops), MAX_TXN_OPS):
                    await self.store.txn([], ops[first:first + MAX_TXN_OPS])
            except StoreError as exc:
                log.debug("conditions not published: %s", exc)


def _decode_desired(value: bytes) -> Desired | str:
    try:
        return Desired.decode(value)
    except ValueError as exc:
        return str(exc)


def main(config: HostConfig, *, lease_ttl_s: int = LEASE_TTL_S, conditions_every_s: float = CONDITIONS_EVERY_S) -> None:
    """``netskin agent``: run until SIGTERM/SIGINT."""
    assert config.store is not None

    async def run() -> None:
        async with Store.from_config(config.store) as store:
            agent = Agent(config, store, lease_ttl_s=lease_ttl_s, conditions_every_s=conditions_every_s)
            log.info("agent for host %r on %s", agent.host, ", ".join(config.store.endpoints))
            await agent.run()

    trio.run(run)
