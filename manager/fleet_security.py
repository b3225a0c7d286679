"""The fleet's security: who may touch which keys in etcd, and a lab PKI to run etcd on TLS.

Two jobs. ``auth_plan`` (pure) turns the fleet's host names into etcd users, roles and key-range
permissions that follow ``manager.fleet``'s layout; ``secure_etcd`` writes that plan into etcd
through its JSON gateway and turns authentication on. ``make_lab_pki`` writes a throw-away CA,
etcd's server certificate and one client certificate and password per user, for labs and tests.
Production fleets bring their own CA; the plan is the same.

Measured on etcd 3.4.23 (the gateway is what ``manager.store`` speaks):
- etcd's gRPC API takes the user from the client certificate's CN (etcdctl with a CN=hv1
  certificate and no password acts as hv1). Its JSON gateway does not: it calls the gRPC server
  itself, over a connection that presents etcd's own server certificate, whose CN etcd then
  ignores ("ignoring common name in gRPC-gateway proxy request" in its log). With
  ``--client-cert-auth`` and auth on, the gateway answers every request whose client
  certificate has a CN with HTTP 400 ("CommonName of client sending a request against gateway
  will be ignored and not used as expected"). So fleet client certificates carry no CN: the
  certificate admits the connection (only holders of a certificate from the fleet's CA reach
  etcd at all), and the user comes from user/password (``password_file``); without a password,
  the gateway answers "user name is empty".
- Leases need no permission to grant or keep alive; a put on a lease needs write permission on
  the key, and a revoke succeeds for a host that may write every key on the lease (etcd checks
  write permission on each attached key).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from manager import fleet
from manager.store import Store, prefix_end

ROOT_USER = "root"  # etcd refuses to enable auth without it; it holds etcd's built-in root role
MANAGER_USER = "manager"
RESERVED_USERS = (ROOT_USER, MANAGER_USER)

PermType = Literal["READ", "WRITE", "READWRITE"]


# --- the plan: host names → users, roles, permissions (pure) ---------------------------------------


@dataclass(frozen=True)
class Permission:
    type: PermType
    key: str
    prefix: bool  # True: every key starting with ``key``; False: that one key

    @property
    def range_end(self) -> bytes:
        """etcd's range_end for the permission: empty for one key."""
        return prefix_end(self.key) if self.prefix else b""


@dataclass(frozen=True)
class Role:
    name: str
    permissions: tuple[Permission, ...]


def host_role(host: str) -> Role:
    """What the agent of ``host`` needs, and nothing more.

    It ranges and watches its whole host prefix (so READ on all of it, its own status included)
    and reads the library; it writes only its status, its leased alive key, conditions and its VM
    inventory. Its
    desired keys are the manager's: the agent cannot change what it is asked to do.
    """
    prefix = fleet.host_prefix(host)
    return Role(host, (
        Permission("READ", fleet.skins_prefix(), prefix=True),
        Permission("READ", prefix, prefix=True),
        Permission("READWRITE", f"{prefix}status/", prefix=True),
        Permission("READWRITE", f"{prefix}conditions/", prefix=True),
        Permission("READWRITE", fleet.alive_key(host), prefix=False),
        Permission("READWRITE", fleet.inventory_key(host), prefix=False),
    ))


def manager_role() -> Role:
    """The manager (CLI, API) reads and writes the whole fleet tree."""
    return Role(MANAGER_USER, (Permission("READWRITE", f"{fleet.ROOT}/", prefix=True),))


def auth_plan(hosts: Iterable[str]) -> tuple[Role, ...]:
    """The manager's role, then one role per host, named as its user (the host's fleet name)."""
    names = sorted(set(hosts))
    for host in names:
        fleet.host_prefix(host)  # LayoutError for a name that cannot be a key segment
        if host in RESERVED_USERS:
            raise ValueError(f"host name {host!r} is taken by etcd's {host!r} user; rename the host in the fleet")
    return (manager_role(), *(host_role(host) for host in names))


# --- writing the plan into etcd ---------------------------------------------------------------------


