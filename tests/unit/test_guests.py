"""The guest image builder's pure parts and the console protocol (manager/guests.py)."""

from __future__ import annotations

import base64
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from manager import guests
from manager.guests import (
    CommandResult,
    ConsoleParser,
    GuestError,
    GuestNet,
    encode_command,
    kernel_cmdline,
    library_closure,
    module_load_order,
    package_closure,
    parse_busybox_ping,
    parse_depends,
    read_elf,
    render_init,
)

# --- Debian dependencies ---------------------------------------------------------------------


def test_parse_depends_takes_first_alternatives_without_versions_or_arch():
    field = "debconf (>= 0.5) | debconf-2.0, libc6 (>= 2.34), libiperf0 (= 3.12-1), libfoo:any, libbar [amd64]"
    assert parse_depends(field) == ["debconf", "libc6", "libiperf0", "libfoo", "libbar"]
    assert parse_depends("") == []


def test_package_closure_follows_only_library_packages_once():
    depends = {
        "iperf3": ["debconf", "adduser", "libc6", "libiperf0"],
        "libiperf0": ["libc6", "libsctp1", "libssl3"],
        "libssl3": ["libc6", "debconf"],
        "libc6": ["libgcc-s1"],
        "libgcc-s1": ["gcc-12-base", "libc6"],
        "busybox-static": [],
    }
    order = package_closure(["iperf3", "busybox-static"], lambda name: depends.get(name, []))
    assert order == ["iperf3", "busybox-static", "libc6", "libiperf0", "libgcc-s1", "libsctp1", "libssl3"]


def test_library_closure_is_transitive_and_each_soname_once():
    needed = {
        "usr/bin/iperf3": ("libiperf.so.0", "libc.so.6"),
        "libiperf.so.0": ("libssl.so.3", "libcrypto.so.3", "libc.so.6"),
        "libssl.so.3": ("libcrypto.so.3", "libc.so.6"),
        "libcrypto.so.3": ("libc.so.6",),
        "libc.so.6": ("ld-linux-x86-64.so.2",),
        "ld-linux-x86-64.so.2": (),
    }
    order = library_closure(["usr/bin/iperf3"], needed.__getitem__)
    assert sorted(order) == sorted(set(needed) - {"usr/bin/iperf3"})
    assert len(order) == len(set(order))


def test_module_load_order_puts_dependencies_first():
    deps = {"virtio_net": ["net_failover", "virtio", "virtio_ring"], "net_failover": ["failover"], "failover": [],
            "virtio": ["virtio_ring"], "virtio_ring": [], "virtio_console": ["virtio", "virtio_ring"]}
    order = module_load_order(["virtio_net", "virtio_console"], deps.__getitem__)
    assert sorted(order) == sorted(deps)
    for module, needs in deps.items():
        assert all(order.index(dep) < order.index(module) for dep in needs)


def test_module_load_order_refuses_a_cycle():
    with pytest.raises(GuestError, match="cycle"):
        module_load_order(["a"], {"a": ["b"], "b": ["a"]}.__getitem__)


# --- ELF -------------------------------------------------------------------------------------


def test_read_elf_finds_needed_libraries_and_interpreter_of_this_python():
    info = read_elf(Path(sys.executable).resolve().read_bytes())
    ldd = subprocess.run(["ldd", str(Path(sys.executable).resolve())], capture_output=True, text=True)
    if ldd.returncode != 0 or "statically" in ldd.stdout:
        pytest.skip("this Python is not dynamically linked")
    assert info.interpreter and info.interpreter.startswith("/")
    assert "libc.so.6" in info.needed or any(n.startswith("libpython") for n in info.needed)
    assert all(soname in ldd.stdout for soname in info.needed)


