"""
FHIR REST on the resources we keep: search and create on ``{type}``, read, update and
delete on ``{type}/{id}``.  Read scopes are in L{medagent.relay.access}; every write is
stamped with its author (L{stamp_author}).
"""

from __future__ import annotations

from typing import Any

from medagent.fhir import FHIRError, bad_request, not_found, operation_outcome
from medagent.relay import access
from medagent.relay.auth import AGENT, BOT, Principal
from medagent.relay.http.context import Response, RouteContext, json_response, stamp_author


async def check_read(ctx: RouteContext, resource_type: str, id: str | None
                     ) -> frozenset[str] | None:
    """
    The ids of C{resource_type} the caller may read (None: all), or 403 for a type its
    role never reads; with an C{id} outside its scope, the same 404 as a missing one.
    The scopes are in L{medagent.relay.access}; a Bot reads what its Bot resource grants.
    """
    principal: Principal = ctx.principal
    if principal.role == BOT:
        principal.require_read(resource_type)
        return None
    if id is not None:
        await access.check_visible(principal, resource_type, id, ctx.api.store)
        return None
    return await access.visible_ids(principal, resource_type, ctx.api.store)


async def search(ctx: RouteContext) -> Response:
    """``GET {type}?...``: a searchset of what the caller may read."""
    resource_type = ctx.params["type"]
    store = ctx.api.store
    ids = await check_read(ctx, resource_type, None)
    if ids is None:
        found = await store.search(resource_type, ctx.query)
    else:  # narrowed in the query itself, so _count/_offset page the caller's own
        found = await store.search(resource_type, access.scoped_search(ctx.query, ids))
        found = [r for r in found if r.get("id") in ids]
    return json_response(bundle(ctx, found))


async def create(ctx: RouteContext) -> Response:
    """``POST {type}``: the store assigns the id; 201 with Location and ETag."""
    resource_type, principal = ctx.params["type"], ctx.principal
    if not (resource_type == "Binary" and principal.role == AGENT):
        principal.require_write(resource_type)  # agents upload Binary (DICOM received)
    resource = ctx.json_body()
    if isinstance(resource, dict):
        resource.pop("id", None)
    check_type(resource, resource_type)
    stamp_author(resource, principal)
    created = await ctx.api.store.create(resource)
    return json_response(
        created, 201,
        Location=f"{ctx.base()}/fhir/R4/{resource_type}/{created['id']}"
        f"/_history/{created['meta']['versionId']}",
        ETag=f'W/"{created["meta"]["versionId"]}"',
    )


async def read(ctx: RouteContext) -> Response:
    """``GET {type}/{id}``; an agent reading its own Agent is Medplum's config read."""
    resource_type, id = ctx.params["type"], ctx.params["id"]
    await check_read(ctx, resource_type, id)
    resource = await ctx.api.store.read(resource_type, id)
    if resource_type == "Agent" and ctx.principal.role == AGENT:
        ctx.api.hub.agent_config_read(id)  # Medplum's agent: now it takes pushes
    return json_response(resource, ETag=f'W/"{resource["meta"]["versionId"]}"')


async def update(ctx: RouteContext) -> Response:
    """``PUT {type}/{id}`` (If-Match honoured): 200, or 201 when it did not exist."""
    resource_type, id, principal = ctx.params["type"], ctx.params["id"], ctx.principal
    store = ctx.api.store
    principal.require_write(resource_type)
    resource = ctx.json_body()
    check_type(resource, resource_type)
    if resource.get("id") not in (None, id):
        raise bad_request("Resource id does not match the URL")
    resource["id"] = id
    stamp_author(resource, principal)
    if_match = ctx.header(b"if-match") or None
    try:
        await store.read(resource_type, id)
        existed = True
    except FHIRError:
        existed = False
    updated = await store.update(resource, if_match)
    return json_response(updated, 200 if existed else 201,
                         ETag=f'W/"{updated["meta"]["versionId"]}"')


async def delete(ctx: RouteContext) -> Response:
    """``DELETE {type}/{id}``."""
    resource_type = ctx.params["type"]
    ctx.principal.require_write(resource_type)
    await ctx.api.store.delete(resource_type, ctx.params["id"])
    return json_response(operation_outcome("Deleted", id="ok"))


async def not_supported(ctx: RouteContext) -> Response:
    """A path or method the resource type has no answer for: 405."""
    raise FHIRError(405, f"{ctx.method} not supported on {'/'.join(ctx.rest)}",
                    "not-supported")


async def unsupported_type(ctx: RouteContext) -> Response:
    """A resource type the relay does not keep: 404."""
    raise not_found(f"Unsupported resource type {ctx.rest[0]}")


def check_type(resource: Any, resource_type: str) -> None:
    if not isinstance(resource, dict):
        raise bad_request("Resource must be a JSON object")
    if resource.get("resourceType") != resource_type:
        raise bad_request(
            f"resourceType {resource.get('resourceType')!r} does not match {resource_type}"
        )


def bundle(ctx: RouteContext, resources: list[dict[str, Any]]) -> dict[str, Any]:
    base = ctx.base()
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [
            {"fullUrl": f"{base}/fhir/R4/{r['resourceType']}/{r['id']}", "resource": r}
            for r in resources
        ],
    }
