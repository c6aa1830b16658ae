"""
The OAuth2 token endpoint (client credentials), ``auth/me`` and the admin's client
management: ``ClientApplication/$credentials`` (create, list) and
``ClientApplication/{id}/$revoke``.
"""

from __future__ import annotations

import base64
from urllib.parse import parse_qs

from twisted.logger import Logger

from medagent.fhir import FHIRError, bad_request, operation_outcome
from medagent.jsonsafe import JSONInputError
from medagent.jsonsafe import loads as json_loads
from medagent.relay.http.context import (
    Response,
    RouteContext,
    client_host,
    json_response,
    read_body,
)

log = Logger()

#: A client-credentials request is a few hundred bytes; it is read unauthenticated.
MAX_TOKEN_BODY = 16 * 1024


async def token(ctx: RouteContext) -> Response:
    """``POST /oauth2/token``: a form or JSON body, or Basic credentials."""
    request = ctx.request
    ctype = (ctx.header(b"content-type") or "").lower()
    raw = read_body(request, MAX_TOKEN_BODY + 1)
    if len(raw) > MAX_TOKEN_BODY:
        raise FHIRError(413, f"Token request too large (limit {MAX_TOKEN_BODY} bytes)",
                        "too-costly")
    text = raw.decode("utf-8", "replace")
    if "json" in ctype:
        try:
            doc = json_loads(text)
        except JSONInputError as e:
            raise bad_request(f"Invalid JSON body: {e.msg}")
        if not isinstance(doc, dict):
            raise bad_request("Invalid JSON body: not an object")
        form = {k: v for k, v in doc.items() if isinstance(v, str)}
    else:
        try:
            form = {k: v[-1] for k, v in parse_qs(text, max_num_fields=20).items()}
        except ValueError:
            raise bad_request("Invalid form body: too many fields")
    client_id, client_secret = form.get("client_id"), form.get("client_secret")
    auth = ctx.header(b"authorization") or ""
    if auth.lower().startswith("basic "):
        try:
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            client_id, client_secret = client_id or user, client_secret or password
        except ValueError:
            raise bad_request("Invalid Basic authorization header")
    if form.get("grant_type") != "client_credentials":
        return json_response({"error": "unsupported_grant_type",
                              "error_description": "Only client_credentials is supported"},
                             400)
    if not client_id or not client_secret:
        return json_response({"error": "invalid_request",
                              "error_description": "client_id and client_secret are required"},
                             400)
    address = client_host(request)
    throttle = ctx.api.login_throttle
    if throttle is not None:
        throttle.check(client_id, address)  # 429 while locked out
    try:
        issued = await ctx.api.authority.issue_token(client_id, client_secret)
    except FHIRError as e:
        if e.status != 401:  # (a node still loading its signing keys: 503, not a bad secret)
            raise
        if throttle is not None:
            throttle.failed(client_id, address)
        return json_response({"error": "invalid_client",
                              "error_description": "Invalid client credentials"}, 401)
    if throttle is not None:
        throttle.succeeded(client_id)
    resp = json_response(issued)
    resp.content_type = "application/json"
    resp.headers["Cache-Control"] = "no-store"
    return resp


async def me(ctx: RouteContext) -> Response:
    """``GET /auth/me``: who the bearer token belongs to, in Medplum's shape."""
    principal = ctx.api.principal(ctx.request)
    profile = {"resourceType": "ClientApplication", "id": principal.client_id}
    return json_response(
        {
            "profile": profile,
            "project": {"resourceType": "Project", "id": "medagent"},
            "membership": {
                "resourceType": "ProjectMembership",
                "id": principal.client_id,
                "profile": {"reference": f"ClientApplication/{principal.client_id}"},
            },
        }
    )


async def revoke(ctx: RouteContext) -> Response:
    """
    ``POST ClientApplication/{id}/$revoke`` (admin): the client's tokens fail from now on
    and its agent connections are closed before this answers.
    """
    if ctx.method != "POST":
        raise FHIRError(405, "$revoke needs POST", "not-supported")
    principal = ctx.principal
    principal.require_admin()
    client_id = ctx.params["id"]
    await ctx.api.authority.revoke_client(client_id)
    log.info("Client {client_id} revoked by {by}", client_id=client_id,
             by=principal.client_id)
    return json_response(operation_outcome(f"Client {client_id} revoked", id="ok"))


#: a credentials request is a role, a few agent ids and a name
MAX_CREDENTIALS_BODY = 64 * 1024


async def credentials(ctx: RouteContext) -> Response:
    """
    ``ClientApplication/$credentials`` (admin only): ``GET`` lists the OAuth2 clients
    (never a secret or its hash); ``POST {"role", "agents", "name"}`` creates one and answers
    201 with its ``clientSecret``, shown this once and never again.
    """
    principal = ctx.principal
    principal.require_admin()
    authority = ctx.api.authority
    if ctx.method == "GET":
        listed = await authority.list_clients()
        return json_response({"clients": listed})
    if ctx.method != "POST":
        raise FHIRError(405, "$credentials takes GET (list) or POST (create)", "not-supported")
    try:
        body = json_loads(read_body(ctx.request, MAX_CREDENTIALS_BODY))
    except JSONInputError as e:
        raise bad_request(f"Invalid JSON: {e}")
    if not isinstance(body, dict):
        raise bad_request("Expected a JSON object: role, agents, name")
    role, agents, name = body.get("role"), body.get("agents", []), body.get("name")
    if not isinstance(role, str):
        raise bad_request("role is required")
    if not isinstance(agents, list) or not all(isinstance(a, str) and 0 < len(a) <= 64
                                               for a in agents) or len(agents) > 1000:
        raise bad_request("agents must be a list of at most 1000 agent ids")
    if name is not None and not (isinstance(name, str) and len(name) <= 200):
        raise bad_request("name must be text of at most 200 characters")
    created = await authority.create_client(role, agents, name)
    log.info("Client {client_id} ({role}) created by {by}", client_id=created["clientId"],
             role=role, by=principal.client_id)
    return json_response(created, 201)
