"""The fleet's store: etcd v3 through its documented JSON gateway (``/v3/...``), from trio with httpx.

No grpcio: the wire format is etcd's own gRPC-gateway API. Its quirks are handled here and
nowhere else: int64 fields arrive as strings, keys and values are base64, defaults are omitted (a
PUT event has no ``type``, a failed txn no ``succeeded``). Every call raises ``StoreUnavailable``
when no endpoint answers; a watch raises ``Compacted`` when its start revision is gone and
``StoreUnavailable`` when its stream breaks or stays silent longer than its idle bound.
"""

from __future__ import annotations

import base64
import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterable

import httpx
import trio

CONNECT_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 5.0
WATCH_IDLE_TIMEOUT_S = 30.0
# gRPC status codes the gateway passes on (google.golang.org/grpc/codes).
_UNAUTHENTICATED = 16
_UNAVAILABLE = 14
_FAILED_PRECONDITION = 9
_PERMISSION_DENIED = 7


class StoreError(Exception):
    """etcd refused a request (``code``: its gRPC status code)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class StoreUnavailable(StoreError):
    """No endpoint answered, or a watch stream broke or fell silent: nothing is known."""


class Compacted(StoreError):
    """A watch's start revision was compacted away; resync from a fresh range."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"etcd compacted its history up to revision {revision}: the watch must resync")
        self.revision = revision


# --- wire format: pure functions ---------------------------------------------------------------


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: str | bytes) -> bytes:
    """The range_end that makes a range cover every key starting with ``prefix``."""
    key = bytearray(prefix.encode() if isinstance(prefix, str) else prefix)
    while key:
        if key[-1] < 0xFF:
            key[-1] += 1
            return bytes(key)
        key.pop()
    return b"\0"  # every key


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0

    def json(self) -> Any:
        return json.loads(self.value)

    @classmethod
    def from_wire(cls, kv: dict) -> KeyValue:
        return cls(
            key=unb64(kv.get("key")).decode(),
            value=unb64(kv.get("value")),
            create_revision=int(kv.get("create_revision", 0)),
            mod_revision=int(kv.get("mod_revision", 0)),
            version=int(kv.get("version", 0)),
            lease=int(kv.get("lease", 0)),
        )


@dataclass(frozen=True)
class Event:
    type: str  # "PUT" or "DELETE"
    kv: KeyValue  # for a DELETE: the key and the revision of the delete, no value


@dataclass(frozen=True)
class WatchBatch:
    """One watch response: its events (none for a progress notification) at ``revision``."""

    revision: int
    events: tuple[Event, ...] = ()


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: list[dict] = field(default_factory=list)

    def ranges(self) -> list[list[KeyValue]]:
        """The key-values of each range op in the branch that ran, in order."""
        return [[KeyValue.from_wire(kv) for kv in r["response_range"].get("kvs", [])]
                for r in self.responses if "response_range" in r]


@dataclass(frozen=True)
class Lease:
    id: int
    ttl_s: int


def encode_value(value: str | bytes | dict | list) -> bytes:
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
    return value.encode() if isinstance(value, str) else value


_TARGETS = {"mod": ("MOD", "mod_revision"), "create": ("CREATE", "create_revision"),
            "version": ("VERSION", "version"), "value": ("VALUE", "value")}
_RESULTS = {"==": "EQUAL", "!=": "NOT_EQUAL", ">": "GREATER", "<": "LESS"}


def compare(key: str, target: str, op: str, value: int | str | bytes) -> dict:
    """A txn comparison: ``compare(k, "mod", "==", 42)``; mod/create revision 0 = key absent."""
    wire_target, wire_field = _TARGETS[target]
    wire_value = b64(encode_value(value)) if target == "value" else str(int(value))
    return {"key": b64(key), "target": wire_target, "result": _RESULTS[op], wire_field: wire_value}


def put_op(key: str, value: str | bytes | dict | list, lease: int = 0) -> dict:
    request: dict[str, Any] = {"key": b64(key), "value": b64(encode_value(value))}
    if lease:
        request["lease"] = str(lease)
    return {"request_put": request}


def delete_op(key: str, prefix: bool = False) -> dict:
    request = {"key": b64(key)}
    if prefix:
        request["range_end"] = b64(prefix_end(key))
    return {"request_delete_range": request}


def range_op(key: str, prefix: bool = False) -> dict:
    request = {"key": b64(key)}
    if prefix:
        request["range_end"] = b64(prefix_end(key))
    return {"request_range": request}


def watch_request(key: str, start_revision: int, prefix: bool = True, progress_notify: bool = True) -> dict:
    request: dict[str, Any] = {"key": b64(key), "start_revision": str(start_revision),
                               "progress_notify": progress_notify}
    if prefix:
        request["range_end"] = b64(prefix_end(key))
    return {"create_request": request}


