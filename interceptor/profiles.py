"""Firewall security profiles: finding, validating and compiling ``rules/*.toml``.

A profile is named by its file stem. The shipped profiles are ``rules/`` of the checkout,
installed with the packages; a host's drop-in rules directory (``rules_dir`` in the host
configuration) comes first and overrides a shipped profile of the same name. Errors are one line
each, like skin errors; ``compile_profile`` turns a valid file into the ``CompiledProfile`` the
kernel chains are rendered from (``interceptor.firewall``).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from importlib import resources
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PlainValidator, ValidationError, ValidationInfo, field_validator

from interceptor.packet import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP
from interceptor.schema import (
    UserError,
    _NAME_RE,
    _NAME_RULE,
    _read_document,
    _show,
    _Strict,
    format_validation_error,
)

RULES_ENV = "NETSKIN_RULES_DIR"
PROFILE_SUFFIX = ".toml"

_RANGE_RE = re.compile(r"\s*([0-9]+)\s*-\s*([0-9]+)\s*")
_PORT_RULE = 'a number 1–65535 or a range "lo-hi" like "8000-8080"'


# Actions. Strings, so that profiles, counters and logs all read the same word.
ALLOW = "allow"
DROP = "drop"
REJECT = "reject"
ACTIONS = (ALLOW, DROP, REJECT)

_PROTO_NAMES = {
    (PROTO_TCP,): "tcp",
    (PROTO_UDP,): "udp",
    (PROTO_ICMP, PROTO_ICMPV6): "icmp",
}


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """One rule, in the form the hot path matches with integer operations.

    ``protos``: protocol numbers, or None for any. ``ports``: inclusive (lo, hi) ranges of the
    destination port (the VM's for "in", the remote's for "out"), or None for any. ``network``:
    the remote peer's network as (IP version, network as int, mask as int), or None for any.
    """

    direction: str  # "in" | "out"
    protos: tuple[int, ...] | None
    ports: tuple[tuple[int, int], ...] | None
    network: tuple[int, int, int] | None
    action: str  # ALLOW | DROP | REJECT

    @property
    def description(self) -> str:
        """The rule in one line, e.g. "in tcp 22,8000-8080 10.0.0.0/8 → allow"."""
        proto = "any" if self.protos is None else _PROTO_NAMES.get(
            self.protos, ",".join(str(p) for p in self.protos)
        )
        ports = "any" if self.ports is None else ",".join(
            str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ports
        )
        return f"{self.direction} {proto} {ports} {_show_network(self.network)} → {self.action}"


@dataclass(frozen=True, slots=True)
class CompiledProfile:
    """A security profile: rules in order (first match wins) and a default per direction."""

    name: str
    rules: tuple[CompiledRule, ...]
    default_in: str
    default_out: str
    description: str = ""


def _show_network(network: tuple[int, int, int] | None) -> str:
    if network is None:
        return "any"
    version, net, mask = network
    prefix = bin(mask).count("1")
    try:
        if version == 4:
            return str(ipaddress.IPv4Network((net, prefix)))
        if version == 6:
            return str(ipaddress.IPv6Network((net, prefix)))
    except ValueError:
        pass
    return f"v{version}:{net:#x}&{mask:#x}"  # not a network the compiler would have made


class ProfileError(UserError):
    """An invalid profile file, or a profile name that names no file."""


def _port(value: Any) -> tuple[int, int]:
    """One entry of ``ports``: 22 or "8000-8080", as an inclusive (lo, hi) range."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= 65_535:
            raise ValueError(f"{_show(value)} is out of range (allowed 1–65535)")
        return value, value
    if isinstance(value, str):
        match = _RANGE_RE.fullmatch(value)
        if match:
            lo, hi = int(match[1]), int(match[2])
            if not (1 <= lo <= 65_535 and 1 <= hi <= 65_535):
                raise ValueError(f"{_show(value)} is out of range (allowed 1–65535)")
            if lo > hi:
                raise ValueError(f"{_show(value)} is an empty range (write the lower port first)")
            return lo, hi
    raise ValueError(f"{_show(value)} is not a port (allowed: {_PORT_RULE})")


def _network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise ValueError(f'{_show(value)} is not a network (allowed: text like "10.0.0.0/8")')
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"{_show(value)} is not an IPv4 or IPv6 network "
            f'(allowed: an address or address/prefix like "10.0.0.0/8" or "2001:db8::/32")'
        ) from None
    raise ValueError(f"{_show(value)} has host bits set (did you mean {_show(str(loose))}?)")


Port = Annotated[tuple[int, int], PlainValidator(_port)]
Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, PlainValidator(_network)]
Action = Literal["allow", "drop", "reject"]