async def secure_etcd(admin: Store, hosts: Iterable[str], passwords: Mapping[str, str]) -> None:
    """Create the root and manager users and one user and role per host, then enable auth.

    ``passwords``: user → password for ``root``, ``manager`` and every host. ``admin`` is a
    store without credentials while etcd's auth is off, or with root's once it is on: running
    this again (to add a host) adds what is missing and re-grants every role's permissions. A
    user that exists keeps its password; a host left out is not removed (etcdctl user/role delete).
    """
    roles = auth_plan(hosts)
    users = [ROOT_USER] + [role.name for role in roles]
    missing = [user for user in users if not passwords.get(user)]
    if missing:
        raise ValueError(f"no password given for etcd user(s) {', '.join(missing)}")
    for user in users:
        await admin.add_user(user, passwords[user])
    await admin.grant_role(ROOT_USER, "root")
    for role in roles:
        await admin.add_role(role.name)
        for perm in role.permissions:
            await admin.grant_permission(role.name, perm.type, perm.key, perm.range_end)
        await admin.grant_role(role.name, role.name)
    await admin.enable_auth()


# --- a lab PKI -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """One etcd user's files: a client certificate (OU = the user, no CN), its key and a password file."""

    user: str
    cert_file: Path
    key_file: Path
    password_file: Path

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()


@dataclass(frozen=True)
class LabPki:
    ca_file: Path
    ca_key_file: Path
    server_cert_file: Path
    server_key_file: Path
    users: dict[str, Credentials]

    def passwords(self) -> dict[str, str]:
        return {user: cred.password for user, cred in self.users.items()}


def make_lab_pki(directory: Path, hosts: Iterable[str], *, server_addresses: Iterable[str] = ("127.0.0.1",),
                 server_names: Iterable[str] = ("localhost",), days: int = 30) -> LabPki:
    """Write a CA, etcd's server certificate and credentials for root, manager and each host.

    ``server_addresses``/``server_names``: the IPs and DNS names clients reach etcd by (the
    certificate's subjectAltName). Files: ``ca.pem``, ``server.pem``, ``<user>.pem`` with
    ``*-key.pem`` beside each, and ``<user>.password``; keys and passwords are mode 0600.
    The server certificate also allows client use: etcd 3.4's gateway presents it to etcd itself.
    """
    hosts = [role.name for role in auth_plan(hosts)[1:]]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def write_private(path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)

    def new_key(path: Path) -> ec.EllipticCurvePrivateKey:
        key = ec.generate_private_key(ec.SECP256R1())
        write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        return key

    def name(common_name: str | None, unit: str | None = None) -> x509.Name:
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "netskin lab")]
        if unit:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
        if common_name:
            attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        return x509.Name(attributes)

    def builder(subject: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))

    ca_key = new_key(directory / "ca-key.pem")
    ca_name = name("netskin lab CA")
    ca_cert = (builder(ca_name, ca_key).issuer_name(ca_name)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())

    def issue(stem: str, subject: x509.Name, usages: list, alt_names: list | None = None) -> tuple[Path, Path]:
        key_file = directory / f"{stem}-key.pem"
        key = new_key(key_file)
        cert = (builder(subject, key).issuer_name(ca_name)
                .add_extension(authority, critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                             crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        if alt_names:
            cert = cert.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        cert_file = directory / f"{stem}.pem"
        cert_file.write_bytes(cert.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        return cert_file, key_file

    alt_names = ([x509.IPAddress(ipaddress.ip_address(a)) for a in server_addresses]
                 + [x509.DNSName(n) for n in server_names])
    # CN "etcd server", which no user can be called (users are host names, root, manager).
    server_cert, server_key = issue("server", name("etcd server"),
                                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], alt_names)
    users = {}
    for user in [ROOT_USER, MANAGER_USER, *hosts]:
        # No CN: with auth on, etcd's gateway refuses a client certificate that has one.
        cert_file, key_file = issue(user, name(None, unit=user), [ExtendedKeyUsageOID.CLIENT_AUTH])
        password_file = directory / f"{user}.password"
        write_private(password_file, (secrets.token_urlsafe(24) + "\n").encode())
        users[user] = Credentials(user, cert_file, key_file, password_file)
    return LabPki(directory / "ca.pem", directory / "ca-key.pem", server_cert, server_key, users)


def store_for(endpoints: Iterable[str], pki: LabPki, user: str | None) -> Store:
    """A store speaking TLS with ``user``'s certificate and password (``None``: root's certificate,
    no password: what ``secure_etcd`` needs before auth is on)."""
    cred = pki.users[user or ROOT_USER]
    return Store(endpoints, ca_file=pki.ca_file, cert_file=cred.cert_file, key_file=cred.key_file,
                 user=user, password=cred.password if user else None)

