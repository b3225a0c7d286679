"""Trace stage: Mahimahi delivery opportunities in virtual time, against a slow reference model,
plus loading, validation and the shipped traces."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interceptor import traces
from interceptor.compiled import NS_PER_MS, DirectionSkin
from interceptor.engine.decision import Hold
from interceptor.engine.pipe import Pipe
from interceptor.engine.shaper import RateClock, backlog_ns, shape
from interceptor.engine.trace import OPPORTUNITY_BYTES, CompiledTrace
from interceptor.schema import SkinError, compile_skin, load_skin_file, validate_skin

REPO = Path(__file__).resolve().parents[2]
NS_PER_S = 1_000_000_000
NO_LIMIT_NS = 10**15


def mahimahi(lines: list[int], name: str = "test") -> CompiledTrace:
    return traces.parse_mahimahi("".join(f"{t}\n" for t in lines).encode(), name)


def traced(trace: CompiledTrace, queue_limit_ns: int = NO_LIMIT_NS) -> DirectionSkin:
    return DirectionSkin(ns_per_byte=trace.mean_ns_per_byte, trace=trace, queue_limit_ns=queue_limit_ns)


def opportunity_times(trace: CompiledTrace, origin_ns: int):
    cycle = 0
    while True:
        for t in trace.times_ns:
            yield origin_ns + cycle * trace.period_ns + t
        cycle += 1


def reference(trace: CompiledTrace, packets: list[tuple[int, int]], origin_ns: int) -> list[int]:
    """Ready times by playing the link opportunity by opportunity, as mm-link's rationalize():
    each opportunity delivers up to its bytes from the head of the queue (packets that have
    arrived by then), a packet in transit continues in the next one, leftovers are wasted."""
    ready: list[int] = []
    i, remaining = 0, 0
    for when in opportunity_times(trace, origin_ns):
        if i == len(packets):
            return ready
        budget = trace.opportunity_bytes
        while budget and i < len(packets) and packets[i][0] <= when:
            if not remaining:
                remaining = packets[i][1]
            used = min(budget, remaining)
            remaining -= used
            budget -= used
            if not remaining:
                ready.append(when)
                i += 1
    return ready


def play(skin: DirectionSkin, arrivals: list[tuple[int, int]], clock: RateClock | None = None):
    """(arrival, size, ready or None) per packet, shaped in arrival order."""
    clock = clock or RateClock()
    return [(now, size, shape(skin, clock, size, now)) for now, size in arrivals]


trace_lines = st.lists(st.integers(0, 40), min_size=1, max_size=30).map(sorted).filter(lambda t: t[-1] > 0)
arrival_gaps = st.lists(st.tuples(st.integers(0, 3 * NS_PER_MS), st.integers(1, 4000)), min_size=1, max_size=80)


def timeline(gaps: list[tuple[int, int]], start_ns: int = 0) -> list[tuple[int, int]]:
    now, out = start_ns, []
    for gap, size in gaps:
        now += gap
        out.append((now, size))
    return out


# --- against the reference -------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(lines=trace_lines, gaps=arrival_gaps, start=st.integers(0, 10 * NS_PER_S))
def test_ready_times_match_an_opportunity_by_opportunity_reference(lines, gaps, start):
    trace = mahimahi(lines)
    arrivals = timeline(gaps, start)
    got = [ready for _, _, ready in play(traced(trace), arrivals)]
    assert got == reference(trace, arrivals, origin_ns=arrivals[0][0])


@settings(max_examples=300, deadline=None)
@given(lines=trace_lines, gaps=arrival_gaps, limit_ms=st.integers(1, 30))
def test_queue_limit_drops_at_the_tail_and_a_drop_leaves_no_trace(lines, gaps, limit_ms):
    trace = mahimahi(lines)
    limit_ns = limit_ms * NS_PER_MS
    arrivals = timeline(gaps)
    results = play(traced(trace, limit_ns), arrivals)
    previous_ready = -1
    for now, _, ready in results:
        if ready is None:
            assert previous_ready > now, "a packet that finds the queue empty is never dropped"
            continue
        assert ready >= now, "never ready before its arrival"
        assert ready >= previous_ready, "order is kept"
        if previous_ready > now:
            assert ready - now <= limit_ns, "a queued packet waits at most queue_limit_ms"
        previous_ready = ready
    # Dropped packets change nothing: the accepted ones alone get the same ready times.
    accepted = [(now, size) for now, size, ready in results if ready is not None]
    assert [r for *_, r in results if r is not None] == reference(trace, accepted, arrivals[0][0])


@settings(max_examples=200, deadline=None)
@given(lines=trace_lines, gaps=arrival_gaps)
def test_idle_opportunities_are_not_banked(lines, gaps):
    """Packets i..k are delivered only by opportunities between i's arrival and k's ready time."""
    trace = mahimahi(lines)
    results = play(traced(trace), timeline(gaps))
    origin = results[0][0]
    for i in range(len(results)):
        total = 0
        for k in range(i, len(results)):
            total += results[k][1]
            usable = trace.capacity_bytes(results[i][0] - origin - 1, results[k][2] - origin)
            assert total <= usable


@settings(max_examples=100, deadline=None)
@given(lines=trace_lines, sizes=st.lists(st.integers(40, 1500), min_size=50, max_size=400))
def test_a_saturated_link_delivers_the_traces_capacity(lines, sizes):
    trace = mahimahi(lines)
    results = play(traced(trace), [(0, size) for size in sizes])
    delivered = 0
    for _, size, ready in results:
        delivered += size
        # Every opportunity before this packet's was used in full; its own, in part or in full.
        assert trace.capacity_bytes(-1, ready - 1) < delivered <= trace.capacity_bytes(-1, ready)


# --- examples --------------------------------------------------------------------------------


def test_one_full_size_packet_per_opportunity_and_a_big_packet_spans_several():
    trace = mahimahi([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])  # 12 Mbit/s
    clock = RateClock()
    skin = traced(trace)
    assert [shape(skin, clock, 1500, 0) for _ in range(3)] == [1 * NS_PER_MS, 2 * NS_PER_MS, 3 * NS_PER_MS]
    assert shape(skin, clock, 4000, 0) == 6 * NS_PER_MS  # 1500 + 1500 + 1000: ends in the 3rd
    assert shape(skin, clock, 500, 0) == 6 * NS_PER_MS  # fits in the 500 bytes left of it
    assert shape(skin, clock, 1, 0) == 7 * NS_PER_MS
    assert backlog_ns(clock, 0) == 7 * NS_PER_MS


def test_small_packets_share_an_opportunity_and_the_trace_wraps_at_its_last_timestamp():
    trace = mahimahi([5, 10])  # period 10 ms
    clock = RateClock()
    skin = traced(trace)
    assert [shape(skin, clock, 500, 0) for _ in range(4)] == [5 * NS_PER_MS] * 3 + [10 * NS_PER_MS]
    # Idle until 12 ms (trace time 2 ms of the second cycle): next opportunity at 15 ms.
    assert shape(skin, clock, 100, 12 * NS_PER_MS) == 15 * NS_PER_MS
    # The leftover of the 15 ms opportunity is gone once 15 ms has passed.
    assert shape(skin, clock, 100, 16 * NS_PER_MS) == 20 * NS_PER_MS


def test_an_off_period_holds_the_first_packet_and_drops_what_would_wait_too_long():
    trace = traces.load_file("onoff-24mbps-1s")  # off for (0, 1000] ms, then 2 per ms
    skin = traced(trace, queue_limit_ns=500 * NS_PER_MS)
    clock = RateClock()
    assert shape(skin, clock, 1500, 0) == 1001 * NS_PER_MS  # queue empty: accepted however long
    assert shape(skin, clock, 1500, 1 * NS_PER_MS) is None
    assert shape(skin, clock, 1500, 600 * NS_PER_MS) == 1001 * NS_PER_MS  # shares the first ms
    assert shape(skin, clock, 1500, 600 * NS_PER_MS) == 1002 * NS_PER_MS


def test_a_new_trace_starts_at_its_first_packet_after_any_backlog():
    rate = DirectionSkin(ns_per_byte=1000.0)  # 1 µs per byte
    clock = RateClock()
    assert shape(rate, clock, 1000, 0) == 1 * NS_PER_MS
    trace = mahimahi([1, 2, 3])
    skin = traced(trace)
    # Origin at 0.5 ms (this packet); the rate backlog ends at 1 ms; the first opportunity at or
    # after it is trace time 1 ms = 1.5 ms.
    assert shape(skin, clock, 1500, 500_000) == 1_500_000
    # Back to the rate: it continues behind the trace's backlog.
    assert shape(rate, clock, 1000, 500_000) == 2_500_000
    # The trace again: the rate moved the clock, so it starts afresh at this packet.
    assert shape(skin, clock, 100, 3 * NS_PER_MS) == 4 * NS_PER_MS


def test_the_rate_path_is_untouched_when_no_trace_is_set():
    clock = RateClock()
    assert shape(DirectionSkin(ns_per_byte=8000.0), clock, 1000, 0) == 8_000_000
    assert clock.trace is None
    assert shape(DirectionSkin(), clock, 1000, 5) == 5


def test_a_pipe_holds_packets_until_their_opportunity():
    pipe = Pipe(traced(mahimahi([10, 20])))
    decisions = [pipe.decide(1500, 0, random.random) for _ in range(3)]
    assert decisions == [Hold(10 * NS_PER_MS), Hold(20 * NS_PER_MS), Hold(30 * NS_PER_MS)]


# --- compiling series ------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(interval_ms=st.integers(10, 2000), kbps=st.lists(st.integers(0, 50_000), min_size=1, max_size=20))
def test_a_series_delivers_each_intervals_rate_to_within_an_opportunity(interval_ms, kbps):
    if not any(kbps):
        with pytest.raises(traces.TraceError, match="every rate is 0"):
            traces.compile_series(interval_ms, kbps)
        return
    trace = traces.compile_series(interval_ms, kbps)
    assert trace.opportunity_bytes <= OPPORTUNITY_BYTES
    interval_ns = interval_ms * NS_PER_MS
    total = sum(kbps) * 125 * interval_ms / 1000
    # The long-run rate is exact to within one byte per opportunity.
    assert total - trace.count <= trace.bytes_per_period <= total
    asked = 0.0
    for index, rate in enumerate(kbps):
        asked += rate * 125 * interval_ms / 1000
        delivered = trace.capacity_bytes(0, (index + 1) * interval_ns)
        assert abs(delivered - asked) <= trace.opportunity_bytes + trace.count


def test_series_traces_are_shared_and_validated():
    assert traces.compile_series(100, [64, 128]) is traces.compile_series(100.0, [64.0, 128.0])
    with pytest.raises(traces.TraceError, match="interval_ms"):
        traces.compile_series(5, [64])


# --- loading and the skin schema -------------------------------------------------------------


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "the trace is empty"),
        ("\n\n", "the trace is empty"),
        ("1\n5\n3\n", "line 3: 3 is before the line above (5)"),
        ("0\n0\n", "the last timestamp is 0"),
        ("1\n2.5\n", "line 2: '2.5' is not a whole number"),
        ("1\n-2\n", "line 2: '-2' is not a whole number"),
    ],
)
def test_a_bad_trace_file_is_one_line_naming_the_field_and_the_problem(tmp_path, text, problem):
    (tmp_path / "bad.down").write_text(text)
    with pytest.raises(SkinError) as error:
        validate_skin({"name": "t", "downlink": {"trace": "bad.down"}}, base_dir=tmp_path)
    assert len(error.value.lines) == 1
    line = error.value.lines[0]
    assert line.startswith("downlink.trace: ") and problem in line, line


@pytest.mark.parametrize(
    "trace, problem",
    [
        ("missing.down", "downlink.trace: 'missing.down': no such trace file"),
        ({"interval_ms": 5, "kbps": [100]}, "downlink.trace.interval_ms: 5 is out of range (allowed 10–3600000)"),
        ({"interval_ms": 50, "kbps": [100, -1]}, "downlink.trace.kbps: -1 (interval 1) is negative"),
        ({"interval_ms": 50, "kbps": []}, "downlink.trace.kbps: the series is empty"),
        ({"interval_ms": 50}, "downlink.trace: a series needs kbps too"),
        (7, "downlink.trace: expected a trace file name"),
    ],
)
def test_bad_trace_fields_are_one_line_each(trace, problem):
    with pytest.raises(SkinError) as error:
        validate_skin({"name": "t", "downlink": {"trace": trace}})
    assert error.value.lines == [error.value.lines[0]] and error.value.lines[0].startswith(problem), error.value.lines


def test_a_trace_and_a_rate_in_one_direction_conflict():
    with pytest.raises(SkinError, match="a trace replaces the rate"):
        validate_skin({"name": "t", "uplink": {"trace": "constant-12mbps", "rate_kbps": 100}})


def test_a_relative_trace_resolves_beside_the_skin_file_then_among_the_shipped(tmp_path):
    (tmp_path / "mine.down").write_text("1\n1\n2\n")
    skin_file = tmp_path / "t.yaml"
    skin_file.write_text("bandwidth_limit_kbps: 1000\n"
                         "downlink: {trace: mine.down}\nuplink: {trace: walk-away-from-tower}\n")
    compiled = compile_skin(load_skin_file(skin_file))
    assert compiled.downlink.trace.name == str(tmp_path / "mine.down")
    assert compiled.downlink.trace.count == 3 and compiled.downlink.trace.period_ns == 2 * NS_PER_MS
    assert Path(compiled.uplink.trace.name).parent == traces.shipped_traces_dir()
    # The trace replaces the rate; ns_per_byte carries its mean (12 Mbit/s here: 3 × 1500 B / 2 ms).
    assert compiled.downlink.ns_per_byte == pytest.approx(8e6 / 18_000)
    assert not compiled.downlink.is_passthrough


def test_a_trace_file_version_is_compiled_once(tmp_path):
    path = tmp_path / "a.up"
    path.write_text("1\n2\n")
    first = traces.load_file(str(path))
    assert traces.load_file(str(path)) is first
    path.write_text("1\n2\n3\n")
    assert traces.load_file(str(path)) is not first


def test_the_document_keeps_the_trace_as_written():
    skin = validate_skin({"name": "t", "downlink": {"trace": "constant-12mbps"},
                          "uplink": {"trace": {"interval_ms": 100, "kbps": [64, 128]}}})
    dumped = skin.model_dump(exclude_none=True)
    assert dumped["downlink"] == {"trace": "constant-12mbps"}
    assert dumped["uplink"] == {"trace": {"interval_ms": 100, "kbps": [64, 128]}}
    assert validate_skin(dumped).downlink.trace.compiled() is skin.downlink.trace.compiled()


@pytest.mark.parametrize("name, mbit_s, period_s", [
    ("constant-12mbps", 12, 1), ("onoff-24mbps-1s", 12, 2), ("walk-away-from-tower", None, 40),
])
def test_the_shipped_traces_load_and_have_their_documented_rates(name, mbit_s, period_s):
    trace = traces.load_file(name)
    assert trace.period_ns == period_s * NS_PER_S
    if mbit_s is not None:
        assert 8 * trace.bytes_per_period / period_s == mbit_s * 1_000_000


def test_the_shipped_traces_are_what_the_generator_writes():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "make_traces.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
