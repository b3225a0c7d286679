"""The fleet's key layout in etcd and the JSON values under it: pure functions, no I/O.

Every host reads and writes only under its own prefix, so an agent needs nothing else and etcd
roles can confine it there:

    /netskin/skins/<name>                      the library: a skin document
    /netskin/hosts/<host>/desired/<vm>         what the VM should wear (manager writes)
    /netskin/hosts/<host>/status/<vm>          what the agent last did for it (agent writes)
    /netskin/hosts/<host>/alive                the agent's liveness, on its lease
    /netskin/hosts/<host>/inventory            the VMs the host's configuration names (agent writes)
    /netskin/hosts/<host>/conditions/<vm>      asked vs measured summary, on the agent's lease

A desired key carries a copy of the skin document, so a host applies exactly what was asked even
if the library entry changes meanwhile; its ``mod_revision`` is what the status records as applied.
The inventory is not on the lease: a manager still knows a stale host's VMs by name.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ROOT = "/netskin"
_SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
KINDS = ("desired", "status", "conditions")


class LayoutError(ValueError):
    """A name that cannot be a key segment, or a key outside the layout."""


def _segment(name: str, what: str) -> str:
    if not _SEGMENT_RE.fullmatch(name):
        raise LayoutError(f"{name!r} is not a valid {what} name for the store "
                        f"(letters, digits, '_', '.', '-'; at most 64; no '/')")
    return name


def skins_prefix() -> str:
    return f"{ROOT}/skins/"


def skin_key(name: str) -> str:
    return f"{skins_prefix()}{_segment(name, 'skin')}"


def hosts_prefix() -> str:
    return f"{ROOT}/hosts/"


def host_prefix(host: str) -> str:
    return f"{hosts_prefix()}{_segment(host, 'host')}/"


def desired_key(host: str, vm: str) -> str:
    return f"{host_prefix(host)}desired/{_segment(vm, 'VM')}"


def status_key(host: str, vm: str) -> str:
    return f"{host_prefix(host)}status/{_segment(vm, 'VM')}"


def conditions_key(host: str, vm: str) -> str:
    return f"{host_prefix(host)}conditions/{_segment(vm, 'VM')}"


def alive_key(host: str) -> str:
    return f"{host_prefix(host)}alive"


def inventory_key(host: str) -> str:
    return f"{host_prefix(host)}inventory"


class HostKey(NamedTuple):
    host: str
    kind: str  # "desired", "status", "conditions", "alive" or "inventory"
    vm: str | None


def parse_host_key(key: str) -> HostKey | None:
    """``/netskin/hosts/H/desired/vm1`` → ("H", "desired", "vm1"); None for keys outside the layout."""
    if not key.startswith(hosts_prefix()):
        return None
    parts = key[len(hosts_prefix()):].split("/")
    if len(parts) == 2 and parts[1] in ("alive", "inventory") and _SEGMENT_RE.fullmatch(parts[0]):
        return HostKey(parts[0], parts[1], None)
    if len(parts) == 3 and parts[1] in KINDS and all(_SEGMENT_RE.fullmatch(p) for p in (parts[0], parts[2])):
        return HostKey(parts[0], parts[1], parts[2])
    return None


# --- values -------------------------------------------------------------------------------------


class _Value(BaseModel):
    # A newer manager may add fields: an agent ignores what it does not know.
    model_config = ConfigDict(extra="ignore", frozen=True)

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def decode(cls, data: bytes | str) -> Any:
        """Parse a stored value; ``ValueError`` naming the problem if it does not fit."""
        try:
            return cls.model_validate(json.loads(data))
        except (ValueError, ValidationError) as exc:
            raise ValueError(f"not a {cls.__name__} value: {exc}".splitlines()[0]) from None


class SkinDocument(_Value):
    name: str
    document: dict[str, Any]  # the skin file's fields as written


class Desired(_Value):
    """What a VM should wear. ``generation`` counts the manager's changes to this VM's assignment;
    ``at`` (Unix seconds) asks for the swap at that wall-clock instant."""

    skin: SkinDocument
    generation: int = Field(ge=1)
    shadow: SkinDocument | None = None
    at: float | None = None
    op: str | None = None  # the manager's operation id, echoed in the status


State = Literal["enforced", "failed", "reverted"]


class Status(_Value):
    """What the agent last did for a VM: ``applied_rev`` is the desired key's mod_revision it acted
    on (0 for a revert after the key was deleted)."""

    applied_rev: int = Field(ge=0)
    state: State
    skin: str | None = None  # the daemon's active skin afterwards
    shadow: str | None = None
    generation: int | None = None  # the daemon's generation for the VM
    enforced_generation: int | None = None
    desired_generation: int | None = None
    op: str | None = None
    verify_problems: list[str] = []
    error: str | None = None
    original: dict[str, Any] | None = None
    swapped_at: float | None = None  # Unix seconds when the agent asked the daemon to swap
    at: float  # Unix seconds when it was written


class Alive(_Value):
    host: str
    pid: int
    started_at: float
    beat_at: float
    in_sync: bool
    store_revision: int = 0
    lease_ttl_s: int | None = None


class Inventory(_Value):
    """The VMs a host's configuration names: VM → {"interface", "address"}."""

    host: str
    vms: dict[str, dict[str, Any]]
    at: float


def inventory_from_config(host: str, vms: dict[str, Any], now: float) -> Inventory:
    """From a host configuration's ``vms`` table (``VmConfig`` values)."""
    return Inventory(host=host, at=now, vms={name: {"interface": vm.interface, "address": str(vm.address)}
                                             for name, vm in sorted(vms.items())})


class Conditions(_Value):
    skin: str | None
    generation: int
    conditions: dict[str, Any]  # per direction {"asked": {...}, "measured": {...}} from the daemon
    out_of_tolerance: list[str] = []
    counters: dict[str, dict[str, int]] = {}  # per direction: COUNTERS, for rates across hosts
    at: float


COUNTERS = ("packets", "bytes", "dropped_packets", "held_packets")


def status_from_daemon(vm_status: dict, *, applied_rev: int, state: State, desired: Desired | None,
                       error: str | None, now: float, swapped_at: float | None = None) -> Status:
    """The status value for one VM from the daemon's ``status`` entry for it."""
    return Status(
        applied_rev=applied_rev,
        state=state,
        skin=vm_status.get("active"),
        shadow=vm_status.get("shadow"),
        generation=vm_status.get("generation"),
        enforced_generation=vm_status.get("enforced_generation"),
        desired_generation=desired.generation if desired else None,
        op=desired.op if desired else None,
        verify_problems=list(vm_status.get("verify_problems") or []),
        error=error,
        original=vm_status.get("original"),
        swapped_at=swapped_at,
        at=now,
    )


def conditions_from_daemon(vm_status: dict, now: float) -> Conditions:
    counters = {direction: {key: int(vm_status[direction].get(key, 0)) for key in COUNTERS}
                for direction in ("uplink", "downlink") if isinstance(vm_status.get(direction), dict)}
    return Conditions(skin=vm_status.get("active"), generation=vm_status.get("generation", 0),
                      conditions=vm_status.get("conditions") or {},
                      out_of_tolerance=list(vm_status.get("out_of_tolerance") or []), counters=counters, at=now)
