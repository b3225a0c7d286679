"""The lab's own libvirt: Debian's libvirtd inside the lab's hv namespace, with the lab's guests as
domains, so netskin can be tried against libvirt without touching the host's libvirt.

libvirtd run as root is "privileged": its paths (/etc/libvirt, /run/libvirt, /var/lib/libvirt,
/var/log/libvirt, /var/cache/libvirt) are built in and it looks up the user ``libvirt-qemu``
even when qemu.conf names another. So it runs in a mount namespace of its own (``ip netns exec``
makes one) where the lab's directories are bind-mounted over those paths, and, where the host
has no such user, a copy of /etc/passwd and /etc/group that adds it. The mount points are
created empty if missing, as libvirt's own packages would; nothing is mounted outside that
namespace. Its sockets live in the lab's directory, so clients reach it through
``qemu+unix:///system?socket=…``. QEMU runs as root without a security driver, cgroups or
virtlogd: a lab, not a hardened host. Everything libvirtd starts lives in the hv namespace, so
``lab_down`` stops it with the rest of the lab.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

from manager.lab import Lab, LabError

log = logging.getLogger("netskin.libvirt_lab")

LIBVIRTD = "/usr/sbin/libvirtd"
QEMU_USER = "libvirt-qemu"  # Debian's build default, looked up before qemu.conf is read
# Built-in directory → the lab's stand-in (under the lab's libvirt directory).
PRIVILEGED_DIRS = {
    "/etc/libvirt": "etc",
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/var/log/libvirt": "log",
    "/var/cache/libvirt": "cache",
}
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

_QEMU_CONF = """\
# netskin lab: QEMU as root, no confinement, no cgroups, no virtlogd.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""


@dataclass(frozen=True)
class LabLibvirt:
    """The lab's libvirtd: where it lives and how to reach it."""

    directory: Path
    pid: int
    hv_ns: str

    @property
    def socket(self) -> Path:
        return self.directory / "sock" / "libvirt-sock"

    @property
    def uri(self) -> str:
        """Read-write: define, start, destroy, set metadata."""
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def uri_ro(self) -> str:
        """Read-only, as netskin's source connects."""
        return f"qemu+unix:///system?socket={self.socket}-ro"

    def open(self):
        import libvirt

        return libvirt.open(self.uri)


def libvirt_skip_reason() -> str | None:
    """Why the lab's libvirt cannot run here, or None."""
    if not os.access(LIBVIRTD, os.X_OK):
        return f"the libvirt lab needs {LIBVIRTD}: apt-get install libvirt-daemon libvirt-daemon-driver-qemu"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "the libvirt lab needs the libvirt-python binding: pip install 'netskin[libvirt]'"
    return None


def _libvirtd_conf(directory: Path) -> str:
    return "\n".join([
        f'unix_sock_dir = "{directory / "sock"}"',
        'unix_sock_group = "root"',
        'unix_sock_ro_perms = "0700"',  # root only, read-only or not: it is a lab
        'unix_sock_rw_perms = "0700"',
        'auth_unix_ro = "none"',
        'auth_unix_rw = "none"',
        f'log_outputs = "3:file:{directory / "log" / "libvirtd.log"}"',
        "",
    ])


