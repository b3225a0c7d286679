"""Real guests for the lab: a small Linux VM built from Debian packages, booted with QEMU.

The image is the distribution's cloud kernel and an initramfs holding busybox, iperf3, socat and
exactly the shared libraries and kernel modules they need. It is built at first use from .debs
that ``apt-get download`` fetches and ``dpkg-deb -x`` unpacks (no root filesystem is installed),
and cached under a directory named by a hash of its inputs. The guest's /init configures eth0
from the kernel command line, starts iperf3 and a TCP/UDP echo, and serves commands on a virtio
console (hvc0, a Unix socket on the host) so tests can measure from inside the guest.

Pure parts (dependency parsing, ELF reading, the init script, the console protocol) are plain
functions; only ``build_image``, ``detect_accel``, ``start_guest`` and ``Console`` do I/O.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("netskin.guests")

CACHE_ROOT = Path(os.environ.get("NETSKIN_GUEST_CACHE", "/var/cache/netskin/guest"))
KERNEL_PACKAGE = "linux-image-cloud-amd64"  # virtio as modules, loaded by /init; no initrd tools needed
TOOL_PACKAGES = ("busybox-static", "iperf3", "socat")
TOOL_BINARIES = ("usr/bin/iperf3", "usr/bin/socat")  # dynamically linked: their libraries are copied
MODULES = ("virtio_pci", "virtio_net", "virtio_console")  # with their dependencies, in load order
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")
IMAGE_FORMAT = 1  # bump when the build recipe changes in a way the inputs below do not show

IPERF3_PORT = 5201
ECHO_PORT = 9000  # TCP and UDP
MEMORY_MB = 160
READY_MARKER = "netskin-guest: ready"
BOOTED_MARKER = "netskin-guest: init started"  # the KVM probe waits for this one
BOOT_TIMEOUT_S = 90.0  # TCG on a busy 2-core host; a guest normally answers in ~15 s
KVM_PROBE_TIMEOUT_S = 10.0


class GuestError(RuntimeError):
    """A guest could not be built, booted or reached; the message names the part and the fix."""


# --- Debian dependencies ---------------------------------------------------------------------


def parse_depends(field_value: str) -> list[str]:
    """Package names from a Depends/Pre-Depends field: the first of each alternative, no versions."""
    names = []
    for clause in field_value.split(","):
        first = clause.split("|")[0].strip()
        if not first:
            continue
        name = re.split(r"[\s(\[<]", first, maxsplit=1)[0].split(":")[0]
        if name:
            names.append(name)
    return names


def package_closure(roots: Iterable[str], depends_of: Callable[[str], list[str]]) -> list[str]:
    """roots and, transitively, the library packages (lib*) they depend on, in discovery order.

    Only libraries are followed: the guest needs the tools' shared objects, not what their
    maintainer scripts use (debconf, adduser, init-system-helpers).
    """
    order: list[str] = []
    pending = list(dict.fromkeys(roots))
    seen = set(pending)
    while pending:
        name = pending.pop(0)
        order.append(name)
        for dep in depends_of(name):
            if dep.startswith("lib") and dep not in seen:
                seen.add(dep)
                pending.append(dep)
    return order


# --- ELF: DT_NEEDED, PT_INTERP and .modinfo --------------------------------------------------


@dataclass(frozen=True)
class ElfInfo:
    needed: tuple[str, ...]
    interpreter: str | None
    modinfo: dict[str, str]


def read_elf(data: bytes) -> ElfInfo:
    """The shared objects an ELF64 little-endian file needs, its interpreter and its .modinfo."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise GuestError("not an ELF64 little-endian file")
    (e_phoff, e_shoff, _flags, _ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum,
     e_shstrndx) = struct.unpack_from("<QQIHHHHHH", data, 0x20)
    interpreter = None
    for i in range(e_phnum):
        p_type, _pf, p_offset, _va, _pa, p_filesz = struct.unpack_from("<IIQQQQ", data, e_phoff + i * e_phentsize)
        if p_type == 3:  # PT_INTERP
            interpreter = data[p_offset:p_offset + p_filesz].rstrip(b"\0").decode()
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
    names_off = sections[e_shstrndx][4] if e_shnum else 0

    def cstr(offset: int) -> str:
        return data[offset:data.index(b"\0", offset)].decode()

    needed: list[str] = []
    modinfo: dict[str, str] = {}
    for sh_name, sh_type, _f, _a, sh_offset, sh_size, sh_link, _i, _al, _es in sections:
        name = cstr(names_off + sh_name) if e_shnum else ""
        if sh_type == 6:  # SHT_DYNAMIC
            strtab = sections[sh_link][4]
            for off in range(sh_offset, sh_offset + sh_size, 16):
                tag, value = struct.unpack_from("<qQ", data, off)
                if tag == 0:
                    break
                if tag == 1:  # DT_NEEDED
                    needed.append(cstr(strtab + value))
        elif name == ".modinfo":
            for entry in data[sh_offset:sh_offset + sh_size].split(b"\0"):
                key, sep, value = entry.decode(errors="replace").partition("=")
                if sep:
                    modinfo.setdefault(key, value)
    return ElfInfo(tuple(needed), interpreter, modinfo)


