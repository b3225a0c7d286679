"""The whole packet path (engine/path.py), sans-IO: every packet gets exactly one verdict, judged
by exactly one skin generation, whatever its bytes and whatever the skin."""

from __future__ import annotations

import random
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interceptor.compiled import NO_SKIN
from interceptor.engine import ACCEPT, Drop
from interceptor.engine.path import HELD, Engine, Rewrite, SendIcmp
from interceptor.library import SkinLibrary
from interceptor.schema import compile_document

MS = 1_000_000


def skin(doc: dict, name: str = "t"):
    return compile_document(doc, name)


def _presets():
    library = SkinLibrary(skins_dir="/nonexistent-netskin-skins")
    return [compile_document(entry.document, entry.name) for entry in library.entries() if not entry.errors]


PRESETS = _presets()
EXTRA = [
    skin({"mtu": 576}),
    skin({"dns": {"block": ["*.blocked.test"], "rewrite": {"*.example": "192.0.2.7"}, "delay_ms": 30}}),
    skin({"latency_ms": 40, "jitter_ms": 10, "bandwidth_limit_kbps": 500, "packet_loss_percent": 20,
          "mtu": 1280, "dns": {"block": ["x.test"]}}),
    skin({"reorder_percent": 30, "latency_ms": 20, "jitter_ms": 20}),
    skin({"loss_model": {"gilbert_elliott": {"p": 20, "r": 30}}, "bandwidth_limit_kbps": 64, "queue_limit_ms": 50}),
]
SKINS = [NO_SKIN, *PRESETS, *EXTRA]


def udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes, df: bool = True) -> bytes:
    total = 20 + 8 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000 if df else 0, 64, 17, 0,
                     bytes(map(int, src.split("."))), bytes(map(int, dst.split("."))))
    return ip + struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def dns_answer(name: str, address: str = "203.0.113.9") -> bytes:
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split(".")) + b"\0"
    message = struct.pack("!6H", 0x1234, 0x8180, 1, 1, 0, 0) + labels + struct.pack("!HH", 1, 1)
    message += b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + bytes(map(int, address.split(".")))
    return udp_packet("198.51.100.53", "10.0.0.2", 53, 40000, message)


def drain(engine: Engine, now: int, rand) -> tuple[list, int]:
    """Run the wake-ups to the end, as the shell's timer would; (verdicts, time of the last)."""
    out = []
    for _ in range(100_000):
        due = engine.next_due_ns
        if due is None:
            return out, now
        now = max(now, due)
        out += engine.on_wakeup(now, rand)
    raise AssertionError("the engine never ran out of held packets")


packet_bytes = st.one_of(
    st.binary(max_size=1600),
    st.builds(lambda n, p: udp_packet("10.0.0.2", "198.51.100.1", 1234, 53, p, df=True)[:n],
              st.integers(0, 1600), st.binary(max_size=1500)),
    st.sampled_from([dns_answer("www.blocked.test"), dns_answer("a.example"), dns_answer("x.test"),
                     dns_answer("plain.org")]),
)