def parse_watch_line(line: str) -> WatchBatch | None:
    """One line of a watch stream: a batch, None for the 'created' line; raises on cancel/error."""
    message = json.loads(line)
    if "error" in message:
        error = message["error"]
        raise StoreError(f"etcd ended the watch: {error.get('message', error)}", error.get("code"))
    result = message.get("result", {})
    if int(result.get("compact_revision", 0)):
        raise Compacted(int(result["compact_revision"]))
    if result.get("canceled"):
        reason = result.get("cancel_reason") or "no reason given"
        if "PermissionDenied" in reason or "permission denied" in reason:  # not transient: no failover
            raise StoreError(f"etcd refused the watch: permission denied ({reason})", _PERMISSION_DENIED)
        if "Unauthenticated" in reason:  # the token expired
            raise StoreError(f"etcd refused the watch: {reason}", _UNAUTHENTICATED)
        raise StoreUnavailable(f"etcd canceled the watch: {reason}")
    events = tuple(Event(ev.get("type", "PUT"), KeyValue.from_wire(ev.get("kv", {})))
                   for ev in result.get("events", []))
    if result.get("created") and not events:
        return None
    return WatchBatch(int(result.get("header", {}).get("revision", 0)), events)


def _error_of(response: httpx.Response) -> StoreError:
    try:
        body = response.json()
    except ValueError:
        if "CommonName" in response.text:
            return StoreError("etcd refuses a client certificate with a Common Name on its JSON gateway when auth is "
                              "on: use a certificate without CN, and user/password_file for the etcd user")
        return StoreError(f"etcd answered HTTP {response.status_code}: {response.text[:200]}")
    message = body.get("message") or body.get("error") or response.text[:200]
    code = body.get("code")
    kind = StoreUnavailable if code == _UNAVAILABLE else StoreError
    return kind(f"etcd refused the request: {message}", code)


# --- the client ----------------------------------------------------------------------------------


