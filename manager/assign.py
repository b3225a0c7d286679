"""Assignments from the manager's side: apply with verification, rollback, revert, status.

The daemon does each swap atomically and persists it; the manager then checks that the daemon
really enforces the new generation (and, for identity, that settings read back as asked). If it
does not within the deadline, the manager rolls back to the shadow and reports exit code 3.
"""

from __future__ import annotations

import time
from pathlib import Path

from interceptor import control
from interceptor.schema import HostConfig

VERIFY_TIMEOUT_S = 5.0


class VerifyFailed(Exception):
    """Applied, but not verified; the VM was rolled back (CLI exit code 3)."""

    def __init__(self, message: str, status: dict) -> None:
        super().__init__(message)
        self.status = status


def _socket(config: HostConfig) -> Path:
    return Path(config.control_socket)


def status(config: HostConfig, vm: str | None = None) -> dict:
    return control.request(_socket(config), "status", vm=vm)


def problems(vm_status: dict, skin: str | None, generation: int) -> list[str]:
    """What keeps ``vm_status`` from showing ``skin`` enforced at ``generation`` (empty: verified)."""
    found = []
    if vm_status["active"] != skin:
        found.append(f"active skin is {vm_status['active']!r}, expected {skin!r}")
    if vm_status["enforced_generation"] != generation:
        found.append(f"daemon enforces generation {vm_status['enforced_generation']}, expected {generation}")
    found += vm_status.get("verify_problems", [])
    return found


def _verified(config: HostConfig, vm: str, skin: str | None, generation: int, timeout: float) -> tuple[list[str], dict]:
    deadline = time.monotonic() + timeout
    while True:
        current = status(config, vm)["vms"][vm]
        found = problems(current, skin, generation)
        if not found or time.monotonic() >= deadline:
            return found, current
        time.sleep(0.05)


def apply(config: HostConfig, vm: str, skin: str, timeout: float = VERIFY_TIMEOUT_S) -> dict:
    """Apply ``skin`` to ``vm``; verify; on failure roll back and raise ``VerifyFailed``."""
    reply = control.request(_socket(config), "apply", vm=vm, skin=skin)["vms"][vm]
    found, current = _verified(config, vm, skin, reply["generation"], timeout)
    if found:
        # Back to what the VM had: the shadow, or no skin at all if this was its first.
        undo = "rollback" if reply["shadow"] is not None else "revert"
        rolled = control.request(_socket(config), undo, vm=vm)["vms"][vm]
        raise VerifyFailed(
            f"applied {skin!r} to {vm} but could not verify it ({'; '.join(found)}); "
            f"rolled back to {repr(rolled['active']) if rolled['active'] else 'no skin'}",
            rolled,
        )
    return current


def rollback(config: HostConfig, vm: str) -> dict:
    return control.request(_socket(config), "rollback", vm=vm)["vms"][vm]


def revert(config: HostConfig, vm: str) -> dict:
    return control.request(_socket(config), "revert", vm=vm)["vms"][vm]
