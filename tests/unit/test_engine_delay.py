"""Delay stage: the delay is a smooth random process with the asked marginal; FIFO order unless
reordering is asked for. Virtual time: packets at fixed rates, fixed or drawn seeds."""

import math
import statistics
from random import Random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.stats import percentile
from interceptor.compiled import NS_PER_MS, DirectionSkin
from interceptor.engine.delay import DelayLine, departure

DISTRIBUTIONS = ("uniform", "normal", "pareto", "paretonormal")


def run(skin: DirectionSkin, gaps: list[int], seed: int = 0) -> list[tuple[int, int]]:
    """(ready_ns, departure_ns) for packets ready at the cumulative gaps."""
    line = DelayLine()
    random = Random(seed).random
    out, now = [], 0
    for gap in gaps:
        now += gap
        out.append((now, departure(skin, line, now, random)))
    return out


def added_ms(skin: DirectionSkin, rate_pps: int, seconds: float, seed: int) -> list[float]:
    gap = 1_000_000_000 // rate_pps
    return [(dep - ready) / NS_PER_MS for ready, dep in run(skin, [gap] * int(rate_pps * seconds), seed)]


# The asked quantiles (p10, p50, p90) of each shape, in units of jitter around the delay:
# uniform on [-1, 1]; the standard normal; netem's pareto and paretonormal tables (the
# quantile functions their generators in iproute2's netem/ directory tabulate).
def _pareto(p: float) -> float:
    return min((4 / 3) * ((1 - p) ** (-1 / 3) - 1.5), 32767 / 8192)


_Z = {0.1: -1.2815516, 0.5: 0.0, 0.9: 1.2815516}
ASKED = {
    "uniform": {p: 2 * p - 1 for p in _Z},
    "normal": dict(_Z),
    "pareto": {p: _pareto(p) for p in _Z},
    "paretonormal": {p: 0.25 * _Z[p] + 0.75 * _pareto(p) for p in _Z},
}


def test_fixed_delay():
    skin = DirectionSkin(delay_ns=10 * NS_PER_MS)
    assert run(skin, [0, 5, 5]) == [(0, 10 * NS_PER_MS), (5, 10 * NS_PER_MS + 5), (10, 10 * NS_PER_MS + 10)]


@pytest.mark.parametrize("shape", ["uniform", "normal"])
@pytest.mark.parametrize("rate_pps", [100, 1000, 5000])
def test_marginal_quantiles_are_the_asked_ones_at_any_packet_rate(shape, rate_pps):
    """delay 20 ms, jitter 10 ms: the old order-keeping jitter measured p10/p50/p90 of
    22.2/25.7/28.8 ms at 1000 packets/s instead of 12/20/28. 200 virtual seconds are 4000 of the
    process's 50 ms time scales; over them a quantile's standard error is about 0.15 ms (uniform)
    and 0.25 ms (normal), so 1 ms is 4 of them or more."""
    skin = DirectionSkin(delay_ns=20 * NS_PER_MS, jitter_ns=10 * NS_PER_MS, jitter_distribution=shape)
    for seed in (1, 2):
        added = added_ms(skin, rate_pps, 200, seed)
        for p, asked in ASKED[shape].items():
            measured = percentile(added, 100 * p)
            assert abs(measured - (20 + 10 * asked)) < 1.0, (shape, rate_pps, seed, p, measured)


@pytest.mark.parametrize("shape", ["pareto", "paretonormal"])
def test_pareto_shapes_follow_netems_tables(shape):
    """Heavier upper tail, so wider tolerance on p90; the order-keeping max() acts in ~2 % of
    packets here (a falling peak), which may lift the upper quantiles slightly."""
    skin = DirectionSkin(delay_ns=20 * NS_PER_MS, jitter_ns=10 * NS_PER_MS, jitter_distribution=shape)
    added = added_ms(skin, 200, 600, seed=3)
    for p, tolerance in ((0.1, 0.5), (0.5, 0.8), (0.9, 1.5)):
        measured = percentile(added, 100 * p)
        assert abs(measured - (20 + 10 * ASKED[shape][p])) < tolerance, (p, measured)
    # netem's cap: never beyond delay + 4 × jitter (the max() lifts a packet only up to the
    # departure of one ahead, itself under the cap); pareto never below delay − 2/3 × jitter.
    assert max(added) <= 20 + 10 * 32767 / 8192
    if shape == "pareto":
        assert min(added) >= 20 - 10 * 2 / 3 - 0.01