def library_closure(binaries: Iterable[str], needed_of: Callable[[str], tuple[str, ...]]) -> list[str]:
    """Every shared object the binaries need, transitively, each once (sonames, discovery order)."""
    order: list[str] = []
    pending = [lib for b in binaries for lib in needed_of(b)]
    while pending:
        soname = pending.pop(0)
        if soname in order:
            continue
        order.append(soname)
        pending.extend(needed_of(soname))
    return order


def module_load_order(wanted: Iterable[str], depends_of: Callable[[str], list[str]]) -> list[str]:
    """Kernel modules with their dependencies, each after everything it depends on."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise GuestError(f"kernel module dependency cycle through {name}")
        visiting.add(name)
        for dep in depends_of(name):
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


# --- the guest's /init and kernel command line -----------------------------------------------


@dataclass(frozen=True)
class GuestNet:
    """What the guest's eth0 is configured with (from the kernel command line)."""

    name: str
    address: str  # 10.77.1.2/24
    gateway: str
    address6: str  # fd77:1::2/64
    gateway6: str
    mtu: int = 1500
    dns: str = "10.77.0.2"


def kernel_cmdline(net: GuestNet) -> str:
    # Unknown parameters with a dot are left alone by the kernel and read back by /init.
    return " ".join([
        "console=ttyS0", "quiet", "panic=1",
        f"netskin.name={net.name}", f"netskin.ip={net.address}", f"netskin.gw={net.gateway}",
        f"netskin.ip6={net.address6}", f"netskin.gw6={net.gateway6}", f"netskin.mtu={net.mtu}",
        f"netskin.dns={net.dns}",
    ])