class ProfileRule(_Strict):
    direction: Literal["in", "out"]  # in: towards the VM; out: leaving it
    proto: Literal["tcp", "udp", "icmp", "any"]  # icmp matches ICMPv6 too
    # The destination port: the VM's for "in", the remote's for "out". None: any port.
    ports: list[Port] | None = None
    cidr: Network | None = None  # the remote peer: source for "in", destination for "out"
    action: Action

    @field_validator("ports", mode="before")
    @classmethod
    def _ports_need_a_port_protocol(cls, value: Any, info: ValidationInfo) -> Any:
        proto = info.data.get("proto")
        if value is not None and proto is not None and proto not in ("tcp", "udp"):
            raise ValueError(
                f"{_show(value)} is not allowed with proto {_show(proto)} "
                f'(ports need proto "tcp" or "udp"; or remove ports)'
            )
        if value == []:
            raise ValueError("must not be empty (remove ports to match every port)")
        return value


class Profile(_Strict):
    description: str = ""
    default_in: Action  # for new connections towards the VM that no rule matched
    default_out: Action  # for new connections the VM opens that no rule matched
    rules: list[ProfileRule] = Field(default_factory=list)


def shipped_rules_dir() -> Path:
    """$NETSKIN_RULES_DIR, else the profiles installed with netskin (``packaged_rules_dir``)."""
    override = os.environ.get(RULES_ENV)
    if override:
        return Path(override)
    return packaged_rules_dir()


def packaged_rules_dir() -> Path:
    """``rules/`` as installed with the code: profiles, and the preset skins in ``presets/``."""
    # A wheel installs rules/ as interceptor/shipped_rules (pyproject.toml); a checkout (editable
    # install, or run with the checkout on sys.path) has it beside the packages.
    installed = resources.files("interceptor") / "shipped_rules"
    if installed.is_dir():
        return Path(str(installed))
    return Path(__file__).resolve().parents[1] / "rules"


def profile_dirs(rules_dir: Path | None) -> list[Path]:
    """Where profiles are looked up, first match wins: the drop-in directory, then the shipped."""
    shipped = shipped_rules_dir()
    if rules_dir is None or Path(rules_dir) == shipped:
        return [shipped]
    return [Path(rules_dir), shipped]


def list_profiles(dirs: list[Path]) -> dict[str, Path]:
    """Every profile name (file stem) and the file that defines it, sorted by name."""
    found: dict[str, Path] = {}
    for directory in reversed(dirs):  # later assignments win: the first directory overrides
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            # Dot-files are editor swap files and half-written temporaries.
            if path.suffix == PROFILE_SUFFIX and not path.name.startswith(".") and path.is_file():
                found[path.stem] = path
    return dict(sorted(found.items()))


def load_profile(name: str, dirs: list[Path]) -> CompiledProfile:
    """The compiled profile called ``name``; ``ProfileError`` if unknown or invalid."""
    known = list_profiles(dirs)
    path = known.get(name)
    if path is None:
        near = difflib.get_close_matches(name, list(known), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        where = dirs[0] if dirs else shipped_rules_dir()
        raise ProfileError(
            f"unknown security profile {name!r} ({hint}known: {', '.join(known) or 'none'}); "
            f"add {where / (name + PROFILE_SUFFIX)} or pick one of them"
        )
    return load_profile_file(path)


def load_profile_file(path: str | Path) -> CompiledProfile:
    """Read, validate and compile one profile file; its name is the file stem."""
    path = Path(path)
    if not _NAME_RE.fullmatch(path.stem):
        raise ProfileError(f"{path}: {_show(path.stem)} is not a valid profile name ({_NAME_RULE})")
    data = _read_document(path, ProfileError, suffix=PROFILE_SUFFIX)
    try:
        model = validate_profile(data)
    except ProfileError as error:
        raise ProfileError([f"{path}: {line}" for line in error.lines]) from None
    return compile_profile(model, path.stem)


def validate_profile(data: Any) -> Profile:
    """Validate a parsed profile document; every problem is one line of the ``ProfileError``."""
    try:
        return Profile.model_validate(data)
    except ValidationError as error:
        raise ProfileError(format_validation_error(error, Profile)) from None


_ACTIONS = {"allow": ALLOW, "drop": DROP, "reject": REJECT}
_PROTOS: dict[str, tuple[int, ...] | None] = {
    "tcp": (PROTO_TCP,),
    "udp": (PROTO_UDP,),
    "icmp": (PROTO_ICMP, PROTO_ICMPV6),
    "any": None,
}


def compile_profile(model: Profile, name: str) -> CompiledProfile:
    """The firewall stage's form of a valid profile: protocol numbers, port ranges, int masks."""
    return CompiledProfile(
        name=name,
        rules=tuple(_compile_rule(rule) for rule in model.rules),
        default_in=_ACTIONS[model.default_in],
        default_out=_ACTIONS[model.default_out],
        description=model.description,
    )


def _compile_rule(rule: ProfileRule) -> CompiledRule:
    network = None
    if rule.cidr is not None:
        network = (rule.cidr.version, int(rule.cidr.network_address), int(rule.cidr.netmask))
    return CompiledRule(
        direction=rule.direction,
        protos=_PROTOS[rule.proto],
        ports=None if rule.ports is None else tuple(rule.ports),
        network=network,
        action=_ACTIONS[rule.action],
    )
