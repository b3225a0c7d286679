"""The step clock (engine/timeline.py) and its hook in VmPath, in virtual time."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from interceptor.compiled import CompiledSkin, DirectionSkin
from interceptor.engine import ACCEPT, DROP_LOSS
from interceptor.engine.path import Engine
from interceptor.engine.timeline import NEVER_NS, CompiledStep, CompiledTimeline, StepClock

MS = 1_000_000
BASE = CompiledSkin(name="base")


def timeline_of(lengths_ms: list[int], slices: list[int], repeat: int | None, jitter: float,
                seed: int | None = None) -> CompiledTimeline:
    steps = []
    for i, (length, count) in enumerate(zip(lengths_ms, slices)):
        skins = tuple(CompiledSkin(name=f"step{i}.{k}") for k in range(count))
        steps.append(CompiledStep(length_ns=length * MS, skins=skins, end=CompiledSkin(name=f"step{i}.end")))
    return CompiledTimeline(steps=tuple(steps), repeat=repeat, jitter=jitter, seed=seed)


def reference_schedule(timeline: CompiledTimeline, start_ns: int, seed: int, until_ns: int):
    """Every (begin, end, skin) interval up to ``until_ns``, built independently of StepClock."""
    rng = random.Random(seed if timeline.seed is None else timeline.seed)
    out = [(-(1 << 62), start_ns, BASE)]
    at = start_ns
    cycle = 0
    while at <= until_ns:
        if timeline.repeat is not None and cycle == timeline.repeat:
            out.append((at, NEVER_NS, timeline.steps[-1].end))
            break
        for step in timeline.steps:
            length = step.length_ns
            if timeline.jitter:
                length = round(length * (1 + timeline.jitter * (2 * rng.random() - 1)))
            n = len(step.skins)
            for k, skin in enumerate(step.skins):
                out.append((at + length * k // n, at + length * (k + 1) // n, skin))
            at += length
        cycle += 1
    return out


def in_force(schedule, t: int):
    matches = [skin for begin, end, skin in schedule if begin <= t < end]
    assert len(matches) == 1, (t, matches)  # the intervals partition time
    return matches[0]


timelines = st.builds(
    lambda lengths, slices, repeat, jitter, seed: timeline_of(lengths, slices[: len(lengths)] + [1] * 8, repeat,
                                                              jitter, seed),
    st.lists(st.integers(100, 3000), min_size=1, max_size=5),
    st.lists(st.integers(1, 6), min_size=5, max_size=5),
    st.one_of(st.none(), st.integers(1, 4)),
    st.sampled_from([0.0, 0.1, 0.5, 0.9]),
    st.one_of(st.none(), st.integers(0, 2**32)),
)


@settings(max_examples=300, deadline=None)
@given(timelines, st.integers(0, 2**40), st.integers(0, 2**31),
       st.lists(st.integers(0, 30_000 * MS), min_size=1, max_size=60))
def test_every_instant_maps_to_exactly_one_step(timeline, start_ns, seed, offsets):
    clock = StepClock(timeline, start_ns, BASE, seed=seed)
    times = sorted(start_ns - 5_000 * MS + offset for offset in offsets)
    schedule = reference_schedule(timeline, start_ns, seed, times[-1])
    for t in times:
        assert clock.advance(t) is in_force(schedule, t)
        assert clock.next_change_ns > t
        # The next change is exactly where the schedule's interval ends.
        assert clock.next_change_ns == next(end for begin, end, _ in schedule if begin <= t < end)


@settings(max_examples=200, deadline=None)
@given(timelines, st.integers(0, 2**31), st.integers(0, 200_000 * MS), st.integers(1, 50 * MS))
def test_a_replay_from_start_is_in_phase(timeline, seed, at, stride):
    """A clock jumped straight to ``at`` (a restarted daemon) matches one that lived through it."""
    lived = StepClock(timeline, 0, BASE, seed=seed)
    t = 0
    while t < at:
        lived.advance(t)
        t += stride * 97
    lived.advance(at)
    restarted = StepClock(timeline, 0, BASE, seed=seed)
    assert restarted.advance(at) is lived.skin
    assert restarted.next_change_ns == lived.next_change_ns
    assert (restarted.cycle, restarted.index, restarted.slice) == (lived.cycle, lived.index, lived.slice)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(100, 5000), min_size=1, max_size=4), st.sampled_from([0.05, 0.2, 0.5, 0.9]),
       st.integers(0, 2**31))
def test_jittered_lengths_stay_within_bounds_and_depend_on_the_seed_only(lengths, jitter, seed):
    timeline = timeline_of(lengths, [1] * len(lengths), None, jitter)
    played = []
    clock = StepClock(timeline, 0, BASE, seed=seed)
    for _ in range(40):
        clock.advance(clock.next_change_ns)
        played.append(clock.step_length_ns)
        nominal = timeline.steps[clock.index].length_ns
        assert nominal * (1 - jitter) - 1 <= clock.step_length_ns <= nominal * (1 + jitter) + 1
    again = StepClock(timeline, 0, BASE, seed=seed)
    replayed = []
    for _ in range(40):
        again.advance(again.next_change_ns)
        replayed.append(again.step_length_ns)
    assert replayed == played
    if len(set(played)) > 1:
        other = StepClock(timeline, 0, BASE, seed=seed + 1)
        lengths_other = []
        for _ in range(40):
            other.advance(other.next_change_ns)
            lengths_other.append(other.step_length_ns)
        assert lengths_other != played


def test_a_counted_timeline_holds_its_last_step_and_reports_it():
    timeline = timeline_of([1000, 500], [1, 1], 2, 0.0)
    clock = StepClock(timeline, 10 * MS, BASE)
    assert clock.advance(0) is BASE
    assert clock.position(0)["state"] == "waiting"
    assert clock.advance(10 * MS).name == "step0.0"
    assert clock.position(10 * MS) == {"steps": 2, "repeat": 2, "state": "running", "step": 1, "cycle": 1,
                                        "next_change_in_ms": 1000.0}
    assert clock.advance(1010 * MS).name == "step1.0"
    assert clock.advance(2510 * MS).name == "step1.0"  # cycle 2, second step
    assert clock.position(2510 * MS)["cycle"] == 2
    assert clock.advance(3010 * MS).name == "step1.end"
    assert clock.next_change_ns == NEVER_NS
    assert clock.position(10**12)["state"] == "holding"


def test_a_long_jump_without_jitter_skips_whole_cycles():
    timeline = timeline_of([100, 200], [1, 3], None, 0.0)
    clock = StepClock(timeline, 0, BASE)
    clock.advance(0)
    t = 10**6 * 300 * MS + 150 * MS  # a million cycles later, 50 ms into the ramp's first slice
    assert clock.advance(t).name == "step1.0"
    assert clock.cycle == 10**6
    assert clock.next_change_ns == 10**6 * 300 * MS + 100 * MS + 200 * MS // 3


# --- the hook in VmPath -------------------------------------------------------------------------

LOSS = CompiledSkin(name="outage", uplink=DirectionSkin(loss_probability=1.0),
                    downlink=DirectionSkin(loss_probability=1.0))
OPEN = CompiledSkin(name="open")


def test_without_a_timeline_the_path_never_asks_the_clock():
    path = Engine().add_vm("vm")
    path.set_skin(OPEN, 1)
    assert path.next_change_ns == NEVER_NS and path.timeline is None


def test_each_packet_is_judged_by_the_step_in_force_at_its_arrival():
    """2 s open, 0.5 s outage, repeated: a packet at t is dropped iff t falls in an outage."""
    timeline = CompiledTimeline(steps=(CompiledStep(2000 * MS, (OPEN,), OPEN),
                                       CompiledStep(500 * MS, (LOSS,), LOSS)))
    base = CompiledSkin(name="open", timeline=timeline)
    path = Engine().add_vm("vm")
    start = 5 * MS
    path.set_skin(base, 1, StepClock(timeline, start, base))
    rand = random.Random(1).random
    for t in range(0, 12_000 * MS, MS // 4):
        verdict = path.on_uplink(object(), 100, None, t, rand)
        in_outage = t >= start and (t - start) % (2500 * MS) >= 2000 * MS
        assert verdict is (DROP_LOSS if in_outage else ACCEPT), t
        assert path.generation == 1
    # A swap to another skin (rollback, revert) stops the timeline.
    path.set_skin(OPEN, 2)
    assert path.on_uplink(object(), 100, None, 2_000 * MS + 12_000 * MS, rand) is ACCEPT
    assert path.next_change_ns == NEVER_NS


def test_a_timeline_with_dns_in_one_step_makes_the_shell_pass_bytes_in_every_step():
    from interceptor.schema import compile_skin, validate_skin
    from interceptor.timeline import compile_timeline

    skin = validate_skin({"name": "d", "timeline": {"steps": [{"for": 1}, {"for": 1, "set": {"dns": {"delay_ms": 500}}}]}})
    base = compile_skin(skin)
    base = CompiledSkin(name=base.name, timeline=compile_timeline(skin, base))
    path = Engine().add_vm("vm")
    path.set_skin(base, 1, StepClock(base.timeline, 0, base))
    assert path.needs_payload_down and not path.needs_payload_up