_INIT_TEMPLATE = r"""#!/bin/busybox sh
# netskin lab guest: network from the kernel command line, iperf3 and echo servers, a console shell.
/bin/busybox mkdir -p /proc /sys /dev /tmp /bin /sbin /usr/bin /usr/sbin /etc
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/tmp
exec </dev/console >/dev/console 2>&1
echo "@BOOTED@"

arg() { for kv in $(cat /proc/cmdline); do case "$kv" in netskin.$1=*) echo "${kv#*=}";; esac; done; }
wait_for() { n=0; while [ ! -e "$1" ] && [ $n -lt 200 ]; do sleep 0.05; n=$((n + 1)); done; }

echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad
echo 0 > /proc/sys/net/ipv6/conf/all/accept_dad
for m in @MODULES@; do insmod "/lib/modules/$m.ko" || echo "netskin-guest: insmod $m failed"; done
wait_for /sys/class/net/eth0
wait_for /dev/hvc0

hostname "$(arg name)"
ip link set lo up
ip link set eth0 mtu "$(arg mtu)"
ip addr add "$(arg ip)" dev eth0
ip -6 addr add "$(arg ip6)" dev eth0
ip link set eth0 up
ip route add default via "$(arg gw)"
ip -6 route add default via "$(arg gw6)" dev eth0
echo "nameserver $(arg dns)" > /etc/resolv.conf

iperf3 -s -p @IPERF3_PORT@ -D
socat TCP6-LISTEN:@ECHO_PORT@,fork,reuseaddr,ipv6only=0 PIPE &
# One child per peer, connected to it, echoing until 10 s of silence: no fork per datagram.
socat -T 10 UDP6-LISTEN:@ECHO_PORT@,fork,reuseaddr,ipv6only=0 PIPE &

# The console: one request per line, "ID BASE64-COMMAND"; the answer is the output in base64
# between "@@NSK-BEGIN ID" and "@@NSK-END ID EXIT-CODE".
serve_console() {
    stty -F /dev/hvc0 raw -echo
    while true; do
        while read -r id code; do
            [ -n "$id" ] || continue
            echo "$code" | base64 -d > /tmp/cmd.sh
            sh /tmp/cmd.sh </dev/null >/tmp/out 2>&1
            rc=$?
            echo "@@NSK-BEGIN $id"
            base64 /tmp/out
            echo "@@NSK-END $id $rc"
        done </dev/hvc0 >/dev/hvc0
        sleep 0.2
    done
}
serve_console &
echo "@READY@ $(arg name)"
while true; do sleep 3600; done
"""


def render_init(modules: Iterable[str], iperf3_port: int = IPERF3_PORT, echo_port: int = ECHO_PORT) -> str:
    """The guest's /init (busybox sh); modules are loaded in the order given."""
    text = _INIT_TEMPLATE
    for key, value in (("@MODULES@", " ".join(modules)), ("@IPERF3_PORT@", str(iperf3_port)),
                       ("@ECHO_PORT@", str(echo_port)), ("@READY@", READY_MARKER),
                       ("@BOOTED@", BOOTED_MARKER)):
        text = text.replace(key, value)
    return text


# --- the console protocol --------------------------------------------------------------------


@dataclass(frozen=True)
class CommandResult:
    id: str
    exit_code: int
    output: str


