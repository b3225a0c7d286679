"""Assignments from the manager's side: apply, rollback, revert and status over the control socket.

The daemon swaps, brings identity in line and replies when that is complete. It refuses at once
a skin it knows it cannot enforce, and puts back the previous assignment itself when identity
fails (both code 3). After an ok reply the manager still checks that the daemon enforces the new
generation; if that fails within the verification window it asks the daemon to ``restore`` what
was in force before that generation (never ``rollback``, which would make the failed skin the
shadow). A reply that does not come within the caller's bound is not a failure: status then says
what happened, and only a change known not to be in force is reported as one.
"""

from __future__ import annotations

import time
from pathlib import Path

from interceptor import control
from interceptor.schema import HostConfig

SWAP_TIMEOUT_S = 30.0  # how long apply/rollback/revert wait for the daemon by default
VERIFY_TIMEOUT_S = 5.0  # after an ok apply reply: how long the manager waits to see it enforced
STATUS_TIMEOUT_S = 10.0


class VerifyFailed(Exception):
    """Known not to be (wholly) in force (CLI exit 3, API 422); ``status`` is the VM's now."""

    def __init__(self, message: str, status: dict | None) -> None:
        super().__init__(message)
        self.status = status


class InProgress(Exception):
    """The bound passed and status does not show the change complete yet (CLI exit 4, API 504)."""

    def __init__(self, message: str, status: dict | None) -> None:
        super().__init__(message)
        self.status = status


def _socket(config: HostConfig) -> Path:
    return Path(config.control_socket)


def _remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)


def status(config: HostConfig, vm: str | None = None, timeout: float = STATUS_TIMEOUT_S) -> dict:
    return control.request(_socket(config), "status", timeout=timeout, vm=vm)


def _vm_status(config: HostConfig, vm: str, timeout: float = STATUS_TIMEOUT_S) -> dict:
    return status(config, vm, timeout)["vms"][vm]


def problems(vm_status: dict, skin: str | None, generation: int) -> list[str]:
    """What keeps ``vm_status`` from showing ``skin`` enforced at ``generation`` (empty: verified)."""
    found = []
    if vm_status["active"] != skin:
        found.append(f"active skin is {_skin(vm_status['active'])}, expected {_skin(skin)}")
    if vm_status["enforced_generation"] != generation:
        found.append(f"daemon enforces generation {vm_status['enforced_generation']}, expected {generation}")
    found += vm_status.get("verify_problems") or []
    return found


def _skin(name: str | None) -> str:
    return repr(name) if name is not None else "no skin"


def _on(vm_status: dict) -> str:
    return f"{_skin(vm_status['active'])}, generation {vm_status['generation']}"