class Store:
    """An etcd client over a list of endpoints: a failed endpoint hands the call to the next.

    Use as ``async with Store([...]) as store``. TLS when ``ca_file`` is given (with a client
    certificate when ``cert_file``/``key_file`` are); etcd authentication with ``user``/``password``.
    """

    def __init__(self, endpoints: Iterable[str], *, ca_file: Path | None = None, cert_file: Path | None = None,
                 key_file: Path | None = None, user: str | None = None, password: str | None = None,
                 timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.endpoints = [e.rstrip("/") for e in endpoints]
        if not self.endpoints:
            raise ValueError("a store needs at least one endpoint")
        self._current = 0
        self.user, self._password = user, password
        self._token: str | None = None
        self.timeout_s = timeout_s
        verify: ssl.SSLContext | bool = True
        if ca_file is not None or cert_file is not None:
            verify = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            if cert_file is not None:
                verify.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        self._client = httpx.AsyncClient(verify=verify, timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S))

    @classmethod
    def from_config(cls, config: Any) -> Store:
        """From a host configuration's ``[store]`` table (``interceptor.schema.StoreConfig``)."""
        password = None
        if config.password_file is not None:
            password = Path(config.password_file).read_text().strip()
        return cls(config.endpoints, ca_file=config.ca_file, cert_file=config.cert_file,
                   key_file=config.key_file, user=config.user, password=password)

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._client.aclose()

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._current]

    # -- requests ---------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._token} if self._token else {}

    async def _authenticate(self, endpoint: str) -> None:
        response = await self._client.post(f"{endpoint}/v3/auth/authenticate",
                                           json={"name": self.user, "password": self._password})
        if response.status_code != 200:
            raise _error_of(response)
        self._token = response.json()["token"]

    async def _post(self, path: str, body: dict) -> dict:
        """POST to the current endpoint, failing over through the others on connection errors."""
        failures = []
        for step in range(len(self.endpoints)):
            index = (self._current + step) % len(self.endpoints)
            endpoint = self.endpoints[index]
            try:
                if self.user and self._token is None:
                    await self._authenticate(endpoint)
                response = await self._client.post(f"{endpoint}{path}", json=body, headers=self._headers())
                if response.status_code != 200 and self.user and _token_stale(response):
                    await self._authenticate(endpoint)  # the token expired: one fresh try
                    response = await self._client.post(f"{endpoint}{path}", json=body, headers=self._headers())
            except httpx.TransportError as exc:
                failures.append(f"{endpoint}: {exc!r}")
                continue
            if response.status_code != 200:
                error = _error_of(response)
                if isinstance(error, StoreUnavailable):
                    failures.append(f"{endpoint}: {error}")
                    continue
                if error.code == _PERMISSION_DENIED:
                    who = f"etcd user {self.user!r}" if self.user else "a client without an etcd user"
                    raise StoreError(f"etcd refused {_what(path, body)}: permission denied to {who} "
                                     f"(its etcd role does not allow it)", error.code)
                raise error
            self._current = index
            return response.json()
        raise StoreUnavailable(f"no etcd endpoint answered {path}: {'; '.join(failures)}")

    async def get(self, key: str) -> KeyValue | None:
        reply = await self._post("/v3/kv/range", {"key": b64(key)})
        kvs = reply.get("kvs", [])
        return KeyValue.from_wire(kvs[0]) if kvs else None

    async def get_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """Every key under ``prefix`` and the store revision they were read at."""
        reply = await self._post("/v3/kv/range", {"key": b64(prefix), "range_end": b64(prefix_end(prefix))})
        return int(reply["header"]["revision"]), [KeyValue.from_wire(kv) for kv in reply.get("kvs", [])]

    async def revision(self, key: str = "\0") -> int:
        """The store's current revision, read through ``key``: with etcd auth on, a key the user may read."""
        reply = await self._post("/v3/kv/range", {"key": b64(key), "limit": "1", "count_only": True})
        return int(reply["header"]["revision"])

    async def put(self, key: str, value: str | bytes | dict | list, lease: int = 0) -> int:
        """Write one key (attached to ``lease`` when given); return the store revision."""
        reply = await self._post("/v3/kv/put", put_op(key, value, lease)["request_put"])
        return int(reply["header"]["revision"])

    async def delete(self, key: str, prefix: bool = False) -> tuple[int, int]:
        """Delete a key (or every key under a prefix); return (revision, how many were deleted)."""
        reply = await self._post("/v3/kv/deleterange", delete_op(key, prefix)["request_delete_range"])
        return int(reply["header"]["revision"]), int(reply.get("deleted", 0))

    async def txn(self, compares: Iterable[dict], success: Iterable[dict] = (),
                  failure: Iterable[dict] = ()) -> TxnResult:
        """All ``compares`` hold → the ``success`` ops, else the ``failure`` ops, atomically."""
        reply = await self._post("/v3/kv/txn", {"compare": list(compares), "success": list(success),
                                                "failure": list(failure)})
        return TxnResult(bool(reply.get("succeeded", False)), int(reply["header"]["revision"]),
                         reply.get("responses", []))

    async def compact(self, revision: int) -> None:
        await self._post("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    # -- leases -----------------------------------------------------------------------------

    async def grant(self, ttl_s: int) -> Lease:
        reply = await self._post("/v3/lease/grant", {"TTL": str(ttl_s)})
        if reply.get("error"):
            raise StoreError(f"etcd granted no lease: {reply['error']}")
        return Lease(int(reply["ID"]), int(reply["TTL"]))

    async def keepalive_once(self, lease_id: int) -> int:
        """Refresh a lease; return its TTL now (0: it had already expired)."""
        reply = await self._post("/v3/lease/keepalive", {"ID": str(lease_id)})
        return int(reply.get("result", reply).get("TTL", 0))

    async def keep_alive(self, lease: Lease, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Refresh ``lease`` every third of its TTL until cancelled; return when it has expired."""
        task_status.started()
        while True:
            await trio.sleep(max(lease.ttl_s / 3, 0.2))
            if await self.keepalive_once(lease.id) <= 0:
                return

    async def revoke(self, lease_id: int) -> None:
        await self._post("/v3/lease/revoke", {"ID": str(lease_id)})

    # -- authentication admin (root's, once auth is on) -----------------------------------------

    async def add_user(self, name: str, password: str) -> bool:
        """Create an etcd user; False if it exists already (its password is left alone)."""
        return await self._add("/v3/auth/user/add", {"name": name, "password": password})

    async def add_role(self, name: str) -> bool:
        """Create an etcd role; False if it exists already."""
        return await self._add("/v3/auth/role/add", {"name": name})

    async def grant_permission(self, role: str, perm_type: str, key: str, range_end: bytes = b"") -> None:
        """Let ``role`` READ, WRITE or READWRITE ``key`` (or [key, range_end) when range_end is given)."""
        perm = {"permType": perm_type, "key": b64(key)}
        if range_end:
            perm["range_end"] = b64(range_end)
        await self._post("/v3/auth/role/grant", {"name": role, "perm": perm})

    async def grant_role(self, user: str, role: str) -> None:
        await self._post("/v3/auth/user/grant", {"user": user, "role": role})

    async def enable_auth(self) -> None:
        await self._post("/v3/auth/enable", {})

    async def _add(self, path: str, body: dict) -> bool:
        try:
            await self._post(path, body)
        except StoreError as exc:
            if exc.code == _FAILED_PRECONDITION and "already exists" in str(exc):
                return False
            raise
        return True

    # -- watch --------------------------------------------------------------------------------

    async def watch(self, key: str, start_revision: int, *, prefix: bool = True, progress_notify: bool = True,
                    idle_timeout_s: float = WATCH_IDLE_TIMEOUT_S) -> AsyncIterator[WatchBatch]:
        """The changes to ``key`` (or everything under it) from ``start_revision`` on, batch by batch.

        Never ends on its own: ``Compacted`` when the start revision is gone, ``StoreUnavailable``
        when the stream breaks or brings nothing (no event, no progress notification) for
        ``idle_timeout_s``: the caller must make traffic at least that often (a heartbeat key)
        unless etcd's progress notifications come more often.
        """
        body = watch_request(key, start_revision, prefix, progress_notify)
        timeout = httpx.Timeout(self.timeout_s, connect=CONNECT_TIMEOUT_S, read=idle_timeout_s)
        failures = []
        order = [(self._current + step) % len(self.endpoints) for step in range(len(self.endpoints))]
        reauthenticated = False
        while order:
            index = order.pop(0)
            endpoint = self.endpoints[index]
            opened = stale_token = False
            try:
                if self.user and self._token is None:
                    await self._authenticate(endpoint)
                async with self._client.stream("POST", f"{endpoint}/v3/watch", json=body,
                                               headers=self._headers(), timeout=timeout) as response:
                    if response.status_code != 200:
                        await response.aread()
                        error = _error_of(response)
                        if isinstance(error, StoreUnavailable):
                            failures.append(f"{endpoint}: {error}")
                            continue
                        raise error
                    opened = True
                    self._current = index
                    async for line in response.aiter_lines():
                        if not line.strip():
                            continue
                        try:
                            batch = parse_watch_line(line)
                        except StoreError as exc:
                            # etcd checks the token when it creates the watch: nothing was missed.
                            if exc.code == _UNAUTHENTICATED and self.user and not reauthenticated:
                                stale_token = True
                                break
                            if exc.code != _PERMISSION_DENIED:
                                raise
                            who = f"etcd user {self.user!r}" if self.user else "a client without an etcd user"
                            raise StoreError(f"etcd refused watching {key}{'*' if prefix else ''}: permission "
                                             f"denied to {who} (its etcd role does not allow it)", exc.code) from None
                        if batch is not None:
                            yield batch
                    if not stale_token:
                        raise StoreUnavailable(f"etcd at {endpoint} ended the watch stream")
            except httpx.ReadTimeout:
                if not opened:
                    failures.append(f"{endpoint}: no answer within {self.timeout_s:g} s")
                    continue
                raise StoreUnavailable(f"the watch on {endpoint} brought nothing for {idle_timeout_s:g} s") from None
            except httpx.TransportError as exc:
                if opened:  # the caller resyncs; it must not miss what happened meanwhile
                    raise StoreUnavailable(f"the watch on {endpoint} broke: {exc!r}") from None
                failures.append(f"{endpoint}: {exc!r}")
            if stale_token:  # the token expired: authenticate again and open the same watch once more
                reauthenticated, self._token = True, None
                order.insert(0, index)
        raise StoreUnavailable(f"no etcd endpoint answered /v3/watch: {'; '.join(failures)}")


def _token_stale(response: httpx.Response) -> bool:
    """The token expired, or etcd's users/roles changed since it was issued: authenticate again."""
    try:
        body = response.json()
    except ValueError:
        return False
    return body.get("code") == _UNAUTHENTICATED or "auth store is old" in str(body.get("message", ""))


def _what(path: str, body: dict) -> str:
    """The request in words, for an error message: ``writing /netskin/hosts/hv2/status/vm1``."""
    def keys(request: dict) -> str:
        key = unb64(request.get("key")).decode(errors="replace")
        key = key if key.isprintable() else repr(key)
        return f"{key}*" if request.get("range_end") else key

    verbs = {"/v3/kv/put": "writing", "/v3/kv/range": "reading", "/v3/kv/deleterange": "deleting"}
    if path in verbs:
        return f"{verbs[path]} {keys(body)}"
    if path == "/v3/kv/txn":
        touched = [keys(next(iter(op.values()))) for op in [*body.get("success", []), *body.get("failure", [])]]
        return f"a transaction on {', '.join(dict.fromkeys(touched)) or 'no keys'}"
    return path