def encode_command(command_id: str, command: str) -> bytes:
    """One request line for the guest's console shell."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", command_id):
        raise ValueError(f"console command id {command_id!r}: letters, digits, _ and - only")
    return f"{command_id} {base64.b64encode(command.encode()).decode()}\n".encode()


@dataclass
class ConsoleParser:
    """Bytes from the console in, finished command results out; other lines are ignored."""

    _buffer: bytes = b""
    _open: dict[str, list[str]] | None = None
    _current: str | None = None

    def feed(self, data: bytes) -> list[CommandResult]:
        self._buffer += data
        results = []
        while b"\n" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\n", 1)
            line = raw.decode(errors="replace").strip()
            if line.startswith("@@NSK-BEGIN "):
                self._current, self._open = line.split()[1], {}
                self._open[self._current] = []
            elif line.startswith("@@NSK-END "):
                parts = line.split()
                if len(parts) == 3 and self._open is not None and parts[1] == self._current and parts[2].isdigit():
                    payload = "".join(self._open[self._current])
                    output = base64.b64decode(payload).decode(errors="replace") if payload else ""
                    results.append(CommandResult(parts[1], int(parts[2]), output))
                self._current, self._open = None, None
            elif self._current is not None and self._open is not None:
                self._open[self._current].append(line)
        return results


class Console:
    """Run commands in a guest through its virtio console socket (one client at a time)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._seq = 0

    def run(self, command: str, timeout: float = 30.0, *, check: bool = False) -> CommandResult:
        self._seq += 1
        command_id = f"c{os.getpid()}-{self._seq}-{os.urandom(3).hex()}"
        parser = ConsoleParser()
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                sock.connect(str(self.path))
            except OSError as exc:
                raise GuestError(f"guest console {self.path}: {exc.strerror or exc}") from None
            sock.sendall(encode_command(command_id, command))
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestError(f"guest console {self.path}: no answer to {command!r} within {timeout} s")
                sock.settimeout(remaining)
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    raise GuestError(f"guest console {self.path} closed while running {command!r}")
                for result in parser.feed(data):
                    if result.id == command_id:
                        if check and result.exit_code != 0:
                            raise GuestError(f"{command!r} in the guest exited {result.exit_code}: "
                                             f"{result.output.strip()[-500:]}")
                        return result

    def wait_ready(self, timeout: float = BOOT_TIMEOUT_S, proc: subprocess.Popen | None = None,
                   serial_log: Path | None = None) -> float:
        """Poll until the console shell answers; seconds waited."""
        start = time.monotonic()
        while True:
            if proc is not None and proc.poll() is not None:
                raise GuestError(f"QEMU exited with {proc.returncode} while booting; {_tail(serial_log)}")
            try:
                if self.run("echo up", timeout=min(3.0, max(0.5, timeout))).output.strip() == "up":
                    return time.monotonic() - start
            except GuestError:
                pass
            if time.monotonic() - start > timeout:
                raise GuestError(f"guest console {self.path} not answering after {timeout:.0f} s; {_tail(serial_log)}")
            time.sleep(0.2)


def _tail(path: Path | None) -> str:
    if path is None:
        return "no serial log"
    try:
        return f"serial log {path} ends:\n" + path.read_text(errors="replace")[-1500:]
    except OSError:
        return f"no serial log at {path}"


_BB_PING_REPLY_RE = re.compile(r"seq=(\d+) ttl=\d+ time=([\d.]+) ms")
_BB_PING_SUMMARY_RE = re.compile(r"(\d+) packets transmitted, (\d+) packets received")


def parse_busybox_ping(output: str) -> dict:
    """Sent, received, loss and the RTTs (ms) from busybox ping's output."""
    rtts_ms = [float(m.group(2)) for m in _BB_PING_REPLY_RE.finditer(output)]
    summary = _BB_PING_SUMMARY_RE.search(output)
    if summary is None:
        raise GuestError(f"no ping summary in the guest's output:\n{output[-500:]}")
    sent, received = int(summary.group(1)), int(summary.group(2))
    return {
        "sent": sent,
        "received": received,
        "loss_percent": 100.0 * (sent - received) / sent if sent else 0.0,
        "rtts_ms": rtts_ms,
        "rtt_median_ms": sorted(rtts_ms)[len(rtts_ms) // 2] if rtts_ms else None,
    }


# --- building the image ----------------------------------------------------------------------


@dataclass(frozen=True)
class GuestImage:
    directory: Path
    kernel: Path
    initrd: Path
    key: str


def _candidate_version(package: str) -> str:
    done = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True, timeout=60)
    found = re.search(r"Candidate:\s*(\S+)", done.stdout)
    if done.returncode != 0 or not found or found.group(1) == "(none)":
        raise GuestError(f"Debian package {package} is not known to apt; run `apt-get update` "
                         f"(the guest image is built from {KERNEL_PACKAGE} and {', '.join(TOOL_PACKAGES)})")
    return found.group(1)


