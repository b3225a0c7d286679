"""Timelines in a skin: the schema's checks and the compilation into precomputed skins."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interceptor.library import SkinLibrary
from interceptor.schema import SkinError, compile_skin, validate_skin
from interceptor.timeline import compile_timeline, duration_ns

MS = 1_000_000
S = 1_000_000_000


def timeline_skin(timeline: dict, **fields):
    return validate_skin({"name": "t", **fields, "timeline": timeline})


def compiled(timeline: dict, **fields):
    skin = timeline_skin(timeline, **fields)
    return compile_timeline(skin, compile_skin(skin))


def errors(timeline: dict, **fields) -> list[str]:
    with pytest.raises(SkinError) as caught:
        timeline_skin(timeline, **fields)
    return caught.value.lines


@pytest.mark.parametrize("written, ns", [(2, 2 * S), (0.5, 500 * MS), ("500ms", 500 * MS), ("2s", 2 * S),
                                         ("1m", 60 * S), ("1.5 s", 1500 * MS), ("1h", 3600 * S), (0.1, 100 * MS)])
def test_durations(written, ns):
    assert duration_ns(written) == ns


def test_steps_are_laid_over_the_skins_own_fields():
    timeline = compiled({"steps": [{"for": 2}, {"for": "500ms", "set": {"packet_loss_percent": 100,
                                                                        "uplink": {"delay_ms": 5}}}],
                         "repeat": 3},
                        latency_ms=40, bandwidth_limit_kbps=1000, uplink={"jitter_ms": 2})
    plain, outage = (step.end for step in timeline.steps)
    assert (plain.uplink.delay_ns, plain.uplink.jitter_ns, plain.uplink.loss_probability) == (20 * MS, 2 * MS, 0)
    # uplink tables merge: the step's delay_ms beside the skin's jitter_ms; the rest is the skin's.
    assert (outage.uplink.delay_ns, outage.uplink.jitter_ns, outage.uplink.loss_probability) == (5 * MS, 2 * MS, 1)
    assert outage.downlink.delay_ns == 20 * MS and outage.uplink.ns_per_byte == plain.uplink.ns_per_byte
    assert [step.length_ns for step in timeline.steps] == [2 * S, 500 * MS]
    assert timeline.repeat == 3 and timeline.jitter == 0


def test_a_step_overrides_aliases_and_loss_models_of_the_skin():
    timeline = compiled({"steps": [{"for": 1, "set": {"latency_ms": 300, "packet_loss_percent": 100}}]},
                        simulated_latency_ms=100, loss_model={"gilbert_elliott": {"p": 1, "r": 50}})
    step = timeline.steps[0].end
    assert step.uplink.delay_ns == 150 * MS
    assert step.uplink.loss_probability == 1.0 and step.uplink.gilbert_elliott is None


def test_step_skins_keep_the_skins_identity():
    skin = timeline_skin({"steps": [{"for": 1, "set": {"latency_ms": 10}}]}, mtu=1400,
                         ip_address="10.9.9.9", dns_servers=["10.0.0.53"])
    timeline = compile_timeline(skin, compile_skin(skin))
    step = timeline.steps[0].end
    assert (step.name, step.mtu, step.ip_address, step.dns_servers) == ("t", 1400, "10.9.9.9", ("10.0.0.53",))
    assert step.timeline is None


def test_defaults_start_and_seed():
    timeline = compiled({"steps": [{"for": 1}], "start": "2030-01-01T00:00:00Z", "seed": 7, "jitter_percent": 10})
    assert timeline.repeat is None  # forever by default
    assert timeline.start_unix_ns == 1893456000 * S and timeline.seed == 7 and timeline.jitter == 0.1
    assert compiled({"steps": [{"for": 1}], "start": 1893456000}).start_unix_ns == 1893456000 * S


@pytest.mark.parametrize("timeline, fields, line", [
    ({"steps": [{"for": "50ms"}]}, {},
     'timeline.steps[0].for: "50ms" is shorter than 100 ms (the shortest step allowed)'),
    ({"steps": [{"for": 0.05}]}, {}, "timeline.steps[0].for: 0.05 is shorter than 100 ms (the shortest step allowed)"),
    ({"steps": [{"for": "2 weeks"}]}, {}, 'timeline.steps[0].for: "2 weeks" is not a duration'),
    ({"steps": [{"for": 1}, {"for": 1, "set": {"packet_loss_percent": 150}}]}, {},
     "timeline.steps[1].set.packet_loss_percent: 150 is out of range (allowed 0–100)"),
    ({"steps": [{"for": 1, "set": {"uplink": {"delay_ms": -1}}}]}, {},
     "timeline.steps[0].set.uplink.delay_ms: -1 is out of range (allowed 0–60000)"),
    ({"steps": [{"for": 1, "set": {"latncy_ms": 5}}]}, {}, "timeline.steps[0].set.latncy_ms: unknown field; did you mean latency_ms?"),
    ({"steps": [{"for": 1, "set": {"mtu": 1400}}]}, {},
     "timeline.steps[0].set.mtu: identity fields cannot change per step"),
    ({"steps": [{"for": 1, "set": {"security_profile": "open"}}]}, {},
     "timeline.steps[0].set.security_profile: identity fields cannot change per step"),
    ({"steps": [{"for": 1, "set": {"dns_servers": ["10.0.0.1"]}}]}, {},
     "timeline.steps[0].set.dns_servers: identity fields cannot change per step"),
    ({"steps": [{"for": 1, "set": {"name": "x"}}]}, {}, "timeline.steps[0].set.name: not a network condition"),
    ({"steps": [{"for": 1, "set": {"mtu": 500}, "ramp": ["mtu"]}]}, {}, 'timeline.steps[0].set.mtu: identity'),
    ({"steps": [{"for": 1, "set": {"latency_ms": 5}, "ramp": ["jitter_ms"]}]}, {},
     "timeline.steps[0].ramp: jitter_ms is not in set"),
    ({"steps": [{"for": 1, "set": {"bandwidth_limit_kbps": 500}, "ramp": True}]}, {},
     "timeline.steps[0].ramp: bandwidth_limit_kbps cannot ramp from or to 0"),
    ({"steps": [{"for": 0.2}], "jitter_percent": 60}, {}, "timeline.steps[0].for: 0.2 less jitter_percent 60"),
    ({"steps": []}, {}, "timeline.steps"),
    ({"steps": [{"for": 1}], "repeat": 0}, {}, "timeline.repeat"),
    ({"steps": [{"for": 1}], "start": "2030-01-01T00:00:00"}, {}, "timeline.start: "),
    ({"steps": [{"for": 1}], "jitter_percent": 95}, {}, "timeline.jitter_percent: 95 is out of range (allowed 0–90)"),
    ({"steps": [{"for": 1}], "every": 3}, {}, "timeline.every: unknown field"),
])
def test_invalid_timelines_are_one_line_each(timeline, fields, line):
    lines = errors(timeline, **fields)
    assert any(found.startswith(line) for found in lines), lines


def test_identity_error_says_why():
    (line,) = errors({"steps": [{"for": 1, "set": {"ip_address": "10.1.1.1"}}]})
    assert "atomically" in line and "set ip_address on the skin itself" in line


@settings(max_examples=100, deadline=None)
@given(st.floats(0, 60_000), st.floats(0, 60_000), st.integers(100, 60_000), st.floats(0, 100))
def test_ramps_are_monotone_fine_grained_and_reach_their_value(start_ms, target_ms, length_ms, loss):
    timeline = compiled({"steps": [{"for": length_ms / 1000, "set": {"latency_ms": target_ms,
                                                                     "packet_loss_percent": loss},
                                    "ramp": True}], "repeat": 1}, latency_ms=start_ms)
    step = timeline.steps[0]
    delays = [skin.uplink.delay_ns for skin in step.skins]
    losses = [skin.uplink.loss_probability for skin in step.skins]
    assert len(step.skins) >= length_ms / 100  # at least ten updates a second
    for values in (delays, losses):
        assert values == sorted(values) or values == sorted(values, reverse=True)
    assert delays[-1] == round(target_ms / 2 * MS) and losses[-1] == pytest.approx(loss / 100)
    assert step.end is step.skins[-1]
    # No slice jumps more than one slice's share of the way (no steps bigger than the ramp's grain).
    grain = abs(target_ms - start_ms) / 2 * MS / len(step.skins)
    for a, b in zip([round(start_ms / 2 * MS)] + delays, delays):
        assert abs(b - a) <= grain + 1
    assert {name for name, _, _ in step.ramp} == {"latency_ms", "packet_loss_percent"}


def test_a_ramp_starts_from_the_value_the_previous_step_leaves():
    timeline = compiled({"steps": [{"for": 1, "set": {"uplink": {"delay_ms": 100}}},
                                   {"for": 1, "set": {"uplink": {"delay_ms": 0}}, "ramp": ["uplink.delay_ms"]}]},
                        latency_ms=40)
    ramp = timeline.steps[1]
    assert ramp.ramp == (("uplink.delay_ms", 100.0, 0.0),)
    assert len(ramp.skins) == 20
    assert ramp.skins[0].uplink.delay_ns == 95 * MS and ramp.skins[-1].uplink.delay_ns == 0
    assert ramp.skins[0].downlink.delay_ns == 20 * MS  # the other direction is not ramped


def test_too_much_ramp_is_refused():
    lines = errors({"steps": [{"for": "31m", "set": {"latency_ms": 100}, "ramp": True}]})
    assert lines[0].startswith("timeline: ramps total 1860 s; at most 1800 s of ramps per timeline")


PRESETS = ("flapping-link", "outage-every-minute", "walk-out-of-coverage", "dns-outage")


@pytest.mark.parametrize("name", PRESETS)
def test_presets_with_timelines_are_valid_and_compile(tmp_path, name):
    entry = SkinLibrary(tmp_path).entry(name)
    assert not entry.errors and entry.origin == "preset"
    assert entry.skin.description and entry.skin.timeline is not None
    timeline = compile_timeline(entry.skin, compile_skin(entry.skin))
    assert len(timeline.steps) >= 2


def test_walk_out_of_coverage_reaches_offline_and_comes_back(tmp_path):
    skin = SkinLibrary(tmp_path).entry("walk-out-of-coverage").skin
    timeline = compile_timeline(skin, compile_skin(skin))
    losses = [s.uplink.loss_probability for step in timeline.steps for s in step.skins]
    assert losses[0] == 0 and max(losses) == 1.0 and losses[-1] == 0
    assert any(step.ramp for step in timeline.steps)


def test_dns_outage_withholds_answers_only_during_its_outage(tmp_path):
    skin = SkinLibrary(tmp_path).entry("dns-outage").skin
    timeline = compile_timeline(skin, compile_skin(skin))
    dns = [step.end.dns for step in timeline.steps]
    assert dns[0] is None and dns[-1] is not None and dns[-1].delay_ns >= 30 * S
    assert all(step.end.uplink.loss_probability == 0 for step in timeline.steps)
