"""interceptor.sdnotify against a real AF_UNIX datagram socket standing in for systemd's."""

from __future__ import annotations

import os
import secrets
import socket

import pytest

from interceptor import sdnotify


@pytest.fixture
def path_socket(tmp_path, monkeypatch):
    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        yield sock


def test_ready_and_status_arrive_as_one_message(path_socket):
    assert sdnotify.notify("READY=1", "STATUS=enforcing 2 VM(s), fail_mode=closed")
    assert path_socket.recv(4096) == b"READY=1\nSTATUS=enforcing 2 VM(s), fail_mode=closed"


def test_the_sender_is_this_process(path_socket):
    """systemd's NotifyAccess=main accepts a message only from the main pid: the kernel's
    credentials on the datagram are what it checks, and they name us, not a helper."""
    path_socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    assert sdnotify.notify("WATCHDOG=1")
    data, ancdata, _, _ = path_socket.recvmsg(4096, socket.CMSG_SPACE(12))
    assert data == b"WATCHDOG=1"
    (level, kind, creds), = ancdata
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
    assert int.from_bytes(creds[:4], "little") == os.getpid()


def test_abstract_socket_names_start_with_at(monkeypatch):
    name = f"netskin-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"


def test_not_under_systemd_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.notify("READY=1") is False


def test_a_socket_nobody_listens_on_is_reported_not_raised(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sdnotify.notify("WATCHDOG=1") is False
    assert "sd_notify to" in caplog.text and "WATCHDOG=1" in caplog.text


@pytest.mark.parametrize("field", ["READY", "STATUS=two\nlines"])
def test_a_malformed_field_is_an_error(path_socket, field):
    with pytest.raises(ValueError, match="KEY=VALUE"):
        sdnotify.notify(field)


def test_an_unsupported_address_is_an_error(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    with pytest.raises(ValueError, match="NOTIFY_SOCKET"):
        sdnotify.notify("READY=1")


def test_watchdog_interval(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sdnotify.watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    assert sdnotify.watchdog_interval_s() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval_s() == 10.0
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert sdnotify.watchdog_interval_s() is None


def test_watchdog_meant_for_another_process_is_not_ours(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getppid()))
    assert sdnotify.watchdog_interval_s() is None


@pytest.mark.parametrize("name,value", [("WATCHDOG_USEC", "ten seconds"), ("WATCHDOG_PID", "me")])
def test_malformed_watchdog_variables_are_errors(monkeypatch, name, value):
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        sdnotify.watchdog_interval_s()
