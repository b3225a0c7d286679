"""What the REST API's two faces share (a single host's daemon, a fleet manager's store):
errors, routes, request bodies and the persona vocabulary."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from interceptor.schema import Skin, UserError


class ApiError(Exception):
    """Ends a request with ``status`` and ``{"error": message, **extra}``."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


def user_error(status: int, error: UserError, **extra: Any) -> ApiError:
    lines = error.lines
    if len(lines) > 1:
        extra["errors"] = lines
    return ApiError(status, "; ".join(lines), **extra)


def route(path: str, **handlers: Callable) -> Route:
    """One route per path, so a wrong method gets 405 with every allowed method in Allow."""
    handlers.setdefault("HEAD", handlers.get("GET"))

    async def endpoint(request: Request) -> Response:
        return await handlers[request.method](request)

    return Route(path, endpoint, methods=[m for m, h in handlers.items() if h is not None])


async def read_document(request: Request) -> dict:
    """The request body: one JSON object of skin fields."""
    body = await request.body()
    try:
        document = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"request body: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # undecodable bytes, huge integers, deep nesting
        raise ApiError(400, f"request body: not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ApiError(400, f"request body: expected a JSON object of skin fields, got {type(document).__name__}")
    return document


# A persona's fields and the skin fields they restate.
PERSONA_FIELDS = ("qos_priority", "security_profile", "simulated_latency_ms", "packet_loss_probability",
                  "bandwidth_limit_kbps")


def from_persona(document: dict) -> dict:
    """A persona body as a skin document: ``id`` is the skin's ``name``."""
    if "id" not in document:
        return document
    document = dict(document)
    persona_id = document.pop("id")
    if not isinstance(persona_id, str):
        raise ApiError(400, f"id: expected text, got {json.dumps(persona_id)}")
    if "name" in document and document["name"] != persona_id:
        raise ApiError(400, f"id: {json.dumps(persona_id)} conflicts with name: {json.dumps(document['name'])} "
                            f"(they mean the same thing; give one)")
    return {"name": persona_id, **document}


def new_persona_id() -> str:
    return f"persona-{secrets.token_hex(3)}"


def persona_data(skin: Skin | None, document: dict | None) -> dict[str, Any]:
    """A skin in the persona seed's vocabulary, with the document as written."""
    assert skin is not None
    return {
        "id": skin.name,
        "qos_priority": skin.qos_priority,
        "security_profile": skin.security_profile,
        "simulated_latency_ms": skin.latency_ms,
        "packet_loss_probability": round(skin.packet_loss_percent / 100, 12),
        "bandwidth_limit_kbps": skin.bandwidth_limit_kbps,
        "document": document,
    }


def seed_routes(api: Any) -> list[Route]:
    """The seed's endpoints, served by a host's API and by a fleet manager's alike."""
    return [
        route("/skins", GET=api.list_skins, POST=api.create_skin),
        route("/skins/{name}", GET=api.show_skin, PUT=api.update_skin, DELETE=api.delete_skin),
        route("/vms", GET=api.list_vms),
        route("/vms/{vm_id}", GET=api.show_vm),
        route("/vms/{vm_id}/skins/{name}", POST=api.apply),
        route("/vms/{vm_id}/rollback", POST=api.rollback),
        route("/vms/{vm_id}/revert", POST=api.revert),
        route("/vms/{vm_id}/persona", GET=api.vm_persona),
        route("/vms/{vm_id}/persona/{persona_id}", POST=api.apply_persona),
        route("/personas/create", POST=api.create_persona),
        route("/personas/update/{id}", PUT=api.update_persona),
        route("/personas/get/{id}", GET=api.get_persona),
    ]