def start_libvirt(lab: Lab) -> LabLibvirt:
    """Start libvirtd in the lab's hv namespace and wait until it answers."""
    reason = libvirt_skip_reason()
    if reason:
        raise LabError(reason)
    directory = lab.workdir / "libvirt"
    for sub in ("sock", *PRIVILEGED_DIRS.values()):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    (directory / "libvirtd.conf").write_text(_libvirtd_conf(directory))
    (directory / "etc" / "qemu.conf").write_text(_QEMU_CONF)
    mounts = []
    for builtin, sub in PRIVILEGED_DIRS.items():
        Path(builtin).mkdir(parents=True, exist_ok=True)  # an empty mount point, if the host has none
        mounts.append((directory / sub, builtin))
    if not _has_user(QEMU_USER):
        for table, line in (("passwd", f"{QEMU_USER}:x:64055:64055:libvirt in the netskin lab:/var/lib/libvirt:/usr/sbin/nologin"),
                            ("group", f"{QEMU_USER}:x:64055:")):
            copy = directory / table
            copy.write_text(Path(f"/etc/{table}").read_text().rstrip("\n") + f"\n{line}\n")
            mounts.append((copy, Path(f"/etc/{table}")))
    script = " && ".join(f"mount --bind {_sh(str(src))} {_sh(str(dst))}" for src, dst in mounts)
    pid_file = directory / "libvirtd.pid"
    script += f" && exec {LIBVIRTD} -f {_sh(str(directory / 'libvirtd.conf'))} -p {_sh(str(pid_file))}"
    with open(directory / "log" / "stdout.log", "ab") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", lab.hv_ns, "sh", "-c", script], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, start_new_session=True)
    started = LabLibvirt(directory, proc.pid, lab.hv_ns)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise LabError(f"libvirtd exited with {proc.returncode} while starting; {_tail(directory)}")
        if started.socket.exists() and _answers(started.uri):
            log.info("lab libvirtd up in %s (pid %d)", lab.hv_ns, proc.pid)
            return started
        if time.monotonic() > deadline:
            proc.kill()
            raise LabError(f"libvirtd not answering after {START_TIMEOUT_S:.0f} s; {_tail(directory)}")
        time.sleep(0.05)


def stop_libvirt(libvirtd: LabLibvirt, *, kill_guests: bool = True) -> None:
    """Stop the lab's libvirtd (SIGTERM, then SIGKILL); with kill_guests, its QEMUs too."""
    guests = _qemu_pids(libvirtd.directory) if kill_guests else []
    for pid, wait_s in ((libvirtd.pid, STOP_TIMEOUT_S), *((g, 2.0) for g in guests)):
        _stop(pid, wait_s)


def restart_libvirt(lab: Lab, libvirtd: LabLibvirt) -> LabLibvirt:
    """libvirtd stopped and started again; the guests keep running, as on a real host."""
    stop_libvirt(libvirtd, kill_guests=False)
    return start_libvirt(lab)


# --- guest domains ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestDomain:
    """A lab guest as a libvirt domain: the guest image, booted directly, TCG or KVM."""

    name: str
    address: str  # the guest's eth0, with prefix: "10.77.201.2/24"
    gateway: str  # on the host side of the tap, set by libvirt
    tap: str  # the ethernet interface's host-side tap (a name we choose)
    mac: str
    console_path: Path
    serial_log: Path
    address6: str = "fd77:c9::2/64"
    gateway6: str = "fd77:c9::1"
    mtu: int = 1500
    bridge: str | None = None  # a second NIC on this bridge (its tap named by libvirt), if any
    bridge_mac: str = "02:77:00:00:c9:12"
    skin: str | None = None


