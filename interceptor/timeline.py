"""Timelines in a skin: the ``timeline`` field's schema, its checks, and its compilation.

A step's ``set`` is laid over the skin's own fields and must make a valid skin, checked with the
same one-line errors as any skin. ``compile_timeline`` turns every step, and every update slice of
a ramp, into a ``CompiledSkin`` up front, so the engine's step clock (``engine/timeline.py``) only
swaps references. Identity fields cannot change per step: they are kernel state (addresses, MAC,
MTU, NAT, firewall chains) that cannot be changed atomically between two packets.

This module is imported by ``interceptor.schema`` for the field's type; it reaches back into the
schema (to validate a step as a skin) only inside functions.
"""

from __future__ import annotations

import copy
import math
import re
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from interceptor.engine.timeline import CompiledStep, CompiledTimeline

if TYPE_CHECKING:
    from interceptor.compiled import CompiledSkin
    from interceptor.schema import Skin

NS_PER_S = 1_000_000_000
MIN_STEP_NS = 100_000_000  # trio's sleeps and a shared host make shorter steps meaningless
RAMP_SLICE_NS = 50_000_000  # a ramp's value changes 20 times a second
MAX_RAMP_SLICES = 36_000  # per timeline: 30 minutes of ramps (each slice is a compiled skin)

# Kernel state, not engine state: a change needs netlink/iptables work that cannot be swapped
# between two packets, so a step that changed them would leak traffic or block it mid-change.
IDENTITY_FIELDS = ("ip_address", "mac_address", "mtu", "dns_servers", "security_profile")
NOT_CONDITIONS = ("name", "skin_name", "description", "optional", "timeline")
# A step that sets one of these also replaces the skin's value given under the other name.
_ALIAS_OF = {"simulated_latency_ms": "latency_ms", "latency_ms": "simulated_latency_ms",
             "packet_loss_probability": "packet_loss_percent", "packet_loss_percent": "packet_loss_probability"}
_LOSS_FIELDS = ("packet_loss_percent", "packet_loss_probability")
RAMPABLE = (
    "latency_ms", "jitter_ms", "reorder_percent", "packet_loss_percent", "bandwidth_limit_kbps",
    "queue_limit_ms", "qos_priority",
    *(f"{d}.{f}" for d in ("uplink", "downlink") for f in ("delay_ms", "jitter_ms", "loss_percent", "rate_kbps")),
    "dns.delay_ms",
)
_RATES = ("bandwidth_limit_kbps", "uplink.rate_kbps", "downlink.rate_kbps")

_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)\s*")
_UNIT_NS = {"ms": 1_000_000, "s": NS_PER_S, "m": 60 * NS_PER_S, "h": 3600 * NS_PER_S}
_DURATION_RULE = 'seconds as a number, or text with a unit: "500ms", "2s", "1m", "1h"'


def duration_ns(value: Any) -> int:
    """A step length: seconds as a number, or text with a unit; ``ValueError`` with the rule."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{_show(value)} is not a duration ({_DURATION_RULE})")
    if isinstance(value, str):
        match = _DURATION_RE.fullmatch(value)
        if not match:
            raise ValueError(f"{_show(value)} is not a duration ({_DURATION_RULE})")
        ns = round(float(match[1]) * _UNIT_NS[match[2]])
    else:
        if not math.isfinite(value):
            raise ValueError(f"{_show(value)} is not a duration ({_DURATION_RULE})")
        ns = round(value * NS_PER_S)
    if ns < MIN_STEP_NS:
        raise ValueError(f"{_show(value)} is shorter than 100 ms (the shortest step allowed)")
    if ns > 366 * 86400 * NS_PER_S:
        raise ValueError(f"{_show(value)} is longer than a year (the longest step allowed)")
    return ns


def start_unix_ns(value: Any) -> int:
    """A wall-clock start: unix seconds, or ISO-8601 text with a UTC offset."""
    if isinstance(value, bool):
        raise ValueError(f"{_show(value)} is not a start time (unix seconds or ISO-8601 with an offset)")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{_show(value)} is not a start time (unix seconds ≥ 0)")
        return round(value * NS_PER_S)
    if isinstance(value, datetime):  # TOML parses an offset date-time itself
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"{_show(value)} is not an ISO-8601 time (e.g. 2025-06-01T12:00:00Z)") from None
    else:
        raise ValueError(f"{_show(value)} is not a start time (unix seconds or ISO-8601 with an offset)")
    if moment.tzinfo is None:
        raise ValueError(f"{_show(str(value))} has no UTC offset; add Z or +HH:MM so every host reads "
                         f"the same instant")
    return round(moment.timestamp() * NS_PER_S)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True, serialize_by_alias=True)


class TimelineStep(_Strict):
    """``{for: DURATION, set: {skin fields}, ramp: [fields] | true}``."""

    length: Any = Field(alias="for")  # kept as written (shown back as written); see length_ns
    overlay: dict[str, Any] = Field(default={}, alias="set")
    ramp: bool | list[str] = False

    @field_validator("length")
    @classmethod
    def _length(cls, value: Any) -> Any:
        duration_ns(value)
        return value

    @property
    def length_ns(self) -> int:
        return duration_ns(self.length)

    def ramped(self) -> list[str]:
        """The fields this step ramps, as dotted names."""
        if self.ramp is True:
            return [name for name in RAMPABLE if _get(self.overlay, name) is not None]
        return list(self.ramp or [])


class Timeline(_Strict):
    """Steps laid over the skin's own fields, played in order from ``start``."""

    steps: Annotated[list[TimelineStep], Field(min_length=1, max_length=10_000)]
    repeat: Annotated[int, Field(ge=1, strict=True)] | Literal["forever"] = "forever"
    start: Any = None  # unix seconds or ISO-8601; None: when the skin is applied
    jitter_percent: Annotated[float, Field(ge=0, le=90, strict=True)] = 0
    seed: Annotated[int, Field(ge=0, le=2**63 - 1, strict=True)] | None = None

    @field_validator("start")
    @classmethod
    def _start(cls, value: Any) -> Any:
        if value is not None:
            start_unix_ns(value)
        return value.isoformat() if isinstance(value, datetime) else value

    @property
    def start_unix_ns(self) -> int | None:
        return None if self.start is None else start_unix_ns(self.start)


