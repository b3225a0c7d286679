"""The REST API on a fleet manager: the seed endpoints address VMs on any host, through the store.

`netskin serve` with a ``[store]`` and no VMs builds these endpoints instead of the single-host
ones (same paths, same error shape ``{"error": ...}``), plus ``GET /hosts`` and
``POST /fleet/apply`` for many VMs in one transaction. A VM is named as on the CLI; a name that
is on two hosts takes ``?host=HOST``. Status codes: 400 invalid document or ambiguous name, 404
unknown VM, host or skin, 409 a conflict (a VM changed meanwhile, a skin exists or is worn, no
shadow), 422 not in force on every target within ``wait`` (all restored; the body says how far
each got), 503 the store is unreachable.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from interceptor.schema import HostConfig, SkinError, UserError, validate_skin
from manager import fleetctl
from manager.api_common import (ApiError, from_persona, new_persona_id, persona_data, read_document, route,
                                seed_routes, user_error)
from manager.cli_fleet import outcome_data
from manager.fleetctl import Conflict, NotFound, Refused
from manager.library import effective_links, entry_data
from manager.store import Store, StoreError


class FleetApi:
    def __init__(self, config: HostConfig) -> None:
        assert config.store is not None
        self.config = config

    async def _store(self, fn: Callable[[Store], Awaitable[Any]]) -> Any:
        """Run ``fn`` against the store; map what went wrong to a status code."""
        try:
            async with Store.from_config(self.config.store) as store:
                return await fn(store)
        except Conflict as exc:
            raise ApiError(409, "; ".join(exc.lines), vms=exc.vms) from None
        except NotFound as exc:
            raise user_error(404, exc) from None
        except Refused as exc:
            raise user_error(409, exc) from None
        except UserError as exc:  # invalid skin documents, ambiguous names, a bad --at
            raise user_error(400, exc) from None
        except StoreError as exc:
            raise ApiError(503, f"the fleet store ({', '.join(self.config.store.endpoints)}) did not answer or "
                                f"refused: {exc}") from None

    # -- hosts and VMs ---------------------------------------------------------------------------

    async def hosts(self, request: Request) -> Response:
        view = await self._store(fleetctl.read_view)
        return JSONResponse({"revision": view.revision, "hosts": fleetctl.host_rows(view, time.time())})

    async def list_vms(self, request: Request) -> Response:
        view = await self._store(fleetctl.read_view)
        return JSONResponse({"revision": view.revision, "hosts": fleetctl.host_rows(view, time.time()),
                             "vms": fleetctl.vm_rows(view)})

    async def show_vm(self, request: Request) -> Response:
        name = _vm_name(request)

        async def go(store: Store) -> dict:
            view = await fleetctl.read_view(store)
            target = fleetctl.resolve(view, [name])[0]
            return next(row for row in fleetctl.vm_rows(view) if (row["host"], row["vm"]) == (target.host, target.vm))

        return JSONResponse(await self._store(go))

    async def vm_persona(self, request: Request) -> Response:
        name = _vm_name(request)

        async def go(store: Store) -> dict:
            view = await fleetctl.read_view(store)
            target = fleetctl.resolve(view, [name])[0]
            _, desired = view.hosts[target.host].desired.get(target.vm, (0, None))
            if not isinstance(desired, fleetctl.Desired):
                raise NotFound(f"VM {target} wears no skin from the fleet; apply one with POST /vms/{target.vm}/persona/ID")
            document = desired.skin.document
            return persona_data(validate_skin(document, default_name=desired.skin.name), document)

        return JSONResponse(await self._store(go))

    async def apply(self, request: Request) -> Response:
        return await self._change(request, "apply", _vm_name(request), request.path_params["name"])

    async def apply_persona(self, request: Request) -> Response:
        return await self._change(request, "apply", _vm_name(request), request.path_params["persona_id"])

    async def rollback(self, request: Request) -> Response:
        return await self._change(request, "rollback", _vm_name(request), None)

    async def revert(self, request: Request) -> Response:
        return await self._change(request, "revert", _vm_name(request), None)

    async def fleet_apply(self, request: Request) -> Response:
        """``{"vms": ["vm1", "hv2/b1"] | "vm1,hv2/b1", "skin": NAME, "at": TIME, "wait": SECONDS}``"""
        body = await read_document(request)
        vms, skin = body.get("vms"), body.get("skin")
        if isinstance(vms, list) and all(isinstance(vm, str) for vm in vms):
            vms = ",".join(vms)
        if not isinstance(vms, str) or not isinstance(skin, str):
            raise ApiError(400, 'request body: give "vms" (a list of VM or HOST/VM names) and "skin" (a skin name)')
        at, wait = body.get("at"), body.get("wait", fleetctl.WAIT_S)
        if not isinstance(wait, (int, float)) or wait < 0:
            raise ApiError(400, f"wait: expected seconds ≥ 0, got {wait!r}")
        return await self._run_change("apply", vms, skin, None if at is None else str(at), float(wait))

    async def _change(self, request: Request, verb: str, names: str, skin: str | None) -> Response:
        try:
            wait = float(request.query_params.get("wait", fleetctl.WAIT_S))
        except ValueError:
            raise ApiError(400, f"wait: expected seconds, got {request.query_params['wait']!r}") from None
        return await self._run_change(verb, names, skin, request.query_params.get("at"), max(wait, 0.0))

    async def _run_change(self, verb: str, names: str, skin: str | None, at: str | None, wait: float) -> Response:
        async def go(store: Store) -> fleetctl.Outcome:
            view = await fleetctl.read_view(store)
            targets = fleetctl.resolve(view, fleetctl.split_names(names))
            if verb == "apply":
                at_s = fleetctl.parse_at(at, time.time()) if at else None
                document, revision = await fleetctl.find_skin(store, skin)
                change = fleetctl.plan_apply(view, targets, document, skin_revision=revision, at=at_s)
            elif verb == "rollback":
                change = fleetctl.plan_rollback(view, targets)
            else:
                change = fleetctl.plan_revert(view, targets)
            return await fleetctl.carry_out(store, change, wait)

        outcome = await self._store(go)
        data = outcome_data(outcome, skin)
        if outcome.statuses and not outcome.verified:
            raise ApiError(422, f"{verb} not in force on every VM within {wait:g} s: {'; '.join(data['problems'])}; "
                                f"restored {len(outcome.restored)} of {len(outcome.change.steps)} VMs",
                           outcome=data)
        return JSONResponse(data)

    # -- skins and personas -----------------------------------------------------------------------

    async def list_skins(self, request: Request) -> Response:
        return JSONResponse([entry_data(entry) for entry in await self._store(fleetctl.entries)])

    async def show_skin(self, request: Request) -> Response:
        entry = await self._valid_entry(request.path_params["name"])
        return JSONResponse(entry_data(entry) | {"effective": effective_links(entry)})

    async def create_skin(self, request: Request) -> Response:
        document = await read_document(request)
        entry = await self._store(lambda store: fleetctl.create_skin(store, document))
        return JSONResponse(entry_data(entry), status_code=201)

    async def update_skin(self, request: Request) -> Response:
        document = await read_document(request)
        entry = await self._store(lambda store: fleetctl.update_skin(store, request.path_params["name"], document))
        return JSONResponse(entry_data(entry))

    async def delete_skin(self, request: Request) -> Response:
        return JSONResponse(await self._store(lambda store: fleetctl.delete_skin(store, request.path_params["name"])))

    async def _valid_entry(self, name: str):
        entry = await self._store(lambda store: fleetctl.entry(store, name))
        if entry.skin is None:
            raise user_error(400, SkinError(list(entry.errors)))
        return entry

    async def create_persona(self, request: Request) -> Response:
        document = from_persona(await read_document(request))

        async def go(store: Store):
            nonlocal document
            if document.get("name") is None and document.get("skin_name") is None:
                taken = {entry.name for entry in await fleetctl.entries(store)}
                persona_id = new_persona_id()
                while persona_id in taken:
                    persona_id = new_persona_id()
                document = {"name": persona_id, **document}
            return await fleetctl.create_skin(store, document)

        entry = await self._store(go)
        return JSONResponse(persona_data(entry.skin, entry.document), status_code=201)

    async def update_persona(self, request: Request) -> Response:
        persona_id = request.path_params["id"]
        document = from_persona(await read_document(request))
        entry = await self._store(lambda store: fleetctl.update_skin(store, persona_id, document))
        return JSONResponse(persona_data(entry.skin, entry.document))

    async def get_persona(self, request: Request) -> Response:
        entry = await self._valid_entry(request.path_params["id"])
        return JSONResponse(persona_data(entry.skin, entry.document))


def _vm_name(request: Request) -> str:
    """``/vms/{vm_id}``, or with ``?host=H`` the VM on that host (``H/vm_id``)."""
    vm = request.path_params["vm_id"]
    host = request.query_params.get("host")
    return f"{host}/{vm}" if host else vm


def fleet_routes(config: HostConfig, openapi: Callable) -> list:
    api = FleetApi(config)
    return [
        route("/hosts", GET=api.hosts),
        route("/fleet/apply", POST=api.fleet_apply),
        *seed_routes(api),
        route("/openapi.json", GET=openapi),
    ]
