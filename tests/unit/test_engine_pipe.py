"""Pipe: the stages composed for one VM and direction, counters, and skin swaps."""

from random import Random

from hypothesis import given, settings
from hypothesis import strategies as st

from interceptor.compiled import NS_PER_MS, PASSTHROUGH, DirectionSkin, GilbertElliott
from interceptor.engine import ACCEPT, DROP_FIREWALL, DROP_LOSS, DROP_QUEUE, Accept, Drop, Hold, Pipe


def never_called() -> float:
    raise AssertionError("the engine drew a random number it did not need")


def departure_of(decision, now_ns: int) -> int:
    return decision.departure_ns if decision.__class__ is Hold else now_ns


def test_passthrough_accepts_and_counts():
    pipe = Pipe()
    for now in range(10):
        assert pipe.decide(100 + now, now, never_called) is ACCEPT
    snap = pipe.snapshot()
    assert snap["packets"] == snap["passed_packets"] == 10
    assert snap["bytes"] == snap["passed_bytes"] == sum(range(100, 110))
    assert snap["dropped_packets"] == snap["held_packets"] == snap["held_total"] == 0


def test_loss_is_counted_by_reason():
    pipe = Pipe(DirectionSkin(loss_probability=0.3))
    random = Random(1).random
    decisions = [pipe.decide(200, 0, random) for _ in range(1000)]
    lost = sum(1 for d in decisions if d is DROP_LOSS)
    assert 200 < lost < 400
    assert pipe.drops["loss"] == pipe.dropped_packets == lost
    assert pipe.dropped_bytes == 200 * lost
    assert pipe.passed_packets == 1000 - lost
    assert all(d is ACCEPT for d in decisions if d is not DROP_LOSS)


def test_rate_limit_holds_then_tail_drops_and_counts():
    # 1 Mbit/s, 10 ms of queue: 1250 bytes of backlog; 1000-byte packets take 8 ms each.
    pipe = Pipe(DirectionSkin(ns_per_byte=8000.0, queue_limit_ns=10 * NS_PER_MS))
    decisions = [pipe.decide(1000, 0, never_called) for _ in range(4)]
    assert decisions == [Hold(8 * NS_PER_MS), DROP_QUEUE, DROP_QUEUE, DROP_QUEUE]
    assert pipe.drops == {"loss": 0, "queue": 3, "mtu": 0, "overflow": 0, "error": 0}
    assert pipe.held_packets == 1 and pipe.held_bytes == 1000 and pipe.held_total == 1
    pipe.released(1000)
    assert pipe.held_packets == 0 and pipe.passed_packets == 1 and pipe.passed_bytes == 1000


def test_delay_holds_until_departure():
    pipe = Pipe(DirectionSkin(delay_ns=25 * NS_PER_MS))
    assert pipe.decide(60, 1000, never_called) == Hold(1000 + 25 * NS_PER_MS)
    assert pipe.held_packets == 1


def test_admit_and_delay_are_the_stages_decide_composes():
    pipe = Pipe(DirectionSkin(ns_per_byte=10.0, delay_ns=500))
    ready = pipe.admit(100, 0, never_called)
    assert ready == 1000
    assert pipe.delay(ready, never_called) == 1500
    assert pipe.packets == 1


def test_decide_is_admit_then_delay():
    skin = full_skin()
    composed, direct = Pipe(skin), Pipe(skin)
    random_a, random_b = Random(8).random, Random(8).random
    for i in range(5000):
        now = i * 400_000
        ready = composed.admit(1200, now, random_a)
        expected = ready if ready.__class__ is Drop else composed.delay(ready, random_a)
        got = direct.decide(1200, now, random_b)
        if got.__class__ is Drop:
            assert got == expected
        else:
            assert departure_of(got, now) == max(expected, now)
    assert direct.drops == composed.drops and direct.packets == composed.packets


def test_other_stages_count_their_drops_here():
    pipe = Pipe(DirectionSkin(delay_ns=1000))
    pipe.count_drop(Drop("firewall"), 80)
    pipe.count_drop(Drop("firewall"), 80)
    pipe.count_drop(Drop("mtu"), 9000)
    assert pipe.drops == {"loss": 0, "queue": 0, "firewall": 2, "mtu": 1, "overflow": 0, "error": 0}
    assert pipe.dropped_bytes == 9160
    pipe.decide(500, 0, never_called)
    pipe.count_drop(DROP_QUEUE, 500, held=True)  # e.g. the shared uplink refused it
    assert pipe.held_packets == 0 and pipe.held_bytes == 0


def full_skin() -> DirectionSkin:
    return DirectionSkin(
        gilbert_elliott=GilbertElliott(p=0.01, r=0.3),
        delay_ns=20 * NS_PER_MS,
        jitter_ns=5 * NS_PER_MS,
        ns_per_byte=800.0,  # 10 Mbit/s
        queue_limit_ns=50 * NS_PER_MS,
    )


