"""Shared uplink: weighted fair sharing (DRR), work conservation, rate, queue limit."""

from hypothesis import given, settings
from hypothesis import strategies as st

from interceptor.compiled import NS_PER_MS
from interceptor.engine import SharedLink

NS_PER_S = 1_000_000_000
BIG = 10**15  # a queue limit that never bites


def drain(link: SharedLink) -> list[tuple[object, int]]:
    """Everything left, by following next_departure_ns like the shell's timer would."""
    out = []
    while (due := link.next_departure_ns()) is not None:
        got = link.dequeue(due)
        assert got, "next_departure_ns promised a departure that dequeue did not deliver"
        out.extend(got)
    return out


def simulate(link: SharedLink, offered: dict[str, tuple[int, float]], duration_ns: int, step_ns: int = NS_PER_MS):
    """Each flow offers 1500-byte packets at its own rate; dequeue every step.

    offered: flow → (weight, offered bytes per ns). Returns the (item, departure) list, items
    being (flow, size).
    """
    out, credit = [], dict.fromkeys(offered, 0.0)
    for now in range(0, duration_ns, step_ns):
        for flow, (weight, bytes_per_ns) in offered.items():
            credit[flow] += bytes_per_ns * step_ns
            while credit[flow] >= 1500:
                credit[flow] -= 1500
                link.enqueue(flow, weight, 1500, (flow, 1500), now)
        out.extend(link.dequeue(now))
    return out


def sent_bytes(departures, start_ns: int, end_ns: int) -> dict[str, int]:
    totals: dict[str, int] = {}
    for (flow, size), dep in departures:
        if start_ns < dep <= end_ns:
            totals[flow] = totals.get(flow, 0) + size
    return totals


def test_weights_8_and_2_share_a_contended_link_4_to_1():
    link = SharedLink(ns_per_byte=80.0, queue_limit_ns=BIG)  # 100 Mbit/s
    for i in range(5000):
        link.enqueue("a", 8, 1500, ("a", 1500), 0)
        link.enqueue("b", 2, 1500, ("b", 1500), 0)
    departures = drain(link)
    # While both are backlogged (until "a" runs out), b gets a fifth.
    a_done = max(dep for (flow, _), dep in departures if flow == "a")
    totals = sent_bytes(departures, 0, a_done)
    assert abs(totals["a"] / totals["b"] - 4.0) <= 0.05 * 4.0
    assert link.flows["a"].sent_bytes == link.flows["b"].sent_bytes == 5000 * 1500


def test_weighted_share_with_live_arrivals_and_drops():
    rate = 1 / 800.0  # 10 Mbit/s in bytes per ns
    link = SharedLink(ns_per_byte=800.0, queue_limit_ns=50 * NS_PER_MS)
    departures = simulate(link, {"a": (8, rate), "b": (2, rate)}, 20 * NS_PER_S)
    totals = sent_bytes(departures, 2 * NS_PER_S, 20 * NS_PER_S)
    assert abs(totals["a"] / totals["b"] - 4.0) <= 0.05 * 4.0
    # Work-conserving and exact: the link is full.
    assert abs(sum(totals.values()) - 18 * NS_PER_S * rate) <= 2 * 1500
    snap = link.snapshot()
    assert snap["a"]["drops"] > 0 and snap["b"]["drops"] > snap["a"]["drops"]
    assert snap["a"]["backlog_bytes"] <= 50 * NS_PER_MS / 800.0


def test_a_flow_alone_gets_the_whole_link():
    rate = 1 / 800.0
    link = SharedLink(ns_per_byte=800.0, queue_limit_ns=50 * NS_PER_MS)
    departures = simulate(link, {"solo": (1, 1.5 * rate)}, 10 * NS_PER_S)
    totals = sent_bytes(departures, NS_PER_S, 10 * NS_PER_S)
    assert abs(totals["solo"] - 9 * NS_PER_S * rate) <= 2 * 1500


def test_an_idle_flow_leaves_its_share_to_the_others():
    rate = 1 / 800.0
    link = SharedLink(ns_per_byte=800.0, queue_limit_ns=50 * NS_PER_MS)
    # "light" asks for 5% though entitled to 90%: "heavy" gets the rest.
    departures = simulate(link, {"heavy": (1, rate), "light": (9, 0.05 * rate)}, 10 * NS_PER_S)
    totals = sent_bytes(departures, NS_PER_S, 10 * NS_PER_S)
    assert abs(totals["light"] - 0.05 * 9 * NS_PER_S * rate) <= 0.05 * 0.05 * 9 * NS_PER_S * rate
    assert abs(sum(totals.values()) - 9 * NS_PER_S * rate) <= 2 * 1500


def test_three_equal_flows_share_equally():
    rate = 1 / 80.0
    link = SharedLink(ns_per_byte=80.0, queue_limit_ns=20 * NS_PER_MS)
    departures = simulate(link, {f: (5, 0.6 * rate) for f in "xyz"}, 5 * NS_PER_S)
    totals = sent_bytes(departures, NS_PER_S, 5 * NS_PER_S)
    share = sum(totals.values()) / 3
    assert all(abs(t - share) <= 0.02 * share for t in totals.values()), totals