@pytest.mark.parametrize("shape", DISTRIBUTIONS)
def test_the_marginal_is_exact_at_every_instant(shape):
    """Many independent lines read at one instant (after knots have come and gone): their
    delays are a sample of the asked distribution, with no process memory to blur it."""
    skin = DirectionSkin(delay_ns=20 * NS_PER_MS, jitter_ns=10 * NS_PER_MS, jitter_distribution=shape)
    random = Random(11).random
    at = [0, 37 * NS_PER_MS, 180 * NS_PER_MS]  # inside the first interval, then after 3.6 intervals
    added = []
    for _ in range(20_000):
        line = DelayLine()
        for t in at:
            dep = departure(skin, line, t, random)
        added.append((dep - at[-1]) / NS_PER_MS)
    for p, asked in ASKED[shape].items():
        # 20000 independent values: the standard error of a quantile is under 0.1 ms here.
        assert abs(percentile(added, 100 * p) - (20 + 10 * asked)) < 0.4, (p, percentile(added, 100 * p))


def test_uniform_covers_the_whole_interval_and_no_more():
    delay, jitter = 100_000, 50_000
    skin = DirectionSkin(delay_ns=delay, jitter_ns=jitter)
    random = Random(4).random
    added = [departure(skin, DelayLine(), 0, random) for _ in range(50_000)]
    assert min(added) >= delay - jitter and max(added) <= delay + jitter
    assert min(added) < delay - 0.99 * jitter and max(added) > delay + 0.99 * jitter
    assert abs(sum(added) / len(added) - delay) < 0.01 * jitter
    below = sum(1 for a in added if a < delay)
    assert abs(below / len(added) - 0.5) < 0.01


@pytest.mark.parametrize("shape", ["uniform", "normal"])
def test_order_almost_never_needs_the_max(shape):
    """With the default time scale (5 × jitter) the delay falls faster than time passes, so that
    the FIFO max() must hold a packet back, in under 0.2 % of packets (normal: its slope is
    N(0, 0.31²), -1 is 3.2σ) and by little: the mean delay is lifted by under 10 µs."""
    skin = DirectionSkin(delay_ns=20 * NS_PER_MS, jitter_ns=10 * NS_PER_MS, jitter_distribution=shape)
    line, random = DelayLine(), Random(8).random
    held = lifted_ns = 0
    count, gap = 300_000, 200_000  # 60 s at 5000 packets/s
    for i in range(count):
        ready = i * gap
        dep = departure(skin, line, ready, random)
        # The same process, read again at the same instant without moving it: the candidate.
        last, line.last_departure_ns = line.last_departure_ns, 0
        candidate = departure(skin, line, ready, random)
        line.last_departure_ns = last
        if dep != candidate:
            held += 1
            lifted_ns += dep - candidate
    assert held / count < 0.002
    assert lifted_ns / count < 10_000


def test_consecutive_delays_change_little_and_distant_ones_are_unrelated():
    skin = DirectionSkin(delay_ns=20 * NS_PER_MS, jitter_ns=10 * NS_PER_MS)
    added = added_ms(skin, 5000, 100, seed=5)
    steps = [abs(b - a) for a, b in zip(added, added[1:])]
    assert max(steps) < 0.2  # ms, with packets 0.2 ms apart: never enough to overtake
    # 100 ms (2 × the 50 ms time scale) apart, delays are independent: correlation near 0.
    lag = 500
    assert abs(statistics.correlation(added[:-lag:7], added[lag::7])) < 0.1
    assert statistics.correlation(added[:-5:7], added[5::7]) > 0.95  # 1 ms apart


gaps = st.lists(st.integers(0, 20 * NS_PER_MS), min_size=1, max_size=300)


