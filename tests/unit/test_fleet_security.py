"""manager.fleet_security: the users/roles plan from host names, the lab PKI, and the order of
secure_etcd's calls; manager.store's wording of etcd's refusals."""

from __future__ import annotations

import json
import stat

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from manager import fleet, store
from manager.fleet_security import (Permission, auth_plan, host_role, make_lab_pki, manager_role,
                                    secure_etcd)


def allowed(role, key: str, access: str) -> bool:
    """Whether ``role`` lets ``access`` ("READ"/"WRITE") reach ``key``, as etcd decides for one key."""
    for perm in role.permissions:
        if access not in perm.type:
            continue
        if perm.prefix and perm.key.encode() <= key.encode() < perm.range_end:
            return True
        if not perm.prefix and key == perm.key:
            return True
    return False


def host_keys(host: str) -> dict[str, str]:
    return {"desired": fleet.desired_key(host, "vm1"), "status": fleet.status_key(host, "vm1"),
            "conditions": fleet.conditions_key(host, "vm1"), "alive": fleet.alive_key(host),
            "inventory": fleet.inventory_key(host)}


def test_a_host_reads_its_host_and_the_library_and_writes_only_its_reports():
    role = host_role("hv1")
    own = host_keys("hv1")
    assert all(allowed(role, key, "READ") for key in own.values())
    assert allowed(role, fleet.skin_key("3g"), "READ") and not allowed(role, fleet.skin_key("3g"), "WRITE")
    assert {kind for kind, key in own.items() if allowed(role, key, "WRITE")} == {"status", "conditions", "alive", "inventory"}
    # Hosts whose names extend hv1's, or sort next to it, are out of reach either way.
    for other in ("hv2", "hv10", "hv1-b", "hv1.b", "hv"):
        for key in host_keys(other).values():
            assert not allowed(role, key, "READ") and not allowed(role, key, "WRITE"), key
    assert not allowed(role, "/netskin/hosts/hv1/alive-not", "WRITE")


def test_prefix_permissions_end_where_prefix_end_says():
    perm = Permission("READ", "/netskin/hosts/hv1/", prefix=True)
    assert perm.range_end == b"/netskin/hosts/hv10" == store.prefix_end("/netskin/hosts/hv1/")
    assert Permission("READWRITE", "/netskin/hosts/hv1/alive", prefix=False).range_end == b""


def test_the_plan_is_the_manager_then_each_host_once():
    roles = auth_plan(["hv2", "hv1", "hv2"])
    assert [role.name for role in roles] == ["manager", "hv1", "hv2"]
    assert roles[0] == manager_role()
    assert allowed(roles[0], fleet.desired_key("hv9", "vm1"), "WRITE")
    assert allowed(roles[0], fleet.skin_key("any"), "WRITE")
    assert not allowed(roles[0], "/other/key", "READ")


@pytest.mark.parametrize("host", ["root", "manager"])
def test_a_host_cannot_take_an_etcd_users_name(host):
    with pytest.raises(ValueError, match=f"host name '{host}' is taken"):
        auth_plan([host])


def test_a_host_name_that_is_no_key_segment_is_refused():
    with pytest.raises(fleet.LayoutError):
        auth_plan(["hv1/../hv2"])


class RecordingAdmin:
    """Stands in for the root's Store: records the auth calls secure_etcd makes."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        async def call(*args):
            self.calls.append((name, *args))
            return True
        return call


def test_secure_etcd_creates_users_grants_roles_then_enables_auth():
    admin = RecordingAdmin()
    passwords = {"root": "r", "manager": "m", "hv1": "h"}
    trio.run(secure_etcd, admin, ["hv1"], passwords)
    names = [call[0] for call in admin.calls]
    assert names[-1] == "enable_auth" and names.count("enable_auth") == 1
    assert [c[1:] for c in admin.calls if c[0] == "add_user"] == [("root", "r"), ("manager", "m"), ("hv1", "h")]
    assert ("grant_role", "root", "root") in admin.calls and ("grant_role", "hv1", "hv1") in admin.calls
    granted = [c[2:] for c in admin.calls if c[0] == "grant_permission" and c[1] == "hv1"]
    assert granted == [(p.type, p.key, p.range_end) for p in host_role("hv1").permissions]


def test_secure_etcd_wants_every_password_before_touching_etcd():
    admin = RecordingAdmin()
    with pytest.raises(ValueError, match="hv2"):
        trio.run(secure_etcd, admin, ["hv1", "hv2"], {"root": "r", "manager": "m", "hv1": "h"})
    assert admin.calls == []


def test_lab_pki_issues_cn_less_client_certificates_from_its_ca(tmp_path):
    pki = make_lab_pki(tmp_path / "pki", ["hv1", "hv2"], server_addresses=["127.0.0.1", "10.99.0.1"])
    ca = x509.load_pem_x509_certificate(pki.ca_file.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = x509.load_pem_x509_certificate(pki.server_cert_file.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.99.0.1"]
    usages = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert set(pki.users) == {"root", "manager", "hv1", "hv2"}
    for user, cred in pki.users.items():
        cert = x509.load_pem_x509_certificate(cred.cert_file.read_bytes())
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == user
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
            ExtendedKeyUsageOID.CLIENT_AUTH]
        for secret in (cred.key_file, cred.password_file):
            assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert len(set(pki.passwords().values())) == 4 and all(len(p) >= 24 for p in pki.passwords().values())
    assert stat.S_IMODE(pki.ca_key_file.stat().st_mode) == 0o600


# --- the Store's wording of refusals -------------------------------------------------------------


def test_a_refused_watch_is_a_refusal_not_an_outage():
    line = json.dumps({"result": {"canceled": True, "cancel_reason":
                                  "rpc error: code = PermissionDenied desc = etcdserver: permission denied"}})
    with pytest.raises(store.StoreError) as raised:
        store.parse_watch_line(line)
    assert not isinstance(raised.value, store.StoreUnavailable) and raised.value.code == 7


def test_a_watch_refused_for_an_expired_token_says_so():
    line = json.dumps({"result": {"canceled": True, "cancel_reason":
                                  "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token"}})
    with pytest.raises(store.StoreError) as raised:
        store.parse_watch_line(line)
    assert raised.value.code == 16


def test_refusals_name_the_keys():
    put = store.put_op(fleet.status_key("hv2", "vm1"), "x")["request_put"]
    assert store._what("/v3/kv/put", put) == "writing /netskin/hosts/hv2/status/vm1"
    assert store._what("/v3/kv/range", store.range_op("/netskin/hosts/hv2/", prefix=True)["request_range"]) == \
        "reading /netskin/hosts/hv2/*"
    txn = {"compare": [], "success": [store.put_op("/a", "1"), store.delete_op("/b")], "failure": [store.range_op("/a")]}
    assert store._what("/v3/kv/txn", txn) == "a transaction on /a, /b"


def test_a_client_certificate_with_a_cn_gets_a_hint():
    response = httpx.Response(400, text="CommonName of client sending a request against gateway will be ignored "
                                        "and not used as expected\n")
    assert "certificate without CN" in str(store._error_of(response))