def apply(config: HostConfig, vm: str, skin: str, timeout: float = SWAP_TIMEOUT_S,
          verify_timeout: float = VERIFY_TIMEOUT_S) -> dict:
    """Apply ``skin`` to ``vm`` and verify it; return the VM's status.

    Raises ``VerifyFailed`` when the skin is known not to be in force (the daemon refused it or
    put the previous assignment back, or the manager restored it) and ``InProgress`` when
    ``timeout`` passed before the daemon finished.
    """
    deadline = time.monotonic() + timeout
    before = _vm_status(config, vm, min(STATUS_TIMEOUT_S, timeout))
    try:
        reply = control.request(_socket(config), "apply", timeout=_remaining(deadline), vm=vm, skin=skin)
    except control.ReplyTimeout:
        return _after_timeout(config, vm, before, skin, f"applying {skin!r}", timeout)
    except control.ControlError as exc:
        if exc.code != 3 or exc.internal:
            raise
        now = (exc.vms or {}).get(vm) or _status_if_any(config, vm)
        stays = f"; {vm} is on {_on(now)}" if now else ""  # the daemon's line names the skin and why
        raise VerifyFailed(f"{exc}{stays}", now) from None
    current = reply["vms"][vm]
    generation = current["generation"]
    found = problems(current, skin, generation)
    verify_deadline = min(time.monotonic() + verify_timeout, max(deadline, time.monotonic()))
    while found and time.monotonic() < verify_deadline:
        time.sleep(0.05)
        current = _vm_status(config, vm)
        found = problems(current, skin, generation)
    if not found:
        return current
    what = f"applied {skin!r} to {vm} (generation {generation}) but could not verify it ({'; '.join(found)})"
    try:
        restored = control.request(_socket(config), "restore", timeout=timeout, vm=vm,
                                   generation=generation)["vms"][vm]
    except control.ReplyTimeout:
        raise VerifyFailed(f"{what}; restoring the previous assignment did not finish within {timeout:g} s: "
                           f"see `netskin status {vm}`", _status_if_any(config, vm)) from None
    except control.ControlError as exc:  # the generation moved on: someone else changed the VM
        now = _status_if_any(config, vm)
        raise VerifyFailed(f"{what}; not restored: {exc}" + (f"; {vm} is on {_on(now)}" if now else ""),
                           now) from None
    raise VerifyFailed(f"{what}; restored {vm} to {_on(restored)}", restored)


def rollback(config: HostConfig, vm: str, timeout: float = SWAP_TIMEOUT_S) -> dict:
    """Swap active and shadow; ``VerifyFailed`` if the swap is done but problems remain."""
    return _swap(config, "rollback", vm, timeout)


def revert(config: HostConfig, vm: str, timeout: float = SWAP_TIMEOUT_S) -> dict:
    """Remove the skin, restore the original configuration; ``VerifyFailed`` if problems remain."""
    return _swap(config, "revert", vm, timeout)


def _swap(config: HostConfig, cmd: str, vm: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    before = _vm_status(config, vm, min(STATUS_TIMEOUT_S, timeout))
    done = "rolled back" if cmd == "rollback" else "reverted"
    try:
        current = control.request(_socket(config), cmd, timeout=_remaining(deadline), vm=vm)["vms"][vm]
    except control.ReplyTimeout:
        expected = before["shadow"] if cmd == "rollback" else None
        doing = "rolling back" if cmd == "rollback" else "reverting"
        current = _after_timeout(config, vm, before, expected, doing, timeout)
    remaining = current.get("verify_problems") or []
    if remaining:
        raise VerifyFailed(f"{vm}: {done} to {_on(current)}, but not wholly in force: {'; '.join(remaining)}",
                           current)
    return current


def _after_timeout(config: HostConfig, vm: str, before: dict, expected: str | None, doing: str,
                   timeout: float) -> dict:
    """No reply within ``timeout``: ask status what happened. In force: its status."""
    try:
        now = _vm_status(config, vm)
    except (control.DaemonUnreachable, control.ControlError) as exc:
        raise InProgress(f"{vm}: {doing}: no answer within {timeout:g} s and no status either ({exc}); "
                         f"the outcome is unknown", None) from None
    if now["generation"] == before["generation"]:
        raise InProgress(f"{vm}: {doing} is still in progress after {timeout:g} s: not swapped yet ({vm} is "
                         f"on {_on(now)}); see `netskin status {vm}`", now)
    found = problems(now, expected, now["generation"])
    if not found:
        return now  # it happened; only the answer was late
    if now["active"] != expected:
        raise VerifyFailed(f"{vm}: {doing} did not take effect: after {timeout:g} s {vm} is on {_on(now)}", now)
    raise InProgress(f"{vm}: {doing} is still in progress after {timeout:g} s: swapped to {_on(now)}, but "
                     f"{'; '.join(found)}; see `netskin status {vm}`", now)


def _status_if_any(config: HostConfig, vm: str) -> dict | None:
    try:
        return _vm_status(config, vm)
    except (control.DaemonUnreachable, control.ControlError):
        return None
