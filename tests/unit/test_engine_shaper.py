"""Rate stage: virtual-clock shaping, bounded queue, rate accuracy."""

from hypothesis import given, settings
from hypothesis import strategies as st

from interceptor.compiled import NS_PER_MS, DirectionSkin
from interceptor.engine.shaper import RateClock, backlog_ns, shape

NS_PER_S = 1_000_000_000


def ns_per_byte(rate_kbps: float) -> float:
    return 8e9 / (rate_kbps * 1000)


def test_unlimited_is_ready_now_and_leaves_the_clock_alone():
    clock = RateClock()
    assert shape(DirectionSkin(), clock, 1500, 123) == 123
    assert clock.next_free_ns == 0


def test_back_to_back_packets_leave_one_transmission_time_apart():
    skin = DirectionSkin(ns_per_byte=ns_per_byte(1000))  # 1 Mbit/s: 8000 ns per byte
    clock = RateClock()
    assert [shape(skin, clock, 1000, 0) for _ in range(3)] == [8_000_000, 16_000_000, 24_000_000]


def test_an_idle_link_restarts_at_the_arrival_without_credit():
    skin = DirectionSkin(ns_per_byte=1000.0)
    clock = RateClock()
    assert shape(skin, clock, 100, 0) == 100_000
    # Idle for a long time: no saved-up credit, the next packet still takes its full time.
    assert shape(skin, clock, 100, 10 * NS_PER_S) == 10 * NS_PER_S + 100_000
    assert shape(skin, clock, 100, 10 * NS_PER_S) == 10 * NS_PER_S + 200_000


def test_tail_drop_beyond_the_queue_limit_does_not_advance_the_clock():
    skin = DirectionSkin(ns_per_byte=1000.0, queue_limit_ns=1 * NS_PER_MS)  # 1000 B of queue
    clock = RateClock()
    ready = [shape(skin, clock, 300, 0) for _ in range(5)]
    assert ready == [300_000, 600_000, 900_000, None, None]
    assert clock.next_free_ns == 900_000
    assert shape(skin, clock, 100, 0) == 1_000_000  # a smaller packet still fits


def test_a_packet_finding_the_queue_empty_is_accepted_even_if_it_alone_exceeds_the_limit():
    skin = DirectionSkin(ns_per_byte=ns_per_byte(16), queue_limit_ns=500 * NS_PER_MS)
    clock = RateClock()
    assert shape(skin, clock, 1500, 0) == 750 * NS_PER_MS  # 1500 B at 16 kbit/s
    assert shape(skin, clock, 1500, 0) is None
    assert shape(skin, clock, 1500, 750 * NS_PER_MS) == 1500 * NS_PER_MS


arrivals = st.lists(
    st.tuples(st.integers(0, 2 * NS_PER_MS), st.integers(40, 9000)), min_size=1, max_size=150
)


@settings(max_examples=300, deadline=None)
@given(
    packets=arrivals,
    rate_kbps=st.floats(min_value=64, max_value=1_000_000),
    queue_limit_ms=st.integers(0, 200),
)
def test_departures_never_exceed_the_rate_beyond_one_packet(packets, rate_kbps, queue_limit_ms):
    skin = DirectionSkin(ns_per_byte=ns_per_byte(rate_kbps), queue_limit_ns=queue_limit_ms * NS_PER_MS)
    clock = RateClock()
    now = 0
    sent: list[tuple[int, int]] = []  # (ready_ns, size)
    for gap, size in packets:
        now += gap
        ready = shape(skin, clock, size, now)
        if ready is not None:
            assert ready >= now
            sent.append((ready, size))
    assert [t for t, _ in sent] == sorted(t for t, _ in sent)
    max_size = max(size for _, size in packets)
    prefix = [0]
    for _, size in sent:
        prefix.append(prefix[-1] + size)
    # Every window [t_i, t_j] between two departures: bytes departed in it (both ends included)
    # ≤ rate·(t_j - t_i) + one max packet (+1 ns of rounding).
    for i in range(len(sent)):
        for j in range(i, len(sent)):
            window_bytes = prefix[j + 1] - prefix[i]
            allowed = (sent[j][0] - sent[i][0] + 1) / skin.ns_per_byte + max_size
            assert window_bytes <= allowed


@settings(max_examples=300, deadline=None)
@given(
    packets=arrivals,
    rate_kbps=st.floats(min_value=8, max_value=1_000_000),
    queue_limit_ms=st.integers(0, 1000),
)
def test_the_queue_never_exceeds_its_limit(packets, rate_kbps, queue_limit_ms):
    limit_ns = queue_limit_ms * NS_PER_MS
    skin = DirectionSkin(ns_per_byte=ns_per_byte(rate_kbps), queue_limit_ns=limit_ns)
    clock = RateClock()
    now = 0
    for gap, size in packets:
        now += gap
        was_empty = backlog_ns(clock, now) == 0
        ready = shape(skin, clock, size, now)
        if ready is None:
            assert not was_empty
            continue
        backlog = backlog_ns(clock, now)
        assert backlog == ready - now
        # Within the limit, or the lone packet an empty queue always accepts.
        assert backlog <= limit_ns or was_empty


def total_time_ns(rate_kbps: float, count: int, size: int = 1500) -> int:
    skin = DirectionSkin(ns_per_byte=ns_per_byte(rate_kbps), queue_limit_ns=10**18)
    clock = RateClock()
    last = 0
    for _ in range(count):
        last = shape(skin, clock, size, 0)
    return last


def test_rate_accuracy_over_a_long_saturating_run():
    for rate_kbps in (100_000, 64, 1000, 3000, 7, 2_500_000):
        count = 100_000
        expected = count * 1500 * 8 / (rate_kbps * 1000) * NS_PER_S
        assert abs(total_time_ns(rate_kbps, count) - expected) <= 1e-4 * expected, rate_kbps


def test_no_drift_over_a_million_packets_at_a_rate_with_fractional_ns_per_byte():
    # 3 Mbit/s = 2666.66… ns per byte; 1 Mbit/s over 999-byte packets; rounding must not add up.
    for rate_kbps, size in ((3000, 1500), (333, 999)):
        count = 1_000_000
        skin = DirectionSkin(ns_per_byte=ns_per_byte(rate_kbps), queue_limit_ns=10**20)
        clock = RateClock()
        for _ in range(count):
            last = shape(skin, clock, size, 0)
        expected = count * size * 8 / (rate_kbps * 1000) * NS_PER_S
        assert abs(last - expected) <= 2  # exact to the ns, far inside 0.01%


def test_rate_holds_when_arrivals_are_spread_out():
    # Arrivals just faster than the rate keep the queue short; throughput still equals the rate.
    skin = DirectionSkin(ns_per_byte=ns_per_byte(1000))
    clock = RateClock()
    tx = 1500 * 8000
    last = 0
    for i in range(100_000):
        ready = shape(skin, clock, 1500, i * (tx - 7))
        assert ready is not None
        last = ready
    assert abs(last - 100_000 * tx) <= 1