def image_key(versions: dict[str, str], init_template: str = _INIT_TEMPLATE) -> str:
    """The cache key: the packages' versions, the recipe's format and the init script."""
    text = json.dumps({"format": IMAGE_FORMAT, "versions": versions, "modules": MODULES,
                       "binaries": TOOL_BINARIES, "init": init_template}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_image(cache_root: Path = CACHE_ROOT, *, say: Callable[[str], None] = log.info) -> GuestImage:
    """The guest image for the packages apt offers now: from the cache, or built into it."""
    versions = {p: _candidate_version(p) for p in (KERNEL_PACKAGE, *TOOL_PACKAGES)}
    key = image_key(versions)
    directory = Path(cache_root) / key
    image = GuestImage(directory, directory / "vmlinuz", directory / "initrd.gz", key)
    if image.kernel.is_file() and image.initrd.is_file():
        return image
    say(f"building the guest image {key} from Debian packages (once; cached in {directory})")
    Path(cache_root).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="netskin-guest-", dir=cache_root) as tmp:
        work = Path(tmp)
        tree = work / "deb"
        debs = _download_closure([*TOOL_PACKAGES, _kernel_image_package()], work / "debs")
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True, capture_output=True)
        staging = work / "image"
        staging.mkdir()
        _assemble(tree, staging, work / "vmlinuz")
        (staging / "init").write_text(render_init(_module_names(staging)))
        (staging / "init").chmod(0o755)
        _write_cpio_gz(staging, work / "initrd.gz")
        (work / "inputs.json").write_text(json.dumps({"versions": versions, "debs": [d.name for d in debs]},
                                                     indent=2) + "\n")
        final = work / "final"
        final.mkdir()
        for name in ("vmlinuz", "initrd.gz", "inputs.json"):
            shutil.move(str(work / name), final / name)
        try:
            os.replace(final, directory)  # atomic: a concurrent build of the same key wins or loses whole
        except OSError:
            if not image.initrd.is_file():
                raise
    return image


def _kernel_image_package() -> str:
    """The versioned image package the kernel metapackage points at (linux-image-6.1.0-N-cloud-amd64)."""
    done = subprocess.run(["apt-cache", "depends", KERNEL_PACKAGE], capture_output=True, text=True, timeout=60)
    for dep in re.findall(r"Depends:\s*(\S+)", done.stdout):
        if dep.startswith("linux-image-"):
            return dep
    raise GuestError(f"{KERNEL_PACKAGE} depends on no linux-image package; run `apt-get update`")


def _download_closure(roots: list[str], dest: Path) -> list[Path]:
    dest.mkdir(parents=True)
    os.chmod(dest, 0o777)  # apt-get download drops privileges to _apt where it can
    debs: dict[str, Path] = {}

    def fetch(name: str) -> Path:
        done = subprocess.run(["apt-get", "download", "-q", name], cwd=dest, capture_output=True, text=True,
                              timeout=600)
        found = sorted(dest.glob(f"{name}_*.deb"))
        if done.returncode != 0 or not found:
            raise GuestError(f"apt-get download {name} failed: {done.stderr.strip()[-500:]}")
        return found[0]

    def depends_of(name: str) -> list[str]:
        deb = debs.setdefault(name, fetch(name))
        fields = [_deb_field(deb, f) for f in ("Pre-Depends", "Depends")]
        return [] if name.startswith("linux-image-") else parse_depends(",".join(filter(None, fields)))

    for name in package_closure(roots, depends_of):
        debs.setdefault(name, fetch(name))
    return list(debs.values())


def _deb_field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                          check=True).stdout.strip()


def _resolve_in_tree(tree: Path, path: Path) -> Path:
    """Follow symlinks inside an unpacked tree (absolute targets are relative to the tree)."""
    for _ in range(20):
        if not path.is_symlink():
            return path
        target = Path(os.readlink(path))
        path = tree / target.relative_to("/") if target.is_absolute() else path.parent / target
    raise GuestError(f"symlink loop at {path}")


def _find_library(tree: Path, soname: str) -> Path:
    for d in LIB_DIRS:
        candidate = tree / d / soname
        if candidate.exists() or candidate.is_symlink():
            resolved = _resolve_in_tree(tree, candidate)
            if resolved.is_file():
                return resolved
    raise GuestError(f"shared library {soname} is in none of the downloaded packages")


