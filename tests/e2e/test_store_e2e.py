"""manager.store against a real etcd (its own namespace): kv, txn, leases, watch, compaction, loss."""

from __future__ import annotations

import secrets

import pytest
import trio

from manager import store
from tests.e2e.etcd_lab import Etcd, etcd_skip_reason, trio_in_netns

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def etcd():
    reason = etcd_skip_reason()
    if reason:
        pytest.skip(reason)
    with Etcd(f"nskst{secrets.token_hex(3)}") as server:
        yield server


def run(etcd: Etcd, body, *args):
    async def main():
        async with store.Store([etcd.local_endpoint]) as client:
            return await body(client, *args)
    return trio_in_netns(etcd.ns, main)


def test_kv_and_txn(etcd):
    async def body(s: store.Store):
        rev = await s.put("/t/kv/a", {"x": 1})
        await s.put("/t/kv/b", "plain")
        a = await s.get("/t/kv/a")
        assert a.json() == {"x": 1} and a.mod_revision == rev and a.create_revision == rev
        at, kvs = await s.get_prefix("/t/kv/")
        assert [kv.key for kv in kvs] == ["/t/kv/a", "/t/kv/b"] and at >= rev
        # Guarded on mod_revision: the first txn wins, replaying it fails and reads the key.
        ok = await s.txn([store.compare("/t/kv/a", "mod", "==", rev)], [store.put_op("/t/kv/a", {"x": 2})],
                         [store.range_op("/t/kv/a")])
        assert ok.succeeded
        stale = await s.txn([store.compare("/t/kv/a", "mod", "==", rev)], [store.put_op("/t/kv/a", {"x": 3})],
                            [store.range_op("/t/kv/a")])
        assert not stale.succeeded and stale.ranges()[0][0].json() == {"x": 2}
        absent = await s.txn([store.compare("/t/kv/new", "create", "==", 0)], [store.put_op("/t/kv/new", "1")])
        assert absent.succeeded
        assert (await s.delete("/t/kv/", prefix=True))[1] == 3
        assert await s.get("/t/kv/a") is None
    run(etcd, body)


def test_lease_expires_and_keepalive_holds(etcd):
    async def body(s: store.Store):
        kept, dropped = await s.grant(2), await s.grant(2)
        await s.put("/t/lease/kept", "1", lease=kept.id)
        await s.put("/t/lease/dropped", "1", lease=dropped.id)
        assert (await s.get("/t/lease/kept")).lease == kept.id
        with trio.move_on_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(s.keep_alive, kept)
                while await s.get("/t/lease/dropped") is not None:
                    await trio.sleep(0.1)
                nursery.cancel_scope.cancel()
        assert await s.get("/t/lease/dropped") is None
        assert await s.get("/t/lease/kept") is not None
        assert await s.keepalive_once(dropped.id) == 0
        await s.revoke(kept.id)
        assert await s.get("/t/lease/kept") is None
    run(etcd, body)


def test_watch_streams_events_from_a_revision(etcd):
    async def body(s: store.Store):
        start = await s.put("/t/w/a", "1")
        await s.put("/t/w/b", "2")
        await s.delete("/t/w/a")
        seen = []
        with trio.fail_after(10):
            async for batch in s.watch("/t/w/", start, idle_timeout_s=10):
                seen += [(e.type, e.kv.key, e.kv.value) for e in batch.events]
                if len(seen) >= 3:
                    break
        assert seen == [("PUT", "/t/w/a", b"1"), ("PUT", "/t/w/b", b"2"), ("DELETE", "/t/w/a", b"")]
    run(etcd, body)


def test_watch_from_a_compacted_revision_raises_compacted(etcd):
    async def body(s: store.Store):
        old = await s.put("/t/c/a", "1")
        now = await s.put("/t/c/a", "2")
        await s.compact(now)
        with trio.fail_after(10), pytest.raises(store.Compacted) as raised:
            async for _ in s.watch("/t/c/", old, idle_timeout_s=10):
                pass
        assert raised.value.revision == now
    run(etcd, body)


def test_silent_watch_and_dead_endpoints_raise_unavailable(etcd):
    async def body(s: store.Store):
        rev = await s.revision()
        # Nothing happens under this prefix: the idle bound ends the watch (progress notify is 5 s).
        with trio.fail_after(10), pytest.raises(store.StoreUnavailable, match="brought nothing"):
            async for _ in s.watch("/t/silent/", rev + 1, progress_notify=False, idle_timeout_s=1):
                pass
        async with store.Store(["http://127.0.0.1:1", etcd.local_endpoint]) as failover:
            assert await failover.put("/t/f", "1") > 0  # the dead first endpoint hands over
            assert failover.endpoint == etcd.local_endpoint
        async with store.Store(["http://127.0.0.1:1"]) as dead:
            with trio.fail_after(10), pytest.raises(store.StoreUnavailable, match="no etcd endpoint"):
                await dead.get("/t/f")
    run(etcd, body)


def test_watch_raises_when_etcd_dies():
    reason = etcd_skip_reason()
    if reason:
        pytest.skip(reason)
    with Etcd(f"nskst{secrets.token_hex(3)}") as etcd:
        async def body(s: store.Store):
            rev = await s.put("/t/d", "1")
            with trio.fail_after(15), pytest.raises(store.StoreUnavailable):
                async for _ in s.watch("/t/", rev + 1, idle_timeout_s=10):
                    pass
        async def main():
            async with store.Store([etcd.local_endpoint]) as client, trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, _kill_soon, etcd)
                await body(client)
        trio_in_netns(etcd.ns, main)


def _kill_soon(etcd: Etcd) -> None:
    import time
    time.sleep(0.5)
    etcd.stop()


def test_tls_with_client_certificates():
    reason = etcd_skip_reason()
    if reason:
        pytest.skip(reason)
    with Etcd(f"nskst{secrets.token_hex(3)}", tls=True) as etcd:
        pki = etcd.pki

        async def main():
            async with etcd.store() as client:
                rev = await client.put("/t/tls", "1")
                assert (await client.get("/t/tls")).mod_revision == rev
            # Without a client certificate etcd refuses the handshake: no endpoint answers.
            async with store.Store([etcd.local_endpoint], ca_file=pki.ca_file) as anonymous:
                with pytest.raises(store.StoreUnavailable):
                    await anonymous.get("/t/tls")
        trio_in_netns(etcd.ns, main)