@settings(max_examples=300, deadline=None)
@given(
    gaps=gaps,
    delay_ms=st.integers(0, 500),
    jitter_ms=st.integers(0, 500),
    shape=st.sampled_from(DISTRIBUTIONS),
    correlation_ms=st.one_of(st.just(0), st.integers(1, 2000)),
    seed=st.integers(0, 2**32),
)
def test_no_reordering_and_never_before_ready(gaps, delay_ms, jitter_ms, shape, correlation_ms, seed):
    skin = DirectionSkin(delay_ns=delay_ms * NS_PER_MS, jitter_ns=jitter_ms * NS_PER_MS,
                         jitter_distribution=shape, jitter_correlation_ns=correlation_ms * NS_PER_MS)
    result = run(skin, gaps, seed)
    departures = [dep for _, dep in result]
    assert departures == sorted(departures)
    previous = 0
    for ready, dep in result:
        assert dep >= ready
        # Beyond the distribution's support (netem's cap: 4 × jitter) only to wait for the one ahead.
        assert dep <= max(ready + delay_ms * NS_PER_MS + 4 * jitter_ms * NS_PER_MS, previous)
        previous = dep


@settings(max_examples=100, deadline=None)
@given(
    swaps=st.lists(
        st.tuples(st.sampled_from(DISTRIBUTIONS), st.integers(0, 50), st.integers(0, 300), st.integers(1, 5000)),
        min_size=1, max_size=6),
    seed=st.integers(0, 2**32),
)
def test_order_holds_across_skin_swaps(swaps, seed):
    """The line (and the process in it) survives swaps to other shapes, jitters and time scales."""
    line, random, now, last = DelayLine(), Random(seed).random, 0, 0
    for shape, jitter_ms, correlation_ms, packets in swaps:
        skin = DirectionSkin(delay_ns=30 * NS_PER_MS, jitter_ns=jitter_ms * NS_PER_MS,
                             jitter_distribution=shape, jitter_correlation_ns=correlation_ms * NS_PER_MS)
        for _ in range(packets):
            now += 100_000
            dep = departure(skin, line, now, random)
            assert dep >= max(now, last)
            last = dep


def test_jitter_larger_than_delay_never_departs_before_ready():
    skin = DirectionSkin(delay_ns=1000, jitter_ns=5000)
    assert all(dep >= ready for ready, dep in run(skin, [10_000] * 2000))


def test_reordering_lets_its_share_overtake():
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


def test_reordering_with_jitter_keeps_its_share_and_the_rest_in_order():
    skin = DirectionSkin(delay_ns=20 * NS_PER_MS, jitter_ns=10 * NS_PER_MS, reorder_probability=0.1)
    result = run(skin, [NS_PER_MS] * 20_000, seed=12)
    ahead = [(ready, dep) for ready, dep in result if dep == ready]
    assert abs(len(ahead) / len(result) - 0.1) < 0.01  # binomial sd 0.002
    in_line = [dep for ready, dep in result if dep != ready]
    assert in_line == sorted(in_line)


def test_a_reordered_packet_does_not_move_the_line():
    line = DelayLine()
    delayed = DirectionSkin(delay_ns=1000)
    assert departure(delayed, line, 0, lambda: 0.5) == 1000
    ahead = DirectionSkin(delay_ns=1000, reorder_probability=1.0)
    assert departure(ahead, line, 10, lambda: 0.5) == 10
    assert line.last_departure_ns == 1000


def test_an_unknown_shape_is_an_error_with_context():
    skin = DirectionSkin(jitter_ns=1000, jitter_distribution="gauss")
    with pytest.raises(ValueError, match="gauss"):
        departure(skin, DelayLine(), 0, Random(0).random)


def test_no_jitter_draws_nothing():
    """jitter 0 costs what it did: no draw, no process state touched."""
    def no_draws() -> float:
        raise AssertionError("drew a random number")

    line = DelayLine()
    assert departure(DirectionSkin(delay_ns=5), line, 7, no_draws) == 12
    assert math.isclose(line.z_from, 0.0) and math.isclose(line.z_to, 0.0)