def _assemble(tree: Path, staging: Path, kernel_out: Path) -> None:
    for d in ("bin", "usr/bin", "lib/x86_64-linux-gnu", "lib64", "lib/modules", "etc", "tmp"):
        (staging / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(tree / "bin/busybox", staging / "bin/busybox")

    elf_cache: dict[str, ElfInfo] = {}

    def elf(path: Path) -> ElfInfo:
        key = str(path)
        if key not in elf_cache:
            elf_cache[key] = read_elf(path.read_bytes())
        return elf_cache[key]

    interpreters = set()
    for binary in TOOL_BINARIES:
        shutil.copy2(tree / binary, staging / binary)
        if elf(tree / binary).interpreter:
            interpreters.add(elf(tree / binary).interpreter)

    def needed_of(name: str) -> tuple[str, ...]:
        path = tree / name if "/" in name else _find_library(tree, name)
        return elf(path).needed

    for soname in library_closure(TOOL_BINARIES, needed_of):
        shutil.copy2(_find_library(tree, soname), staging / "lib/x86_64-linux-gnu" / soname)
    for interp in interpreters:  # /lib64/ld-linux-x86-64.so.2
        source = _resolve_in_tree(tree, tree / interp.lstrip("/"))
        (staging / interp.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, staging / interp.lstrip("/"))

    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise GuestError("the kernel package holds no /boot/vmlinuz-*")
    shutil.copy2(kernels[-1], kernel_out)
    release = kernels[-1].name.removeprefix("vmlinuz-")
    by_name = {p.name.removesuffix(".ko"): p for p in (tree / "lib/modules" / release).rglob("*.ko")}

    def module_deps(name: str) -> list[str]:
        if name not in by_name:
            raise GuestError(f"kernel module {name} is not in {release}")
        return [d for d in elf(by_name[name]).modinfo.get("depends", "").split(",") if d]

    order = module_load_order(MODULES, module_deps)
    for name in order:
        shutil.copy2(by_name[name], staging / "lib/modules" / f"{name}.ko")
    (staging / "lib/modules/order").write_text(" ".join(order) + "\n")


def _module_names(staging: Path) -> list[str]:
    return (staging / "lib/modules/order").read_text().split()


def _write_cpio_gz(staging: Path, out: Path) -> None:
    """A newc cpio of staging, gzipped; owned by root, in a stable order."""
    buf = io.BytesIO()
    ino = 1
    paths = sorted(staging.rglob("*"), key=lambda p: str(p.relative_to(staging)))
    for path in paths:
        rel = str(path.relative_to(staging))
        st = path.lstat()
        if path.is_symlink():
            data = os.readlink(path).encode()
        elif path.is_file():
            data = path.read_bytes()
        else:
            data = b""
        _cpio_entry(buf, rel, st.st_mode, data, ino)
        ino += 1
    _cpio_entry(buf, "TRAILER!!!", 0, b"", 0)
    with gzip.open(out, "wb", compresslevel=6) as f:
        f.write(buf.getvalue())


def _cpio_entry(buf: io.BytesIO, name: str, mode: int, data: bytes, ino: int) -> None:
    name_bytes = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_bytes), 0)
    buf.write(b"070701" + b"".join(f"{v:08x}".encode() for v in fields))
    buf.write(name_bytes)
    buf.write(b"\0" * (-(110 + len(name_bytes)) % 4))
    buf.write(data)
    buf.write(b"\0" * (-len(data) % 4))


# --- booting ---------------------------------------------------------------------------------


@dataclass
class GuestSpec:
    """One guest: its network, its tap (in the namespace QEMU runs in) and its files."""

    net: GuestNet
    tap: str
    mac: str
    workdir: Path
    console_path: Path = field(init=False)
    serial_log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.console_path = self.workdir / f"{self.net.name}.console"
        self.serial_log = self.workdir / f"{self.net.name}.serial.log"


