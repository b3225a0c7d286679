"""interceptor.libvirt_source's shell against a stand-in for the libvirt binding: events from libvirt's
thread reach trio as appeared/changed/gone, and a lost connection is re-established with a listing
that catches up on what happened meanwhile."""

from __future__ import annotations

import threading

import pytest
import trio

from interceptor import libvirt_source as ls
from interceptor.libvirt_source import Appeared, Changed, LibvirtSource
from tests.unit.test_libvirt_source import BRIDGE_RUNNING, NETSKIN_META, domain_xml

WEB = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"
DB = "11111111-2222-3333-4444-555555555555"


class FakeError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code

    def get_error_code(self) -> int:
        return self.code


class FakeDomain:
    def __init__(self, host: FakeHypervisor, uuid: str) -> None:
        self.host, self.uuid = host, uuid

    def UUIDString(self) -> str:
        return self.uuid

    def XMLDesc(self, _flags: int) -> str:
        if self.uuid not in self.host.domains:
            raise FakeError("no domain", FakeLibvirt.VIR_ERR_NO_DOMAIN)
        return self.host.domains[self.uuid]

    def interfaceAddresses(self, _source, _flags=0):
        return {}


class FakeConnection:
    def __init__(self, host: FakeHypervisor) -> None:
        self.host = host
        self.callbacks: list = []
        self.on_close = None
        self.closed = False

    def registerCloseCallback(self, callback, _opaque) -> None:
        self.on_close = callback

    def unregisterCloseCallback(self) -> None:
        self.on_close = None

    def domainEventRegisterAny(self, _dom, _event_id, callback, _opaque) -> None:
        self.callbacks.append(callback)

    def listAllDomains(self, _flags):
        return [FakeDomain(self.host, uuid) for uuid in self.host.domains]

    def lookupByUUIDString(self, uuid: str) -> FakeDomain:
        if uuid not in self.host.domains:
            raise FakeError("no domain", FakeLibvirt.VIR_ERR_NO_DOMAIN)
        return FakeDomain(self.host, uuid)

    def close(self) -> None:
        self.closed = True


class FakeHypervisor:
    """Domains by uuid → XML; the connections the source opened; opens that must fail."""

    def __init__(self) -> None:
        self.domains: dict[str, str] = {}
        self.connections: list[FakeConnection] = []
        self.refuse = 0

    def open(self, _uri: str) -> FakeConnection:
        if self.refuse:
            self.refuse -= 1
            raise FakeError("Failed to connect socket")
        conn = FakeConnection(self)
        self.connections.append(conn)
        return conn

    def fire(self, uuid: str) -> None:
        """A domain event, from another thread as libvirt's event loop sends it."""
        conn = self.connections[-1]

        def send() -> None:
            for callback in conn.callbacks[:1]:  # one registration is enough: each re-reads
                callback(conn, FakeDomain(self, uuid), 0, 0, None)

        thread = threading.Thread(target=send)
        thread.start()
        thread.join()

    def drop(self) -> None:
        conn = self.connections[-1]
        thread = threading.Thread(target=conn.on_close, args=(conn, 0, None))
        thread.start()
        thread.join()


class FakeLibvirt:
    VIR_DOMAIN_EVENT_ID_LIFECYCLE = 0
    VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED = 15
    VIR_DOMAIN_EVENT_ID_DEVICE_ADDED = 19
    VIR_DOMAIN_EVENT_ID_METADATA_CHANGE = 23
    VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE = 0
    VIR_ERR_NO_DOMAIN = 42
    libvirtError = FakeError

    def __init__(self, host: FakeHypervisor) -> None:
        self.openReadOnly = host.open


@pytest.fixture
def host(monkeypatch):
    hypervisor = FakeHypervisor()
    monkeypatch.setattr(ls, "load_binding", lambda: FakeLibvirt(hypervisor))
    monkeypatch.setattr(ls, "_start_event_loop", lambda _libvirt: None)
    return hypervisor


def _names(events) -> list[tuple[str, str]]:
    return [(type(e).__name__, e.vm.name) for e in events]


async def _take(receive, n: int) -> list:
    with trio.fail_after(5):
        return [await receive.receive() for _ in range(n)]


def test_events_flow_and_a_reconnect_catches_up(host):
    host.domains[WEB] = domain_xml(BRIDGE_RUNNING, metadata=NETSKIN_META)

    async def main():
        source = LibvirtSource("test:///fake", reconnect_min_s=0.01, reconnect_max_s=0.05)
        send, receive = trio.open_memory_channel(100)
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, send)
            (first,) = await _take(receive, 1)
            assert isinstance(first, Appeared) and first.vm.skin == "3g-average"

            host.domains[WEB] = domain_xml(BRIDGE_RUNNING)  # metadata removed
            await trio.to_thread.run_sync(host.fire, WEB)
            (changed,) = await _take(receive, 1)
            assert isinstance(changed, Changed) and changed.vm.skin is None

            host.domains[WEB] = domain_xml(BRIDGE_RUNNING, running=False)
            await trio.to_thread.run_sync(host.fire, WEB)
            assert _names(await _take(receive, 1)) == [("Gone", "web")]

            # web starts again and db is started with no event (as while libvirtd is away), then the
            # connection drops and the first two reconnects fail: the listing after them tells.
            host.domains[WEB] = domain_xml(BRIDGE_RUNNING.replace("vnet3", "vnet9"))
            host.domains[DB] = domain_xml(BRIDGE_RUNNING.replace("vnet3", "vnet4"), name="db", uuid=DB)
            host.refuse = 2
            await trio.to_thread.run_sync(host.drop)
            events = await _take(receive, 2)
            assert sorted(_names(events)) == [("Appeared", "db"), ("Appeared", "web")]
            assert source.inventory.vms["web"].tap == "vnet9"
            assert len(host.connections) == 2 and host.connections[0].closed

            del host.domains[DB]  # undefined: the event arrives, the lookup fails
            await trio.to_thread.run_sync(host.fire, DB)
            assert _names(await _take(receive, 1)) == [("Gone", "db")]
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_first_connection_that_fails_is_one_user_error(host):
    host.refuse = 1

    async def main():
        send, _receive = trio.open_memory_channel(10)
        async with trio.open_nursery() as nursery:
            await nursery.start(LibvirtSource("test:///fake").run, send)

    with pytest.raises(BaseExceptionGroup) as caught:
        trio.run(main)
    matched, _ = caught.value.split(ls.LibvirtUnavailable)
    assert matched is not None and "libvirt test:///fake: Failed to connect socket" in str(matched.exceptions[0])


def test_an_unreadable_domain_is_left_out_and_the_others_stay(host, caplog):
    host.domains[WEB] = domain_xml(BRIDGE_RUNNING)
    host.domains[DB] = "<domain><name>db</name>"

    async def main():
        source = LibvirtSource("test:///fake")
        send, receive = trio.open_memory_channel(100)
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, send)
            assert _names(await _take(receive, 1)) == [("Appeared", "web")]
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert any(f"domain {DB} left out" in r.getMessage() for r in caplog.records)