def _elf_with_modinfo(modinfo: bytes) -> bytes:
    """A minimal ELF64 relocatable with a .shstrtab and a .modinfo section (like a .ko)."""
    shstrtab = b"\0.shstrtab\0.modinfo\0"
    header_size, sh_size = 64, 64
    shstr_off = header_size
    modinfo_off = shstr_off + len(shstrtab)
    sh_off = modinfo_off + len(modinfo)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, sh_off, 0, 64, 0, 0, sh_size, 3, 1)
    sections = [
        bytes(sh_size),
        struct.pack("<IIQQQQIIQQ", 1, 3, 0, 0, shstr_off, len(shstrtab), 0, 0, 1, 0),
        struct.pack("<IIQQQQIIQQ", 11, 1, 0, 0, modinfo_off, len(modinfo), 0, 0, 1, 0),
    ]
    return header + shstrtab + modinfo + b"".join(sections)


def test_read_elf_reads_module_dependencies_from_modinfo():
    data = _elf_with_modinfo(b"license=GPL\0depends=virtio,virtio_ring,net_failover\0name=virtio_net\0")
    info = read_elf(data)
    assert info.modinfo["depends"] == "virtio,virtio_ring,net_failover"
    assert info.modinfo["name"] == "virtio_net"
    assert info.needed == () and info.interpreter is None


def test_read_elf_rejects_what_is_not_elf64():
    with pytest.raises(GuestError, match="not an ELF64"):
        read_elf(b"#!/bin/sh\n")


# --- init script and command line ------------------------------------------------------------


def test_render_init_loads_modules_in_order_and_starts_the_servers():
    text = render_init(["virtio_ring", "virtio", "virtio_net"], iperf3_port=5301, echo_port=9100)
    assert text.startswith("#!/bin/busybox sh\n")
    assert "for m in virtio_ring virtio virtio_net; do" in text
    assert "iperf3 -s -p 5301 -D" in text
    assert "TCP6-LISTEN:9100," in text and "UDP6-LISTEN:9100," in text
    assert guests.READY_MARKER in text and guests.BOOTED_MARKER in text
    assert "@" + "MODULES@" not in text and "@READY@" not in text


def test_render_init_is_valid_shell():
    done = subprocess.run(["sh", "-n"], input=render_init(["virtio"]), text=True, capture_output=True)
    assert done.returncode == 0, done.stderr


def test_kernel_cmdline_carries_the_network_for_init():
    net = GuestNet("vm1", "10.77.1.2/24", "10.77.1.1", "fd77:1::2/64", "fd77:1::1", 1400, "10.77.0.2")
    words = kernel_cmdline(net).split()
    assert "console=ttyS0" in words
    for word in ("netskin.name=vm1", "netskin.ip=10.77.1.2/24", "netskin.gw=10.77.1.1", "netskin.ip6=fd77:1::2/64",
                 "netskin.gw6=fd77:1::1", "netskin.mtu=1400", "netskin.dns=10.77.0.2"):
        assert word in words


def test_qemu_argv_uses_the_tap_and_the_console_socket(tmp_path):
    image = guests.GuestImage(tmp_path, tmp_path / "vmlinuz", tmp_path / "initrd.gz", "k")
    spec = guests.GuestSpec(GuestNet("vm1", "10.77.1.2/24", "10.77.1.1", "fd77:1::2/64", "fd77:1::1"),
                            "tap-vm1", "02:77:00:00:01:02", tmp_path)
    tcg = guests.qemu_argv(image, spec, "tcg")
    assert "ifname=tap-vm1" in " ".join(tcg) and "mac=02:77:00:00:01:02" in " ".join(tcg)
    assert f"socket,id=con0,path={tmp_path / 'vm1.console'},server=on,wait=off" in tcg
    assert "-enable-kvm" not in tcg and "-enable-kvm" in guests.qemu_argv(image, spec, "kvm")


# --- console protocol ------------------------------------------------------------------------


def _answer(command_id: str, output: bytes, rc: int, width: int = 76) -> bytes:
    encoded = base64.b64encode(output).decode()
    lines = [encoded[i:i + width] for i in range(0, len(encoded), width)]
    return ("\r\n".join([f"@@NSK-BEGIN {command_id}", *lines, f"@@NSK-END {command_id} {rc}"]) + "\r\n").encode()