# --- steps as skins -----------------------------------------------------------------------------


def base_document(skin: Skin) -> dict:
    """The skin's own fields, canonical names only, as a plain document (the steps' ground)."""
    from interceptor.schema import SKIN_ALIASES

    return skin.model_dump(mode="json", exclude=set(SKIN_ALIASES) | {"timeline"}, exclude_none=True)


def overlay(base: dict, fields: dict) -> dict:
    """``fields`` laid over ``base``: tables merge key by key, everything else is replaced."""
    doc = copy.deepcopy(base)
    for key, value in fields.items():
        doc.pop(_ALIAS_OF.get(key, ""), None)
        if key in _LOSS_FIELDS and "loss_model" not in fields:
            doc.pop("loss_model", None)  # a step's loss replaces the skin's loss model
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = _merge(doc[key], value)
        else:
            doc[key] = copy.deepcopy(value)
    return doc


def _merge(base: dict, fields: dict) -> dict:
    out = dict(base)
    for key, value in fields.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def step_skins(skin: Skin) -> tuple[list[Skin], list[str]]:
    """Each step's skin (the skin's fields with the step's ``set`` laid over), and the problems.

    Problems are one line each, naming ``timeline.steps[i]...`` the field, the value and the rule.
    """
    from interceptor.schema import Skin as SkinModel
    from interceptor.schema import _format_one

    timeline = skin.timeline
    base = base_document(skin)
    base_dir = getattr(skin, "_base_dir", None)  # where the skin's trace files are looked up
    skins: list[Skin] = []
    problems: list[str] = []
    total_slices = 0
    previous = skin
    for i, step in enumerate(timeline.steps):
        where = f"timeline.steps[{i}]"
        bad = False
        for key in step.overlay:
            if key in IDENTITY_FIELDS:
                problems.append(
                    f"{where}.set.{key}: identity fields cannot change per step (a change needs kernel "
                    f"work that cannot be swapped atomically between two packets); set {key} on the skin itself")
                bad = True
            elif key in NOT_CONDITIONS:
                problems.append(f"{where}.set.{key}: not a network condition; a step may set condition "
                                f"fields only (latency_ms, packet_loss_percent, uplink, dns, ...)")
                bad = True
        if bad:
            skins.append(previous)
            continue
        try:
            stepped = SkinModel.model_validate(overlay(base, step.overlay), context={"base_dir": base_dir})
            if base_dir is not None:
                stepped._base_dir = base_dir
        except ValidationError as error:
            for detail in error.errors():
                line = _format_one(detail, SkinModel)
                problems.append(f"{where}.set.{line}" if detail["loc"] else f"{where}: {line}")
            skins.append(previous)
            continue
        for name in step.ramped():
            problem = _ramp_problem(name, step, previous, stepped)
            if problem:
                problems.append(f"{where}.ramp: {problem}")
        if step.ramp is True and not step.ramped():
            problems.append(f"{where}.ramp: true, but set has no field that can ramp "
                            f"(rampable: {', '.join(RAMPABLE)})")
        if step.ramped():
            total_slices += _slices(step.length_ns)
        # A shortened step (jitter) must still last 100 ms.
        if step.length_ns * (1 - timeline.jitter_percent / 100) < MIN_STEP_NS - 1:
            problems.append(f"{where}.for: {_show(step.length)} less jitter_percent {_show(timeline.jitter_percent)} "
                            f"can be shorter than 100 ms (the shortest step allowed); lengthen it or lower the jitter")
        skins.append(stepped)
        previous = stepped
    if total_slices > MAX_RAMP_SLICES:
        problems.append(f"timeline: ramps total {total_slices / 20:.0f} s; at most {MAX_RAMP_SLICES // 20} s of "
                        f"ramps per timeline (each 50 ms of ramp is a precompiled skin)")
    return skins, problems


