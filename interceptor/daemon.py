"""netskin-interceptor: the daemon that enforces every VM's skin.

Start-up order matters: compile every VM's assigned skin, bind the queues, then install the
netfilter rules, so the first packet a VM sends already meets its skin. Shutdown reverses it:
rules out first (no new packets queue), held packets verdicted, queues unbound. All tasks live
in one trio nursery; SIGINT/SIGTERM cancel it, SIGHUP rescans the skin library.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
from pathlib import Path

import trio

from interceptor import control, rules
from interceptor.assignments import Assignment, AssignmentStore, SkinCopy
from interceptor.compiled import NO_SKIN, CompiledSkin
from interceptor.library import Entry, SkinLibrary
from interceptor.schema import ConfigError, HostConfig, SkinError, UserError, compile_document, load_host_config
from interceptor.shell import Shell, VmPath

log = logging.getLogger("netskin.daemon")

RESCAN_INTERVAL_S = 0.5


class Daemon:
    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.store = AssignmentStore(Path(config.state_dir))
        self.library = SkinLibrary.for_config(config)
        self.shell = Shell(fail_open=config.fail_mode == "open", host_uplink_kbps=config.host_uplink_kbps)
        self.assignments: dict[str, Assignment] = {}
        self._library_stamp = None
        self._cancel: trio.CancelScope | None = None

    # -- start-up -----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Compile every VM's skin and bind its queues (before any rule steers traffic)."""
        self._library_stamp = self.library.stamp()
        for index, (name, vm) in enumerate(self.config.vms.items()):
            up, down = self.config.queue_numbers(index)
            path = VmPath(name=name, index=index, interface=vm.interface, uplink_queue=up, downlink_queue=down)
            assignment = self.store.load(name)
            if assignment is None:
                assignment = Assignment(vm=name)
                if vm.skin:
                    try:
                        assignment.active = self._copy(vm.skin)
                        assignment.generation = 1
                        self.store.save(assignment)
                    except UserError as exc:
                        log.error("vm %s: configured skin not applied: %s", name, exc)
            self.assignments[name] = assignment
            path.set_skin(self._compile(assignment.active), assignment.generation)
            self.shell.add_vm(path)
            log.info("vm %s: queues %d/%d, skin %r generation %d", name, up, down,
                     path.skin.name, assignment.generation)

    def _copy(self, name: str) -> SkinCopy:
        """A copy of the library's valid skin ``name`` (``UserError`` if unknown or invalid)."""
        entry = self.library.entry(name)
        if entry.errors:
            raise SkinError(list(entry.errors))
        return SkinCopy(entry.name, entry.document, str(entry.path))

    def _compile(self, copy: SkinCopy | None) -> CompiledSkin:
        if copy is None:
            return NO_SKIN
        return compile_document(copy.document, copy.name)

    def install_rules(self) -> None:
        queues = [
            rules.VmQueues(p.interface, p.uplink_queue, p.downlink_queue) for p in self.shell.paths.values()
        ]
        rules.install(queues, fail_open=self.config.fail_mode == "open")

    async def run(self) -> None:
        self.prepare()
        self.install_rules()
        # Everything allocated so far lives for the daemon's lifetime: move it out of the
        # collector's sight so full collections stay short on the hot path.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        try:
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                await nursery.start(self.shell.run)
                await nursery.start(control.serve, Path(self.config.control_socket), self.handle)
                nursery.start_soon(self._signals)
                nursery.start_soon(self._watch_library)
                log.info("netskin-interceptor ready: %d VM(s), fail_mode=%s", len(self.shell.paths),
                         self.config.fail_mode)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        try:
            rules.remove()
        finally:
            released = self.shell.release_all()
            self.shell.close()
            log.info("netskin-interceptor stopped: rules removed, %d held packet(s) released", released)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: rescanning the skin library")
                    self.rescan()
                else:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    self._cancel.cancel()
                    return

    # -- skins --------------------------------------------------------------------------------

    def _path(self, vm: str) -> VmPath:
        try:
            return self.shell.paths[vm]
        except KeyError:
            known = ", ".join(self.shell.paths) or "none"
            raise control.ControlError(
                f"unknown VM '{vm}' (configured VMs: {known}); add it under [vms.{vm}] in the host config"
            ) from None

    def _enforce(self, vm: str, assignment: Assignment) -> None:
        """Persist, then swap: a crash in between re-applies the persisted state on restart."""
        compiled = self._compile(assignment.active)
        self.store.save(assignment)
        self.assignments[vm] = assignment
        self._path(vm).set_skin(compiled, assignment.generation)
        log.info("vm %s: skin %r generation %d (shadow %r)", vm, compiled.name, assignment.generation,
                 assignment.shadow.name if assignment.shadow else None)

    def apply(self, vm: str, copy: SkinCopy) -> Assignment:
        self._path(vm)
        old = self.assignments[vm]
        compile_document(copy.document, copy.name)  # refuse before touching anything
        new = Assignment(vm=vm, active=copy, shadow=old.active, generation=old.generation + 1,
                         original=old.original, identity=old.identity)
        self._enforce(vm, new)
        return new

    def rollback(self, vm: str) -> Assignment:
        self._path(vm)
        old = self.assignments[vm]
        if old.shadow is None:
            raise control.ControlError(f"VM '{vm}' has no shadow skin to roll back to; apply a skin first")
        new = Assignment(vm=vm, active=old.shadow, shadow=old.active, generation=old.generation + 1,
                         original=old.original, identity=old.identity)
        self._enforce(vm, new)
        return new

    def revert(self, vm: str) -> Assignment:
        self._path(vm)
        old = self.assignments[vm]
        new = Assignment(vm=vm, active=None, shadow=old.active or old.shadow,
                         generation=old.generation + 1, original=old.original)
        self._enforce(vm, new)
        return new

    def rescan(self) -> None:
        """Re-apply active skins whose drop-in file changed; keep the last good one on error."""
        entries: dict[str, Entry] = {entry.name: entry for entry in self.library.entries()}
        for vm, assignment in self.assignments.items():
            active = assignment.active
            if active is None:
                continue
            entry = entries.get(active.name)
            if entry is None:
                if assignment.reload_error is None and active.source and not Path(active.source).exists():
                    assignment.reload_error = f"{active.source} was deleted; VM stays on its last version"
                    log.warning("vm %s: %s", vm, assignment.reload_error)
                continue
            if entry.errors:
                error = "; ".join(entry.errors)
                if assignment.reload_error != error:
                    assignment.reload_error = error
                    log.error("vm %s: skin %r not reloaded, keeping the last good version: %s",
                              vm, active.name, error)
                continue
            if entry.document != active.document:
                self.apply(vm, SkinCopy(entry.name, entry.document, str(entry.path)))
                log.info("vm %s: skin %r reloaded from %s", vm, entry.name, entry.path)
            elif assignment.reload_error:
                assignment.reload_error = None

    async def _watch_library(self) -> None:
        # Polling the directory's stamp twice a second is cheap, needs no inotify binding and
        # also catches edits made through bind mounts or network filesystems.
        while True:
            await trio.sleep(RESCAN_INTERVAL_S)
            stamp = self.library.stamp()
            if stamp != self._library_stamp:
                self._library_stamp = stamp
                self.rescan()

    # -- control requests ---------------------------------------------------------------------

    async def handle(self, request: dict) -> dict:
        cmd = request["cmd"]
        vm = request.get("vm")
        if cmd == "status":
            return {"vms": self.status(vm), "host": self.host_status()}
        if cmd == "apply":
            try:
                copy = self._copy(request["skin"])
            except UserError as exc:
                raise control.ControlError("; ".join(exc.lines)) from None
            self.apply(vm, copy)
        elif cmd == "rollback":
            self.rollback(vm)
        elif cmd == "revert":
            self.revert(vm)
        elif cmd == "reload":
            self.rescan()
        else:
            raise control.ControlError(f"unknown command '{cmd}'")
        return {"vms": self.status(vm)}

    def host_status(self) -> dict:
        link = self.shell.link
        return {
            "host_uplink_kbps": self.config.host_uplink_kbps,
            "shared_uplink": {str(k): v for k, v in link.snapshot().items()} if link else None,
            "held_packets": self.shell.held_packets,
        }

    def status(self, vm: str | None = None) -> dict:
        names = [vm] if vm else list(self.shell.paths)
        out = {}
        for name in names:
            path = self._path(name)
            a = self.assignments[name]
            out[name] = {
                "interface": path.interface,
                "active": a.active.name if a.active else None,
                "shadow": a.shadow.name if a.shadow else None,
                "generation": a.generation,
                "enforced_generation": path.generation,
                "original": a.original,
                "reload_error": a.reload_error,
                "verify_problems": [f"{field} is not enforced by this netskin version" for field in
                                    _unenforced(path.skin, a.active)],
                "queues": {"uplink": path.uplink_queue, "downlink": path.downlink_queue},
                "uplink": path.uplink.snapshot(),
                "downlink": path.downlink.snapshot(),
            }
        return out


def _unenforced(skin: CompiledSkin, copy: SkinCopy | None) -> list[str]:
    """Parts of a skin this version validates but cannot enforce yet: reported, never ignored."""
    fields = [name for name in ("security_profile", "ip_address", "mac_address", "mtu")
              if getattr(skin, name) is not None]
    if skin.dns_servers:
        fields.append("dns_servers")
    if copy is not None and copy.document.get("dns"):
        fields.append("dns")
    return fields


def _enter_netns(name: str) -> None:
    from pyroute2 import netns

    try:
        netns.setns(name, flags=0)
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError([f"host_netns: network namespace '{name}' not found ({exc})"]) from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netskin-interceptor", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="host configuration (TOML)")
    parser.add_argument("--cleanup", action="store_true", help="remove netskin's netfilter rules and exit")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_host_config(args.config)
        if config.host_netns:
            _enter_netns(config.host_netns)
        if args.cleanup:
            found = rules.remove()
            print("netskin rules removed" if found else "no netskin rules were installed")
            return 0
        trio.run(Daemon(config).run)
    except UserError as exc:
        for line in exc.lines:
            print(f"netskin-interceptor: {line}", file=sys.stderr)
        return 1
    except rules.RulesError as exc:
        print(f"netskin-interceptor: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