def guest_domain_xml(guest: GuestDomain, kernel: Path, initrd: Path, accel: str) -> str:
    """The domain XML for a lab guest (pure): direct kernel boot, the guest's network on the
    kernel command line, a virtio console on a Unix socket, and an ethernet tap whose host side
    libvirt gives the guest's gateway."""
    from interceptor.libvirt_source import NETSKIN_XMLNS
    from manager import guests as lab_guests

    prefixlen = int(guest.address.partition("/")[2] or 24)
    net = lab_guests.GuestNet(guest.name, guest.address, guest.gateway, guest.address6, guest.gateway6, guest.mtu)
    a = quoteattr
    metadata = ""
    if guest.skin is not None:
        metadata = f"<metadata><netskin:skin xmlns:netskin={a(NETSKIN_XMLNS)} name={a(guest.skin)}/></metadata>"
    second = ""
    if guest.bridge is not None:
        second = f"""
    <interface type='bridge'>
      <mac address={a(guest.bridge_mac)}/>
      <source bridge={a(guest.bridge)}/>
      <model type='virtio'/>
    </interface>"""
    cpu = "<cpu mode='host-passthrough'/>" if accel == "kvm" else "<cpu mode='maximum'/>"
    return f"""<domain type={a('kvm' if accel == 'kvm' else 'qemu')}>
  <name>{guest.name}</name>
  {metadata}
  <memory unit='MiB'>{lab_guests.MEMORY_MB}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{lab_guests.kernel_cmdline(net)}</cmdline>
  </os>
  <features><acpi/></features>  <!-- i440fx hot-plugs PCI devices through ACPI -->
  {cpu}
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{shutil.which('qemu-system-x86_64') or '/usr/bin/qemu-system-x86_64'}</emulator>
    <interface type='ethernet'>
      <mac address={a(guest.mac)}/>
      <target dev={a(guest.tap)} managed='yes'/>
      <source>
        <ip address={a(guest.gateway)} prefix={a(str(prefixlen))}/>
        <ip address={a(guest.gateway6)} prefix={a(guest.address6.partition('/')[2] or '64')}/>
      </source>
      <model type='virtio'/>
      <mtu size={a(str(guest.mtu))}/>
    </interface>{second}
    <serial type='file'><source path={a(str(guest.serial_log))}/><target port='0'/></serial>
    <console type='unix'><source mode='bind' path={a(str(guest.console_path))}/><target type='virtio'/></console>
    <memballoon model='none'/>
  </devices>
</domain>"""


def define_guest(conn, guest: GuestDomain, *, say=log.info):
    """Define ``guest`` on the lab's libvirt (building the guest image at first use)."""
    from manager import guests as lab_guests

    try:
        image = lab_guests.build_image(say=say)
        accel = lab_guests.detect_accel(image)
    except lab_guests.GuestError as exc:
        raise LabError(f"guest image: {exc}") from None
    return conn.defineXML(guest_domain_xml(guest, image.kernel, image.initrd, accel))


def start_guest(dom, guest: GuestDomain) -> None:
    """Start the domain (``virsh start``); the guest boots in the background."""
    guest.console_path.unlink(missing_ok=True)
    dom.create()


def wait_guest_ready(guest: GuestDomain, timeout: float | None = None) -> float:
    """Seconds until the guest's console answers."""
    from manager import guests as lab_guests

    console = lab_guests.Console(guest.console_path)
    try:
        return console.wait_ready(timeout or lab_guests.BOOT_TIMEOUT_S, serial_log=guest.serial_log)
    except lab_guests.GuestError as exc:
        raise LabError(f"guest {guest.name}: {exc}") from None


def guest_console(guest: GuestDomain):
    """The guest's console: ``guest_console(g).run("ip -o addr")``."""
    from manager import guests as lab_guests

    return lab_guests.Console(guest.console_path)


def destroy_guest(dom) -> None:
    """Stop the domain at once (``virsh destroy``), if it runs."""
    if dom.isActive():
        dom.destroy()


# --- helpers ---------------------------------------------------------------------------------


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _sh(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _answers(uri: str) -> bool:
    import libvirt

    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    conn.close()
    return True


def _tail(directory: Path) -> str:
    parts = []
    for name in ("log/stdout.log", "log/libvirtd.log"):
        try:
            parts.append(f"{name} ends:\n" + (directory / name).read_text(errors="replace")[-1500:])
        except OSError:
            pass
    return "\n".join(parts) or f"no logs in {directory / 'log'}"


def _qemu_pids(directory: Path) -> list[int]:
    pids = []
    for pid_file in (directory / "run" / "qemu").glob("*.pid"):
        try:
            pids.append(int(pid_file.read_text().strip()))
        except (OSError, ValueError):
            pass
    return pids


def _stop(pid: int, wait_s: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not our child: watch /proc instead
                done = 0 if Path(f"/proc/{pid}").exists() and not _zombie(pid) else pid
            if done:
                return
            time.sleep(0.02)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return False