def qemu_argv(image: GuestImage, spec: GuestSpec, accel: str, memory_mb: int = MEMORY_MB) -> list[str]:
    argv = [
        "qemu-system-x86_64", "-name", spec.net.name, "-nodefaults", "-no-user-config", "-nographic",
        "-monitor", "none", "-no-reboot", "-m", f"{memory_mb}M", "-smp", "1",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", kernel_cmdline(spec.net),
        "-serial", f"file:{spec.serial_log}",
        "-netdev", f"tap,id=n0,ifname={spec.tap},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=n0,mac={spec.mac}",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=con0,path={spec.console_path},server=on,wait=off",
        "-device", "virtconsole,chardev=con0",
    ]
    if accel == "kvm":
        argv += ["-enable-kvm", "-cpu", "host"]
    else:
        argv += ["-accel", "tcg", "-cpu", "max"]
    return argv


def detect_accel(image: GuestImage, cache_root: Path = CACHE_ROOT) -> str:
    """"kvm" if this host's KVM boots the guest to its ready marker within seconds, else "tcg".

    Probed once per host kernel, QEMU and image, and remembered in the cache: /dev/kvm may exist
    and still not boot a stock kernel (nested or paravirtual KVM).
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    try:
        qemu_stat = os.stat(qemu)
    except OSError:
        raise GuestError("qemu-system-x86_64 not found; apt-get install qemu-system-x86") from None
    probe_key = hashlib.sha256(json.dumps([os.uname().release, qemu_stat.st_size, qemu_stat.st_mtime_ns,
                                           image.key]).encode()).hexdigest()[:16]
    record = Path(cache_root) / f"accel-{probe_key}.json"
    try:
        return json.loads(record.read_text())["accel"]
    except (OSError, ValueError, KeyError):
        pass
    with tempfile.TemporaryDirectory(prefix="netskin-kvm-probe-") as tmp:
        serial = Path(tmp) / "serial.log"
        argv = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-nographic", "-monitor", "none",
                "-no-reboot", "-enable-kvm", "-cpu", "host", "-m", f"{MEMORY_MB}M",
                "-kernel", str(image.kernel), "-initrd", str(image.initrd),
                "-append", "console=ttyS0 quiet panic=1 netskin.name=kvmprobe", "-serial", f"file:{serial}"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + KVM_PROBE_TIMEOUT_S
            accel = "tcg"
            while time.monotonic() < deadline and proc.poll() is None:
                if serial.exists() and BOOTED_MARKER in serial.read_text(errors="replace"):
                    accel = "kvm"
                    break
                time.sleep(0.1)
        finally:
            proc.kill()
            proc.wait()
    record.write_text(json.dumps({"accel": accel, "probed": time.time()}) + "\n")
    return accel


def start_guest(image: GuestImage, spec: GuestSpec, accel: str, run_in: list[str],
                log_path: Path) -> subprocess.Popen:
    """Start QEMU for spec (``run_in`` prefixes argv, e.g. ``ip netns exec NS``); the caller waits."""
    spec.console_path.unlink(missing_ok=True)
    spec.serial_log.unlink(missing_ok=True)
    with open(log_path, "ab") as logfile:
        return subprocess.Popen([*run_in, *qemu_argv(image, spec, accel)], stdin=subprocess.DEVNULL,
                                stdout=logfile, stderr=logfile, start_new_session=True)


def wait_console_socket(spec: GuestSpec, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not spec.console_path.exists():
        if proc.poll() is not None:
            raise GuestError(f"QEMU for {spec.net.name} exited with {proc.returncode}; see {spec.workdir}")
        if time.monotonic() > deadline:
            raise GuestError(f"QEMU for {spec.net.name} made no console socket in {timeout:.0f} s")
        time.sleep(0.05)