def _ramp_problem(name: str, step: TimelineStep, previous: Skin, stepped: Skin) -> str | None:
    if name not in RAMPABLE:
        return f"{_show(name)} cannot ramp (rampable: {', '.join(RAMPABLE)})"
    if _get(step.overlay, name) is None:
        return f"{name} is not in set (a ramp goes to the step's set value over its duration)"
    if name in _RATES and (value_of(previous, name) == 0 or value_of(stepped, name) == 0):
        return f"{name} cannot ramp from or to 0 (0 means unlimited); give a rate at both ends"
    return None


def _slices(length_ns: int) -> int:
    return max(1, -(-length_ns // RAMP_SLICE_NS))


def _get(document: dict, dotted: str) -> Any:
    value: Any = document
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def value_of(skin: Skin, dotted: str) -> float:
    """The value in force of a rampable field (one-way values for uplink./downlink.)."""
    head, _, field = dotted.partition(".")
    if head in ("uplink", "downlink"):
        return float(getattr(skin.link(head), field))
    if head == "dns":
        return float(skin.dns.delay_ms) if skin.dns else 0.0
    return float(getattr(skin, head))


def _with_value(skin: Skin, dotted: str, value: float) -> Skin:
    head, _, field = dotted.partition(".")
    if head == "qos_priority":
        return skin.model_copy(update={head: round(value)})
    if not field:
        return skin.model_copy(update={head: value})
    from interceptor.schema import DnsConfig, Direction

    part = getattr(skin, head) or (DnsConfig() if head == "dns" else Direction())
    return skin.model_copy(update={head: part.model_copy(update={field: value})})


# --- compiling ------------------------------------------------------------------------------------


def compile_timeline(skin: Skin, base: CompiledSkin) -> CompiledTimeline:
    """Every step and ramp slice of ``skin.timeline`` as a ``CompiledSkin``.

    Step skins carry the base's identity and resolved firewall (identity never changes per step).
    ``SkinError`` if a step is invalid.
    """
    from dataclasses import replace

    from interceptor.schema import SkinError, compile_skin

    skins, problems = step_skins(skin)
    if problems:
        raise SkinError(problems)
    timeline = skin.timeline

    def compiled(s: Skin) -> CompiledSkin:
        return replace(compile_skin(s), name=base.name, firewall=base.firewall)

    steps = []
    previous = skin
    for step, stepped in zip(timeline.steps, skins):
        end = compiled(stepped)
        ramp = tuple((name, value_of(previous, name), value_of(stepped, name)) for name in step.ramped())
        if ramp:
            count = _slices(step.length_ns)
            slices = []
            for k in range(count):
                at = stepped
                for name, low, high in ramp:
                    # Each slice takes the ramp's value at its end, so the last one is the target.
                    at = _with_value(at, name, low + (high - low) * (k + 1) / count)
                slices.append(compiled(at) if k + 1 < count else end)
            skins_of_step = tuple(slices)
        else:
            skins_of_step = (end,)
        steps.append(CompiledStep(length_ns=step.length_ns, skins=skins_of_step, end=end, ramp=ramp))
        previous = stepped
    return CompiledTimeline(
        steps=tuple(steps),
        repeat=None if timeline.repeat == "forever" else timeline.repeat,
        jitter=timeline.jitter_percent / 100,
        seed=timeline.seed,
        start_unix_ns=timeline.start_unix_ns,
    )


def compile_document_timeline(document: dict, name: str, base: CompiledSkin,
                              source: str | None = None) -> CompiledTimeline | None:
    """The timeline of a stored skin document (None without one), for ``base``, its compiled skin
    with the firewall resolved; ``SkinError`` if invalid."""
    if not isinstance(document, dict) or document.get("timeline") is None:
        return None
    from pathlib import Path

    from interceptor.schema import Skin, SkinError, _format_one

    base_dir = Path(source).parent if source else None
    try:
        skin = Skin.model_validate(document, context={"default_name": name, "base_dir": base_dir})
    except ValidationError as error:
        raise SkinError([_format_one(detail, Skin) for detail in error.errors()]) from None
    if base_dir is not None:
        skin._base_dir = base_dir
    return compile_timeline(skin, base)


def _show(value: Any) -> str:
    from interceptor.schema import _show as show

    return show(value)
