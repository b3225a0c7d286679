"""The REST API of `netskin serve`: the CLI's operations over HTTP, as JSON.

A Starlette app on Hypercorn's trio worker. Every endpoint calls the same functions the CLI
calls (``manager.library`` for skins, ``manager.assign`` for VMs), in a worker thread because
they block (the control socket, verification polls). Errors are ``{"error": "<one line>"}`` with
the CLI's message; the status code says which kind: 400 invalid document, 404 unknown skin, VM
or persona, 409 conflict, 422 not (wholly) in force, 500 the daemon failed internally, 503 the
daemon is unreachable, 504 the daemon did not finish within the bound (``vm``: its status).

Personas are the first seed format's name for skins: the same files and the same library, read
and written with ``id`` for the name and the persona field names.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import signal
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from interceptor import control
from interceptor.assignments import AssignmentStore
from interceptor.library import Entry
from interceptor.schema import _NAME_RE, HostConfig, Skin, SkinError, UserError, validate_skin
from manager import assign, metrics
from manager.api_common import (PERSONA_FIELDS, ApiError, from_persona, new_persona_id, persona_data,
                                read_document, route, seed_routes, user_error)
from manager.library import LibraryError, SkinLibrary, effective_links, entry_data, in_use_message, worn_by

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8640
TOKEN_ENV = "NETSKIN_API_TOKEN"
MAX_BODY_BYTES = 1 << 20  # a skin is a few hundred bytes; this only stops abuse

# A request body stands in for the FILE of `netskin skins create FILE`; messages that name the
# temporary file it was written to name it like the CLI's usage line instead.
BODY_AS_FILE = "FILE"


# --- listening: loopback, or a token ----------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name could resolve anywhere


def load_token(token_file: Path | None) -> str | None:
    """The bearer token: from ``token_file``, else $NETSKIN_API_TOKEN, else None."""
    if token_file is None:
        return os.environ.get(TOKEN_ENV, "").strip() or None
    try:
        token = token_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise UserError(f"{token_file}: no such file; give --token-file the path of a file holding the token") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{token_file}: cannot read the token: {getattr(exc, 'strerror', None) or exc}") from None
    if not token:
        raise UserError(f"{token_file}: the token file is empty; put a long random token in it")
    return token


def check_listen(host: str, token: str | None) -> None:
    """Refuse to expose the API beyond this host without a token."""
    if token is None and not is_loopback(host):
        raise UserError(
            f"refusing to listen on {host} without a token: anyone who can reach it could change "
            f"the VMs' skins; give --token-file FILE or set ${TOKEN_ENV}, or listen on {DEFAULT_HOST}"
        )


class BearerToken:
    """ASGI middleware: every request must carry ``Authorization: Bearer <token>``."""

    def __init__(self, app: Callable, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and not self._authorized(scope):
            response = JSONResponse(
                {"error": "missing or wrong bearer token; send 'Authorization: Bearer <token>'"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="netskin"'},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: dict) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)
        return False


# --- the app ---------------------------------------------------------------------------------


class Api:
    """The endpoints, over one host configuration."""

    def __init__(self, config: HostConfig, verify_timeout: float = assign.VERIFY_TIMEOUT_S,
                 timeout: float = assign.SWAP_TIMEOUT_S) -> None:
        self.config = config
        self.library = SkinLibrary(config.skins_dir)
        self.store = AssignmentStore(Path(config.state_dir))
        self.verify_timeout = verify_timeout
        self.timeout = timeout

    # -- skins ----------------------------------------------------------------------------------

    async def list_skins(self, request: Request) -> Response:
        entries = await run_in_threadpool(self.library.entries)
        return JSONResponse([entry_data(entry) for entry in entries])

    async def create_skin(self, request: Request) -> Response:
        document = await read_document(request)
        entry = await run_in_threadpool(self._create, document)
        return JSONResponse(entry_data(entry), status_code=201)

    async def show_skin(self, request: Request) -> Response:
        entry = await run_in_threadpool(self._valid_entry, request.path_params["name"])
        return JSONResponse(entry_data(entry) | {"effective": effective_links(entry)})

    async def update_skin(self, request: Request) -> Response:
        document = await read_document(request)
        entry = await run_in_threadpool(self._update, request.path_params["name"], document)
        return JSONResponse(entry_data(entry))

    async def delete_skin(self, request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(self._delete, request.path_params["name"]))

    def _create(self, document: dict) -> Entry:
        try:
            skin = validate_skin(document)  # the body has no file stem to name it
        except SkinError as error:
            raise user_error(400, error) from None
        with _as_file(document, skin.name) as source:
            try:
                return self.library.create(source)
            except LibraryError as error:
                taken = any(entry.name == skin.name for entry in self.library.entries())
                raise user_error(409 if taken else 500, _renamed(error, source)) from None

    def _update(self, name: str, document: dict) -> Entry:
        self._entry(name)  # 404 before 400: the URL names a skin that must exist
        try:
            skin = validate_skin(document, default_name=name)
        except SkinError as error:
            raise user_error(400, error) from None
        with _as_file(document, name) as source:
            try:
                return self.library.update(name, source)
            except LibraryError as error:  # the body names another skin, or skins_dir is not writable
                raise user_error(400 if skin.name != name else 500, _renamed(error, source)) from None

    def _delete(self, name: str) -> dict:
        entry = self._entry(name)
        vm = worn_by(self.config, name)  # the same check as `netskin skins delete`
        if vm is not None:
            raise ApiError(409, in_use_message(name, vm), vm=vm)
        try:
            entry = self.library.delete(name)
        except LibraryError as error:  # a preset, or skins_dir is not writable
            raise user_error(409 if entry.origin == "preset" else 500, error) from None
        uncovered = any(e.name == name and e.origin == "preset" for e in self.library.entries())
        return {"deleted": entry.name, "path": str(entry.path), "preset_visible": uncovered}

    def _entry(self, name: str) -> Entry:
        try:
            return self.library.entry(name)
        except LibraryError as error:
            raise user_error(404, error) from None

    def _valid_entry(self, name: str) -> Entry:
        entry = self._entry(name)
        if entry.skin is None:
            raise user_error(400, SkinError(list(entry.errors)))
        return entry

    # -- VMs ------------------------------------------------------------------------------------

    async def list_vms(self, request: Request) -> Response:
        return JSONResponse(await self._daemon(assign.status, self.config))

    async def show_vm(self, request: Request) -> Response:
        vm = request.path_params["vm_id"]
        reply = await self._daemon(assign.status, self.config, vm, vm=vm)
        return JSONResponse(reply["vms"][vm])

    async def apply(self, request: Request) -> Response:
        vm, name = request.path_params["vm_id"], request.path_params["name"]
        return JSONResponse(await self._apply(vm, name))

    async def rollback(self, request: Request) -> Response:
        vm = request.path_params["vm_id"]
        return JSONResponse(await self._daemon(assign.rollback, self.config, vm, self.timeout, vm=vm))

    async def revert(self, request: Request) -> Response:
        vm = request.path_params["vm_id"]
        return JSONResponse(await self._daemon(assign.revert, self.config, vm, self.timeout, vm=vm))

    async def _apply(self, vm: str, name: str) -> dict:
        return await self._daemon(assign.apply, self.config, vm, name, self.timeout, self.verify_timeout,
                                  vm=vm, skin=name)

    async def _daemon(self, fn: Callable, *args: Any, vm: str | None = None, skin: str | None = None) -> Any:
        """Run a daemon request; map what went wrong to a status code (the CLI maps it to an exit code)."""
        try:
            return await run_in_threadpool(fn, *args)
        except assign.VerifyFailed as exc:
            raise ApiError(422, str(exc), vm=exc.status) from None
        except assign.InProgress as exc:
            raise ApiError(504, str(exc), vm=exc.status) from None
        except control.ReplyTimeout as exc:
            raise ApiError(504, str(exc)) from None
        except control.DaemonUnreachable as exc:
            raise ApiError(503, str(exc)) from None
        except control.ControlError as exc:
            raise ApiError(await run_in_threadpool(self._refusal_status, exc, vm, skin), str(exc)) from None

    def _refusal_status(self, exc: control.ControlError, vm: str | None, skin: str | None) -> int:
        if exc.internal or exc.code not in (1, 3):
            return 500  # the daemon failed, it did not refuse; the CLI's exit code 2
        if exc.code == 3:
            return 422
        if vm is not None and vm not in self.config.vms:
            return 404
        if skin is not None:
            entries = {entry.name: entry for entry in self.library.entries()}
            if skin not in entries:
                return 404
            if entries[skin].skin is None:
                return 400
        return 409  # a known VM and skin, refused for the VM's state (no shadow, say)

    # -- personas -------------------------------------------------------------------------------

    async def create_persona(self, request: Request) -> Response:
        document = from_persona(await read_document(request))
        entry = await run_in_threadpool(self._create_persona, document)
        return JSONResponse(persona_data(entry.skin, entry.document), status_code=201)

    async def update_persona(self, request: Request) -> Response:
        persona_id = request.path_params["id"]
        document = from_persona(await read_document(request))
        entry = await run_in_threadpool(self._update, persona_id, document)
        return JSONResponse(persona_data(entry.skin, entry.document))

    async def get_persona(self, request: Request) -> Response:
        entry = await run_in_threadpool(self._valid_entry, request.path_params["id"])
        return JSONResponse(persona_data(entry.skin, entry.document))

    async def apply_persona(self, request: Request) -> Response:
        vm, persona_id = request.path_params["vm_id"], request.path_params["persona_id"]
        return JSONResponse(await self._apply(vm, persona_id))

    async def vm_persona(self, request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(self._active_persona, request.path_params["vm_id"]))

    def _create_persona(self, document: dict) -> Entry:
        """A persona as the seed writes it has no name: the API makes one (``persona-<hex>``)."""
        if document.get("name") is None and document.get("skin_name") is None:
            taken = {entry.name for entry in self.library.entries()}
            persona_id = new_persona_id()
            while persona_id in taken:
                persona_id = new_persona_id()
            document = {"name": persona_id, **{k: v for k, v in document.items() if k != "name"}}
        return self._create(document)

    def _active_persona(self, vm: str) -> dict:
        """The VM's active skin as persona, from the copy the daemon enforces (not the library's file)."""
        try:
            self.config.vm_queues(vm)  # its message names the configured VMs
        except UserError as error:
            raise user_error(404, error) from None
        assignment = self.store.load(vm)
        if assignment is None or assignment.active is None:
            raise ApiError(404, f"VM {vm!r} wears no skin; apply one with POST /vms/{vm}/persona/ID")
        copy = assignment.active
        return persona_data(validate_skin(copy.document, default_name=copy.name), copy.document)

    # -- metrics and the document ---------------------------------------------------------------

    async def metrics(self, request: Request) -> Response:
        try:
            reply = await run_in_threadpool(assign.status, self.config)
        except (control.DaemonUnreachable, control.ControlError):
            reply = None  # a successful scrape that says netskin_daemon_up 0
        return Response(metrics.render(reply), media_type=metrics.CONTENT_TYPE_LATEST)


def create_app(config: HostConfig, token: str | None = None, verify_timeout: float = assign.VERIFY_TIMEOUT_S,
               timeout: float = assign.SWAP_TIMEOUT_S) -> Callable:
    from manager.cli_fleet import is_manager

    fleet = is_manager(config)
    document = openapi_document(bearer=token is not None, fleet=fleet)

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    if fleet:
        from manager.api_fleet import fleet_routes

        routes = fleet_routes(config, openapi)
    else:
        routes = _host_routes(Api(config, verify_timeout, timeout), openapi)
    app = Starlette(
        routes=routes,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error},
        max_body_size=MAX_BODY_BYTES,
    )
    return BearerToken(app, token) if token is not None else app


def _host_routes(api: Api, openapi: Callable) -> list[Route]:
    return [
        *seed_routes(api),
        route("/metrics", GET=api.metrics),
        route("/openapi.json", GET=openapi),
    ]


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse({"error": exc.message, **exc.extra}, status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no endpoint {request.url.path}; GET /openapi.json lists them"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})"
    else:
        message = exc.detail
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


# --- request bodies and response shapes --------------------------------------------------------


class _as_file:
    """The body written as ``NAME.json`` in a private temporary directory, for the library's file API."""

    def __init__(self, document: dict, name: str) -> None:
        self.document, self.name = document, name

    def __enter__(self) -> Path:
        self._dir = tempfile.TemporaryDirectory(prefix="netskin-api-")
        path = Path(self._dir.name) / f"{self.name}.json"
        path.write_text(json.dumps(self.document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    def __exit__(self, *exc: object) -> None:
        self._dir.cleanup()


def _renamed(error: UserError, source: Path) -> UserError:
    return type(error)([line.replace(str(source), BODY_AS_FILE) for line in error.lines])


# --- the OpenAPI document ----------------------------------------------------------------------


def _skin_schemas() -> dict[str, Any]:
    """The skin schema from the pydantic model, with what pydantic cannot express added."""
    schema = Skin.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs")
    name = {"type": "string", "pattern": f"^{_NAME_RE.pattern}$"}
    props = schema["properties"]
    props["name"] = name | {"description": "the skin's name (or skin_name)"}
    props["skin_name"] = {"anyOf": [name, {"type": "null"}]}
    props["security_profile"] = {"anyOf": [name, {"type": "null"}]}
    props["loss_model"] = {"anyOf": [{"const": "random"}, {"$ref": "#/components/schemas/LossModel"}]}
    props["mac_address"] = {"anyOf": [{"type": "string", "pattern": "^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$"},
                                      {"type": "null"}]}
    schema = _any_ip(schema)
    defs = _any_ip(defs)
    persona = json.loads(json.dumps(schema))
    persona["title"] = "Persona"
    persona["description"] = ("A skin in the persona seed's vocabulary: `id` (or `name`) names it; "
                              "without either, create makes an id.")
    persona["properties"] = {"id": name} | persona["properties"]
    return defs | {"Skin": schema, "Persona": persona}


def _any_ip(schema: Any) -> Any:
    """pydantic's "ipvanyaddress" format, in formats OpenAPI tools know."""
    if isinstance(schema, list):
        return [_any_ip(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if schema.get("format") == "ipvanyaddress":
        return {"anyOf": [{"type": "string", "format": "ipv4"}, {"type": "string", "format": "ipv6"}]}
    return {key: _any_ip(value) for key, value in schema.items()}


def _named(schema: str, *names: str) -> dict[str, Any]:
    """A create body: the schema, with at least one of the fields that name it."""
    return {"allOf": [{"$ref": f"#/components/schemas/{schema}"},
                      {"anyOf": [{"required": [name]} for name in names]}]}


_NAME_PARAM = {"type": "string", "pattern": f"^{_NAME_RE.pattern}$"}

_RESPONSES = {
    200: "OK",
    201: "created",
    400: "invalid document (the message names the field, the value and the allowed range)",
    401: "missing or wrong bearer token",
    404: "unknown skin, persona or VM",
    409: "conflict: the name exists, the skin is worn by a VM or is a preset, or the VM has no shadow",
    422: "not (wholly) in force: refused, or applied but not verified and restored (`vm` holds its status)",
    500: "the daemon failed internally (the message says how)",
    503: "the daemon is not running",
    504: "the daemon did not finish within the bound; `vm` holds its status (the change may still complete)",
}


def _op(summary: str, ok: dict[str, Any], errors: tuple[int, ...] = (), *, params: tuple[str, ...] = (),
        body: dict[str, Any] | None = None, created: bool = False, bearer: bool = False) -> dict[str, Any]:
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    responses: dict[str, Any] = {str(201 if created else 200): {"description": _RESPONSES[201 if created else 200],
                                                                "content": ok}}
    for code in errors + ((401,) if bearer else ()):
        responses[str(code)] = {"description": _RESPONSES[code], "content": error}
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": _NAME_PARAM} for p in params]
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def openapi_document(bearer: bool = False, fleet: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.1 description of this API (served at /openapi.json); ``fleet``: as a fleet
    manager serves it (VMs on any host, ``/hosts``, ``/fleet/apply``, no ``/metrics``)."""
    def json_of(ref: str | None = None, **schema: Any) -> dict[str, Any]:
        return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"} if ref else schema}}

    op = partial(_op, bearer=bearer)
    entry, vm_status, persona = json_of("SkinEntry"), json_of("VmStatus"), json_of("PersonaView")
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "netskin", "version": "0.1.0",
                 "description": "Per-VM network skins: the `netskin` CLI's operations over HTTP."},
        "paths": {
            "/skins": {
                "get": op("List every skin (drop-ins and presets)", json_of(type="array", items={
                    "$ref": "#/components/schemas/SkinEntry"})),
                "post": op("Create a drop-in skin", entry, (400, 409), body=_named("Skin", "name", "skin_name"),
                          created=True),
            },
            "/skins/{name}": {
                "get": op("Show one skin and its effective conditions per direction", entry, (400, 404),
                          params=("name",)),
                "put": op("Replace a skin (a preset gets an overriding drop-in)", entry, (400, 404),
                          params=("name",), body={"$ref": "#/components/schemas/Skin"}),
                "delete": op("Delete a drop-in skin", json_of("Deleted"), (404, 409), params=("name",)),
            },
            "/vms": {"get": op("Every VM's status and the host's", json_of(type="object", required=["vms"],
                                                                            properties={"vms": {"type": "object"},
                                                                                        "host": {"type": "object"}}),
                               (500, 503, 504))},
            "/vms/{vm_id}": {"get": op("One VM's status and live counters", vm_status, (404, 409, 500, 503, 504),
                                       params=("vm_id",))},
            "/vms/{vm_id}/skins/{name}": {"post": op(
                "Apply a skin: atomic swap, verified, the previous assignment restored if not", vm_status,
                (400, 404, 409, 422, 500, 503, 504), params=("vm_id", "name"))},
            "/vms/{vm_id}/rollback": {"post": op("Swap the active and shadow skins", vm_status,
                                                 (404, 409, 422, 500, 503, 504), params=("vm_id",))},
            "/vms/{vm_id}/revert": {"post": op("Remove the skin; restore the original configuration", vm_status,
                                               (404, 409, 422, 500, 503, 504), params=("vm_id",))},
            "/vms/{vm_id}/persona": {"get": op("The VM's active skin as a persona", persona, (404,),
                                               params=("vm_id",))},
            "/vms/{vm_id}/persona/{persona_id}": {"post": op(
                "Apply a persona (the same as applying the skin)", vm_status, (400, 404, 409, 422, 500, 503, 504),
                params=("vm_id", "persona_id"))},
            "/personas/create": {"post": op("Create a persona (without `id` or `name` the API makes an id, "
                                            "persona-<hex>, and answers with it)", persona, (400, 409),
                                            body={"$ref": "#/components/schemas/Persona"}, created=True)},
            "/personas/update/{id}": {"put": op("Replace a persona", persona, (400, 404), params=("id",),
                                                body={"$ref": "#/components/schemas/Persona"})},
            "/personas/get/{id}": {"get": op("One persona", persona, (400, 404), params=("id",))},
            "/metrics": {"get": op("Prometheus metrics (netskin_daemon_up 0 when the daemon is down)",
                                   {"text/plain": {"schema": {"type": "string"}}})},
            "/openapi.json": {"get": op("This document", json_of(type="object"))},
        },
        "components": {"schemas": _skin_schemas() | {
            "Error": {"type": "object", "required": ["error"], "properties": {
                "error": {"type": "string", "description": "one line: the problem and the fix"},
                "errors": {"type": "array", "items": {"type": "string"}, "description": "one line per problem"},
                "vm": {"description": "422 and 504: the VM's status; 409 on delete: the VM wearing it"},
            }},
            "SkinEntry": {"type": "object", "required": ["name", "origin", "path", "valid", "errors", "skin"],
                          "properties": {
                              "name": {"type": "string"},
                              "origin": {"enum": ["preset", "drop-in"]},
                              "path": {"type": "string"},
                              "valid": {"type": "boolean"},
                              "errors": {"type": "array", "items": {"type": "string"}},
                              "skin": {"type": ["object", "null"]},
                              "effective": {"type": "object", "description": "GET /skins/{name} only"},
                          }},
            "Deleted": {"type": "object", "required": ["deleted", "path", "preset_visible"], "properties": {
                "deleted": {"type": "string"}, "path": {"type": "string"}, "preset_visible": {"type": "boolean"}}},
            "VmStatus": {"type": "object",
                         "required": ["active", "shadow", "generation", "enforced_generation", "uplink", "downlink"],
                         "properties": {
                             "active": {"type": ["string", "null"]},
                             "shadow": {"type": ["string", "null"]},
                             "generation": {"type": "integer"},
                             "enforced_generation": {"type": "integer"},
                             "reload_error": {"type": ["string", "null"]},
                             "verify_problems": {"type": "array", "items": {"type": "string"}},
                             "uplink": {"type": "object"},
                             "downlink": {"type": "object"},
                         }},
            "PersonaView": {"type": "object", "required": ["id", *PERSONA_FIELDS, "document"], "properties": {
                "id": {"type": "string"},
                "qos_priority": {"type": "integer"},
                "security_profile": {"type": ["string", "null"]},
                "simulated_latency_ms": {"type": "number"},
                "packet_loss_probability": {"type": "number"},
                "bandwidth_limit_kbps": {"type": "number"},
                "document": {"type": "object", "description": "the skin document as stored"},
            }},
        }},
    }
    if fleet:
        _fleet_paths(document, op, json_of)
    if bearer:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document


def _fleet_paths(document: dict[str, Any], op: Callable, json_of: Callable) -> None:
    paths = document["paths"]
    del paths["/metrics"]  # each host's daemon has its own
    host = {"name": "host", "in": "query", "required": False, "schema": _NAME_PARAM,
            "description": "the VM's host, for a name that is on more than one"}
    change = [host, {"name": "wait", "in": "query", "required": False, "schema": {"type": "number", "minimum": 0},
                     "description": "seconds to wait for every target to report it enforced (default 10; 0: "
                                    "only write it); past them all are restored and the answer is 422"}]
    for path, methods in paths.items():
        if path.startswith("/vms/{vm_id}"):
            for method in methods.values():
                extra = change if "post" in methods else [host]
                method["parameters"] = method.get("parameters", []) + extra
                method["responses"].setdefault("503", {"description": "the fleet store is unreachable"})
    for path in ("/vms/{vm_id}/skins/{name}", "/vms/{vm_id}/persona/{persona_id}"):
        paths[path]["post"]["parameters"].append(
            {"name": "at", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "swap at this wall-clock instant: +30s, Unix seconds or ISO 8601"})
    hosts = json_of(type="object", required=["hosts"], properties={"revision": {"type": "integer"}, "hosts": {
        "type": "array", "items": {"type": "object", "required": ["host", "state"], "properties": {
            "host": {"type": "string"}, "state": {"enum": ["alive", "stale"]}, "in_sync": {"type": ["boolean", "null"]},
            "beat_age_s": {"type": ["number", "null"]}, "vms": {"type": "array", "items": {"type": "string"}}}}}})
    paths["/hosts"] = {"get": op("Every host of the fleet: alive while its agent holds its lease, else stale",
                                 hosts, (503,))}
    paths["/fleet/apply"] = {"post": op(
        "Apply a skin to many VMs on many hosts in one store transaction (all or none)",
        json_of(type="object"), (400, 404, 409, 422, 503),
        body={"type": "object", "required": ["vms", "skin"], "properties": {
            "vms": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}],
                    "description": "VM or HOST/VM names (a list, or one comma-separated string)"},
            "skin": {"type": "string"}, "at": {"type": ["string", "number"]},
            "wait": {"type": "number", "minimum": 0}}})}


# --- serving -----------------------------------------------------------------------------------


async def _until_signalled() -> None:
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


def serve(config: HostConfig, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None,
          verify_timeout: float = assign.VERIFY_TIMEOUT_S, timeout: float = assign.SWAP_TIMEOUT_S) -> None:
    """Serve the API until SIGINT/SIGTERM; ``UserError`` if it may not or cannot listen."""
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    check_listen(host, token)
    hypercorn = Config()
    hypercorn.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hypercorn.accesslog = "-"
    app = create_app(config, token=token, verify_timeout=verify_timeout, timeout=timeout)
    try:
        trio.run(partial(hypercorn_serve, app, hypercorn, shutdown_trigger=_until_signalled))
    except* OSError as group:
        error = group.exceptions[0]
        raise UserError(f"cannot listen on {host}:{port}: {getattr(error, 'strerror', None) or error}; "
                        f"choose another --host or --port") from None