# Packets as (outgoing, bytes, gap before it in ns).
traffic = st.lists(st.tuples(st.booleans(), packet_bytes, st.integers(0, 5 * MS)), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    packets=traffic,
    skin_indexes=st.lists(st.integers(0, len(SKINS) - 1), min_size=1, max_size=3),
    shared=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_random_bytes_through_every_skin_get_exactly_one_verdict(packets, skin_indexes, shared, seed):
    rand = random.Random(seed).random
    engine = Engine(host_uplink_kbps=1000 if shared else 0, max_held_per_direction=25)
    path = engine.add_vm("vm")
    now = 0
    verdicts: dict[int, object] = {}
    held: set[int] = set()
    for i, (outgoing, data, gap) in enumerate(packets):
        if i % 7 == 0:  # swaps between packets, as the control socket would
            path.set_skin(SKINS[skin_indexes[(i // 7) % len(skin_indexes)]], i)
        now += gap
        size = len(data)
        needs = path.needs_payload_up if outgoing else path.needs_payload_down
        verdict = path.on_packet(outgoing, i, size, data if needs else None, now, rand)
        if verdict.__class__ is Rewrite:
            assert isinstance(verdict.payload, bytes) and verdict.payload
            verdict = verdict.then
        if verdict is HELD:
            held.add(i)
        else:
            assert verdict is ACCEPT or verdict.__class__ in (Drop, SendIcmp), verdict
            verdicts[i] = verdict
        for token, late in engine.on_wakeup(now, rand):
            assert token in held and token not in verdicts
            held.discard(token)
            verdicts[token] = late
    for token, late in drain(engine, now, rand)[0]:
        assert token in held and token not in verdicts
        held.discard(token)
        verdicts[token] = late
    assert not held and len(verdicts) == len(packets)
    for pipe in (path.uplink, path.downlink):
        assert pipe.held_packets == 0 and pipe.held_bytes == 0
        assert pipe.passed_packets + pipe.dropped_packets == pipe.packets


def test_a_dns_answer_held_for_its_delay_is_shaped_by_the_skin_it_arrived_under():
    rand = random.Random(1).random
    engine = Engine()
    path = engine.add_vm("vm")
    path.set_skin(skin({"dns": {"delay_ms": 100}, "downlink": {"delay_ms": 10}}), 1)
    answer = dns_answer("plain.org")
    assert path.on_packet(False, "answer", len(answer), answer, 0, rand) is HELD
    # A new skin with a much longer downlink delay arrives while the answer waits.
    path.set_skin(skin({"dns": {"delay_ms": 100}, "downlink": {"delay_ms": 5000}}), 2)
    out, when = drain(engine, 0, rand)
    assert out == [("answer", ACCEPT)]
    assert when == 110 * MS  # 100 ms DNS delay + the old skin's 10 ms, not the new 5 s


def test_a_dns_rewrite_is_applied_and_held_together():
    rand = random.Random(1).random
    engine = Engine()
    path = engine.add_vm("vm")
    path.set_skin(skin({"dns": {"rewrite": {"*.example": "192.0.2.7"}, "delay_ms": 50}}), 1)
    answer = dns_answer("www.example")
    verdict = path.on_packet(False, "a", len(answer), answer, 0, rand)
    assert verdict.__class__ is Rewrite and verdict.then is HELD
    assert bytes([192, 0, 2, 7]) in verdict.payload
    assert drain(engine, 0, rand)[0] == [("a", ACCEPT)]
    assert path.dns_answers == {"rewritten": 1}


def test_with_a_shared_uplink_weight_and_delay_come_from_the_admitting_skin():
    rand = random.Random(1).random
    engine = Engine(host_uplink_kbps=8000)  # 1 byte per µs
    path = engine.add_vm("vm")
    path.set_skin(skin({"uplink": {"rate_kbps": 800, "delay_ms": 10}, "qos_priority": 2}), 1)
    # Two packets of 150 bytes behind the VM's own 800 kbit/s shaper: ready at 1.5 and 3 ms.
    assert path.on_packet(True, "p1", 150, None, 0, rand) is HELD
    assert path.on_packet(True, "p2", 150, None, 0, rand) is HELD
    path.set_skin(skin({"uplink": {"delay_ms": 900}, "qos_priority": 9}), 2)
    out, when = drain(engine, 0, rand)
    assert [token for token, _ in out] == ["p1", "p2"]
    # p2: ready at 3 ms, 150 µs on the link, then the *old* 10 ms delay (not 900 ms).
    assert when == 3_000_000 + 150_000 + 10 * MS
    assert engine.link.flows["vm"].weight == 2


def test_one_vm_cannot_hold_more_than_its_cap():
    rand = random.Random(1).random
    engine = Engine(max_held_per_direction=100)
    flooder, other = engine.add_vm("flooder"), engine.add_vm("other")
    delay = skin({"latency_ms": 200})
    flooder.set_skin(delay, 1)
    other.set_skin(delay, 1)
    verdicts = [flooder.on_packet(True, i, 100, None, 0, rand) for i in range(1000)]
    assert verdicts.count(HELD) == 100
    assert flooder.uplink.drops["overflow"] == 900
    # The other VM is untouched by the flood.
    assert other.on_packet(True, "x", 100, None, 0, rand) is HELD
    assert other.uplink.drops["overflow"] == 0


def test_oversize_df_packet_gets_an_icmp_error_and_is_counted():
    rand = random.Random(1).random
    engine = Engine()
    path = engine.add_vm("vm")
    path.set_skin(skin({"mtu": 576}), 1)
    data = udp_packet("10.0.0.2", "198.51.100.1", 1000, 2000, b"x" * 1000)
    verdict = path.on_packet(True, "big", len(data), data, 0, rand)
    assert verdict.__class__ is SendIcmp and verdict.drop.reason == "mtu"
    assert verdict.version == 4 and verdict.destination == bytes([10, 0, 0, 2])
    assert path.uplink.drops["mtu"] == 1 and path.icmp_sent == 1


def _seen(path) -> tuple:
    """Everything a snapshot reports of a VM: counters, DNS and ICMP counts, samples."""
    return (path.snapshot(), [(len(p.hold_samples), len(p.late_samples)) for p in (path.uplink, path.downlink)])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    packets=traffic,
    skin_index=st.integers(0, len(SKINS) - 1),
    shared=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_nothing_a_snapshot_reports_changes_without_a_pipes_activity_mark_moving(packets, skin_index, shared, seed):
    # Status and the worker's snapshots skip a VM whose marks did not move: that is only right if
    # no counter, DNS or ICMP count or sample can change without them.
    rand = random.Random(seed).random
    engine = Engine(host_uplink_kbps=1000 if shared else 0, max_held_per_direction=25)
    path = engine.add_vm("vm")
    path.set_skin(SKINS[skin_index], 1)
    now = 0

    def step(action) -> None:
        marks, seen = (path.uplink.activity(), path.downlink.activity()), _seen(path)
        action()
        if (path.uplink.activity(), path.downlink.activity()) == marks:
            assert _seen(path) == seen

    for i, (outgoing, data, gap) in enumerate(packets):
        now += gap
        needs = path.needs_payload_up if outgoing else path.needs_payload_down
        step(lambda: path.on_packet(outgoing, i, len(data), data if needs else None, now, rand))
        step(lambda: engine.on_wakeup(now, rand))
    step(lambda: drain(engine, now, rand))