def test_an_idle_link_restarts_at_the_arrival():
    link = SharedLink(ns_per_byte=100.0, queue_limit_ns=BIG)
    assert link.next_departure_ns() is None
    assert link.enqueue("a", 1, 1000, "p1", 5 * NS_PER_S)
    assert link.next_departure_ns() == 5 * NS_PER_S + 100_000
    assert link.dequeue(5 * NS_PER_S + 99_999) == []
    assert link.dequeue(6 * NS_PER_S) == [("p1", 5 * NS_PER_S + 100_000)]
    assert link.enqueue("a", 1, 1000, "p2", 7 * NS_PER_S)
    assert drain(link) == [("p2", 7 * NS_PER_S + 100_000)]


def test_queue_limit_is_per_flow_bytes_at_the_link_rate():
    link = SharedLink(ns_per_byte=100.0, queue_limit_ns=300_000)  # 3000 bytes of queue per flow
    results = [link.enqueue("a", 1, 1000, i, 0) for i in range(6)]
    # The first starts on the wire at once; three wait (3000 B); the rest are tail-dropped.
    assert results == [True, True, True, True, False, False]
    assert link.enqueue("b", 1, 1000, "b0", 0)  # another flow has its own room
    stats = link.snapshot()["a"]
    assert stats["drops"] == 2 and stats["dropped_bytes"] == 2000 and stats["backlog_bytes"] == 3000


def test_a_packet_finding_its_flow_empty_is_always_accepted():
    link = SharedLink(ns_per_byte=8000.0, queue_limit_ns=NS_PER_MS)  # 125 bytes of queue
    assert link.enqueue("a", 1, 1500, "p1", 0)  # on the wire
    assert link.enqueue("a", 1, 1500, "p2", 0)  # waits alone, larger than the limit
    assert not link.enqueue("a", 1, 1500, "p3", 0)


def test_weight_changes_apply_to_the_next_round():
    link = SharedLink(ns_per_byte=1.0, queue_limit_ns=BIG)
    link.enqueue("a", 1, 100, "x", 0)
    link.enqueue("a", 7, 100, "y", 0)
    assert link.flows["a"].weight == 7 and link.flows["a"].quantum == 7 * 1514


flows = st.lists(
    st.tuples(
        st.integers(0, 3),  # flow
        st.integers(0, 200_000),  # gap before it, ns
        st.integers(40, 9000),  # size
    ),
    min_size=1,
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(
    packets=flows,
    ns_per_byte=st.sampled_from([8.0, 80.0, 800.0, 2666.6666666666665]),
    weights=st.lists(st.integers(1, 10), min_size=4, max_size=4),
    limit_ms=st.integers(0, 100),
)
def test_the_link_never_sends_faster_than_its_rate(packets, ns_per_byte, weights, limit_ms):
    link = SharedLink(ns_per_byte=ns_per_byte, queue_limit_ns=limit_ms * NS_PER_MS)
    now, out, accepted = 0, [], 0
    for flow, gap, size in packets:
        now += gap
        accepted += link.enqueue(flow, weights[flow], size, (flow, size), now)
        out.extend(link.dequeue(now))
        assert link.next_departure_ns() is None or link.next_departure_ns() > now
    out.extend(drain(link))
    assert len(out) == accepted
    deps = [dep for _, dep in out]
    assert deps == sorted(deps)
    # One packet at a time at the link rate: consecutive completions are ≥ one transmission apart.
    for ((_, size), dep), previous in zip(out[1:], deps):
        assert dep - previous >= int(size * ns_per_byte) - 1
    max_size = max(size for _, _, size in packets)
    prefix = [0]
    for (_, size), _ in out:
        prefix.append(prefix[-1] + size)
    for i in range(len(out)):
        for j in range(i, len(out)):
            assert prefix[j + 1] - prefix[i] <= (deps[j] - deps[i] + 1) / ns_per_byte + max_size


@settings(max_examples=200, deadline=None)
@given(packets=flows, weights=st.lists(st.integers(1, 10), min_size=4, max_size=4))
def test_departures_do_not_depend_on_when_dequeue_is_called(packets, weights):
    eager = SharedLink(ns_per_byte=80.0, queue_limit_ns=5 * NS_PER_MS)
    lazy = SharedLink(ns_per_byte=80.0, queue_limit_ns=5 * NS_PER_MS)
    now, eager_out = 0, []
    for i, (flow, gap, size) in enumerate(packets):
        now += gap
        eager.enqueue(flow, weights[flow], size, i, now)
        lazy.enqueue(flow, weights[flow], size, i, now)
        eager_out.extend(eager.dequeue(now))
    eager_out.extend(drain(eager))
    lazy_out = lazy.dequeue(10**18)
    assert eager_out == lazy_out
    assert all(dep >= 0 for _, dep in lazy_out)