def test_encode_command_is_one_line_the_guest_decodes():
    line = encode_command("c1-2", "echo 'a b'\nexit 3")
    command_id, payload = line.decode().rstrip("\n").split(" ")
    assert command_id == "c1-2" and line.count(b"\n") == 1
    assert base64.b64decode(payload).decode() == "echo 'a b'\nexit 3"
    with pytest.raises(ValueError):
        encode_command("bad id", "true")


def test_parser_returns_output_and_exit_code_and_ignores_noise():
    parser = ConsoleParser()
    stream = b"kernel noise\n" + _answer("old", b"stale", 0) + b"garbage\n" + _answer("c1", b"hello\nworld", 3)
    results = parser.feed(stream)
    assert results == [CommandResult("old", 0, "stale"), CommandResult("c1", 3, "hello\nworld")]


def test_parser_handles_empty_output_and_a_truncated_answer():
    parser = ConsoleParser()
    assert parser.feed(b"@@NSK-BEGIN c1\n@@NSK-END c1 0\n") == [CommandResult("c1", 0, "")]
    # An answer cut short by a reconnect: a new BEGIN starts over, the orphan END is ignored.
    assert parser.feed(b"@@NSK-BEGIN c2\naGVs\n" + _answer("c3", b"ok", 0) + b"@@NSK-END c2 0\n") == [
        CommandResult("c3", 0, "ok")]


@given(output=st.binary(max_size=3000), rc=st.integers(0, 255), cuts=st.lists(st.integers(1, 200), max_size=40))
def test_parser_reassembles_any_split_of_the_stream(output, rc, cuts):
    stream = _answer("c9", output, rc)
    parser, results, pos = ConsoleParser(), [], 0
    for cut in cuts:
        results += parser.feed(stream[pos:pos + cut])
        pos += cut
    results += parser.feed(stream[pos:])
    assert results == [CommandResult("c9", rc, output.decode(errors="replace"))]


def test_parse_busybox_ping():
    output = """PING 10.77.0.2 (10.77.0.2): 56 data bytes
64 bytes from 10.77.0.2: seq=0 ttl=63 time=11.683 ms
64 bytes from 10.77.0.2: seq=2 ttl=63 time=1.502 ms
64 bytes from 10.77.0.2: seq=3 ttl=63 time=1.240 ms

--- 10.77.0.2 ping statistics ---
4 packets transmitted, 3 packets received, 25% packet loss
round-trip min/avg/max = 1.240/4.808/11.683 ms
"""
    result = parse_busybox_ping(output)
    assert (result["sent"], result["received"], result["loss_percent"]) == (4, 3, 25.0)
    assert result["rtts_ms"] == [11.683, 1.502, 1.240]
    assert result["rtt_median_ms"] == 1.502
    with pytest.raises(GuestError, match="no ping summary"):
        parse_busybox_ping("ping: sendto: Network unreachable\n")


def test_image_key_changes_with_any_input():
    versions = {"linux-image-cloud-amd64": "6.1.1", "iperf3": "3.12"}
    key = guests.image_key(versions)
    assert key == guests.image_key(dict(versions))
    assert key != guests.image_key({**versions, "iperf3": "3.13"})
    assert key != guests.image_key(versions, init_template="#!/bin/sh\n")


def test_cpio_is_readable_by_cpio(tmp_path):
    if subprocess.run(["sh", "-c", "command -v cpio"], capture_output=True).returncode != 0:
        pytest.skip("no cpio to read the archive back")
    staging = tmp_path / "s"
    (staging / "bin").mkdir(parents=True)
    (staging / "init").write_text("#!/bin/sh\n")
    (staging / "init").chmod(0o755)
    (staging / "bin/sh").symlink_to("busybox")
    guests._write_cpio_gz(staging, tmp_path / "initrd.gz")
    listing = subprocess.run(["sh", "-c", f"zcat {tmp_path / 'initrd.gz'} | cpio -t"], capture_output=True, text=True)
    assert set(listing.stdout.split()) == {"bin", "bin/sh", "init"}