def test_counters_add_up_over_a_busy_run():
    pipe = Pipe(full_skin())
    random = Random(3).random
    held: list[tuple[int, int]] = []
    now = 0
    for i in range(20_000):
        now += 300_000 + (i % 7) * 100_000
        size = 64 + (i * 37) % 1437
        # Release what is due, as the shell's timer would.
        while held and held[0][0] <= now:
            pipe.released(held.pop(0)[1])
        decision = pipe.decide(size, now, random)
        if decision.__class__ is Hold:
            held.append((decision.departure_ns, size))
    snap = pipe.snapshot()
    assert snap["packets"] == 20_000
    assert snap["packets"] == snap["passed_packets"] + snap["dropped_packets"] + snap["held_packets"]
    assert snap["bytes"] == snap["passed_bytes"] + snap["dropped_bytes"] + snap["held_bytes"]
    assert snap["drops"]["loss"] > 0 and snap["drops"]["queue"] > 0
    assert snap["held_packets"] == len(held)
    assert [t for t, _ in held] == sorted(t for t, _ in held)


def test_empty_skin_has_an_obviously_cheap_fast_path():
    pipe = Pipe(PASSTHROUGH)
    assert pipe._passthrough
    pipe.skin = DirectionSkin(delay_ns=1)
    assert not pipe._passthrough
    pipe.skin = DirectionSkin()
    assert pipe._passthrough


def test_swap_to_passthrough_with_packets_held_keeps_order():
    pipe = Pipe(DirectionSkin(delay_ns=100 * NS_PER_MS))
    first = pipe.decide(100, 0, never_called)
    assert first == Hold(100 * NS_PER_MS)
    pipe.skin = PASSTHROUGH
    # Still one packet held: the new one waits behind it rather than overtaking it.
    assert pipe.decide(100, NS_PER_MS, never_called) == Hold(100 * NS_PER_MS)
    pipe.released(100)
    pipe.released(100)
    assert pipe.decide(100, 200 * NS_PER_MS, never_called) is ACCEPT
    assert pipe.passed_packets == 3 and pipe.held_packets == 0


delays = st.integers(0, 300).map(lambda ms: ms * NS_PER_MS)
gaps = st.lists(st.integers(0, 50 * NS_PER_MS), min_size=2, max_size=120)


@settings(max_examples=300, deadline=None)
@given(gaps=gaps, old_delay=delays, new_delay=delays, data=st.data())
def test_swapping_skins_keeps_held_departures_and_applies_the_new_skin_next(
    gaps, old_delay, new_delay, data
):
    swap_at = data.draw(st.integers(1, len(gaps) - 1))
    old, new = DirectionSkin(delay_ns=old_delay), DirectionSkin(delay_ns=new_delay)
    pipe = Pipe(old)
    now = 0
    arrivals, decisions = [], []
    for i, gap in enumerate(gaps):
        if i == swap_at:
            before = list(decisions)
            held_before = pipe.held_packets
            pipe.skin = new
            assert pipe.held_packets == held_before  # the swap touches no state
        now += gap
        arrivals.append(now)
        decisions.append(pipe.decide(1000, now, never_called))
    assert decisions[:swap_at] == before
    departures = [departure_of(d, t) for d, t in zip(decisions, arrivals)]
    assert departures == sorted(departures)  # order is kept across the swap
    for t, dep in zip(arrivals, departures):
        assert dep - t >= min(old_delay, new_delay)
    for t, dep in zip(arrivals[:swap_at], departures[:swap_at]):
        assert dep == t + old_delay
    for i in range(swap_at, len(gaps)):
        # The new skin's delay, or later only to wait behind a packet already held.
        t, dep = arrivals[i], departures[i]
        assert dep == t + new_delay or (dep > t + new_delay and dep == departures[i - 1])
    assert departures[swap_at] == max(arrivals[swap_at] + new_delay, departures[swap_at - 1])
    assert pipe.packets == len(gaps) and pipe.dropped_packets == 0


skins = st.builds(
    DirectionSkin,
    delay_ns=delays,
    jitter_ns=st.integers(0, 100).map(lambda ms: ms * NS_PER_MS),
    ns_per_byte=st.sampled_from([0.0, 80.0, 800.0, 8000.0]),
    queue_limit_ns=st.integers(0, 500).map(lambda ms: ms * NS_PER_MS),
)


@settings(max_examples=300, deadline=None)
@given(
    gaps=gaps,
    old=skins,
    new=skins,
    sizes=st.lists(st.integers(40, 1500), min_size=120, max_size=120),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_any_swap_keeps_order_and_never_departs_before_arrival(gaps, old, new, sizes, seed, data):
    swap_at = data.draw(st.integers(0, len(gaps) - 1))
    pipe = Pipe(old)
    random = Random(seed).random
    now = 0
    departures = []
    for i, gap in enumerate(gaps):
        if i == swap_at:
            pipe.skin = new
        now += gap
        decision = pipe.decide(sizes[i], now, random)
        assert isinstance(decision, (Accept, Drop, Hold))
        if decision.__class__ is not Drop:
            dep = departure_of(decision, now)
            assert dep >= now
            departures.append(dep)
    assert departures == sorted(departures)
    assert pipe.packets == pipe.passed_packets + pipe.dropped_packets + pipe.held_packets


def test_a_packet_refused_before_decide_counts_as_seen_and_dropped():
    pipe = Pipe()
    pipe.refuse(DROP_FIREWALL, 100)
    assert (pipe.packets, pipe.bytes, pipe.dropped_packets, pipe.drops["firewall"]) == (1, 100, 1, 1)
    assert pipe.passed_packets + pipe.dropped_packets == pipe.packets
