"""Delay stage: delay, uniform jitter, FIFO order unless reordering is asked for."""

from random import Random

from hypothesis import given, settings
from hypothesis import strategies as st

from interceptor.compiled import NS_PER_MS, DirectionSkin
from interceptor.engine.delay import DelayLine, departure


def run(skin: DirectionSkin, gaps: list[int], seed: int = 0) -> list[tuple[int, int]]:
    """(ready_ns, departure_ns) for packets ready at the cumulative gaps."""
    line = DelayLine()
    random = Random(seed).random
    out, now = [], 0
    for gap in gaps:
        now += gap
        out.append((now, departure(skin, line, now, random)))
    return out


def test_fixed_delay():
    skin = DirectionSkin(delay_ns=10 * NS_PER_MS)
    assert run(skin, [0, 5, 5]) == [(0, 10 * NS_PER_MS), (5, 10 * NS_PER_MS + 5), (10, 10 * NS_PER_MS + 10)]


def test_jitter_is_uniform_over_the_whole_interval():
    delay, jitter = 100_000, 50_000
    skin = DirectionSkin(delay_ns=delay, jitter_ns=jitter)
    random = Random(4).random
    added = [departure(skin, DelayLine(), 0, random) for _ in range(50_000)]
    assert min(added) >= delay - jitter and max(added) <= delay + jitter
    assert min(added) < delay - 0.99 * jitter and max(added) > delay + 0.99 * jitter
    assert abs(sum(added) / len(added) - delay) < 0.01 * jitter
    below = sum(1 for a in added if a < delay)
    assert abs(below / len(added) - 0.5) < 0.01


def test_jitter_larger_than_delay_never_departs_before_ready():
    skin = DirectionSkin(delay_ns=1000, jitter_ns=5000)
    assert all(dep >= ready for ready, dep in run(skin, [10_000] * 2000))


gaps = st.lists(st.integers(0, 20 * NS_PER_MS), min_size=1, max_size=200)


@settings(max_examples=300, deadline=None)
@given(
    gaps=gaps,
    delay_ms=st.integers(0, 500),
    jitter_ms=st.integers(0, 500),
    seed=st.integers(0, 2**32),
)
def test_order_is_kept_under_jitter_without_reordering(gaps, delay_ms, jitter_ms, seed):
    delay_ns, jitter_ns = delay_ms * NS_PER_MS, jitter_ms * NS_PER_MS
    skin = DirectionSkin(delay_ns=delay_ns, jitter_ns=jitter_ns)
    result = run(skin, gaps, seed)
    departures = [dep for _, dep in result]
    assert departures == sorted(departures)
    for ready, dep in result:
        assert dep >= ready
        assert dep >= ready + delay_ns - jitter_ns  # FIFO only ever adds delay
    # A packet departing later than its own jitter allows did so only to wait for the one ahead.
    for (ready, dep), previous in zip(result[1:], departures):
        if dep > ready + delay_ns + jitter_ns:
            assert dep == previous


def test_reordering_lets_some_packets_overtake():
    skin = DirectionSkin(delay_ns=50 * NS_PER_MS, reorder_probability=0.25)
    result = run(skin, [NS_PER_MS] * 2000, seed=9)
    departures = [dep for _, dep in result]
    overtakes = sum(1 for a, b in zip(departures, departures[1:]) if b < a)
    assert overtakes > 100
    reordered = [(ready, dep) for ready, dep in result if dep == ready]
    assert abs(len(reordered) / 2000 - 0.25) < 0.05
    # The others keep the full delay and their order among themselves.
    in_line = [dep for ready, dep in result if dep != ready]
    assert in_line == sorted(in_line)
    assert all(dep == ready + 50 * NS_PER_MS for ready, dep in result if dep != ready)


def test_a_reordered_packet_does_not_move_the_line():
    line = DelayLine()
    delayed = DirectionSkin(delay_ns=1000)
    assert departure(delayed, line, 0, lambda: 0.5) == 1000
    ahead = DirectionSkin(delay_ns=1000, reorder_probability=1.0)
    assert departure(ahead, line, 10, lambda: 0.5) == 10
    assert line.last_departure_ns == 1000
