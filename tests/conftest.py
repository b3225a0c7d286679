"""Shared fixtures: the demo lab in network namespaces, built per test or per module.

Each lab gets a unique prefix so parallel and leftover runs never collide, and is removed by a
finalizer registered before it is built, so a failed build or test still leaves nothing behind.
"""

from __future__ import annotations

import os
import secrets
import shutil

import pytest

LAB_TOOLS = ("ip", "iptables", "sysctl", "ping", "dig", "iperf3")


def lab_skip_reason() -> str | None:
    """Why the lab cannot be built on this host, or None."""
    if os.geteuid() != 0:
        return "the namespace lab needs root (network namespaces, veth, /etc/netns)"
    missing = [tool for tool in LAB_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"the namespace lab needs {', '.join(missing)} on PATH (apt-get install iproute2 iptables iputils-ping dnsutils iperf3)"
    return None


def unique_lab_prefix() -> str:
    # Short on purpose: namespace names are prefix + "-inet" / "-vm12".
    return f"nsk{os.getpid() % 10000}{secrets.token_hex(2)[:3]}"


def _build_lab(request: pytest.FixtureRequest, vms: int = 2):
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    from manager.lab import lab_down, lab_up

    prefix = unique_lab_prefix()
    request.addfinalizer(lambda: lab_down(prefix))
    return lab_up(prefix, vms=vms)


@pytest.fixture
def lab(request):
    """A fresh two-VM lab for one test."""
    return _build_lab(request)


@pytest.fixture(scope="module")
def lab_module(request):
    """A two-VM lab shared by the tests of one module; tests must leave it as they found it."""
    return _build_lab(request)


@pytest.fixture
def lab_prefix(request):
    """A unique lab prefix with nothing built yet; whatever the test builds under it is removed."""
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    from manager.lab import lab_down

    prefix = unique_lab_prefix()
    request.addfinalizer(lambda: lab_down(prefix))
    return prefix
