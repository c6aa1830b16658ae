"""
A treq client for the relay: OAuth2 login with refresh, FHIR REST, and ``push_to_agent``.

Used by the CLI, by the agent (to log in and read its configuration) and by Bots.  Every push
is recognisable by the relay (HL7 v2 by its MSH-10, anything else by an ``Idempotency-Key``),
so a push retried after a lost connection never reaches the device twice.
"""

from __future__ import annotations

import json
import time
from typing import Any, Mapping
from urllib.parse import quote, urlencode

import treq
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.error import ConnectError, ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web._newclient import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseNeverReceived,
)

from medagent.contenttypes import FHIR_JSON
from medagent.fhir import outcome_text, push_request, reference_id

log = Logger()

_RETRYABLE = (
    ConnectError,
    ConnectionLost,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseNeverReceived,
)

#: Refresh the token when it has less than this many seconds left.
REFRESH_MARGIN = 60.0
DEFAULT_TIMEOUT = 30.0


class RelayError(Exception):
    """The relay answered with an error; C{outcome} is its OperationOutcome (or body)."""

    def __init__(self, status: int, outcome: Any, headers: Mapping[str, str] | None = None):
        super().__init__(f"HTTP {status}: {outcome_text(outcome)}")
        self.status = status
        self.outcome = outcome
        self.headers = dict(headers or {})


class MedagentClient:
    def __init__(
        self,
        reactor: Any,
        base_url: str,
        client_id: str | None = None,
        client_secret: str | None = None,
        *,
        access_token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        persistent: bool = True,
    ) -> None:
        self.reactor = reactor
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id
        self.client_secret = client_secret
        self.timeout = timeout
        self._token = access_token
        self._expires = float("inf") if access_token else 0.0
        self._login_waiters: list[Deferred[str]] = []
        self.pool = HTTPConnectionPool(reactor, persistent=persistent)
        self.pool.maxPersistentPerHost = 16

    # -- auth -----------------------------------------------------------------------------

    def access_token(self) -> Deferred[str]:
        """A valid token, logging in (once, shared by concurrent callers) when needed."""
        if self._token and time.time() < self._expires - REFRESH_MARGIN:
            return succeed(self._token)
        d: Deferred[str] = Deferred()
        self._login_waiters.append(d)
        if len(self._login_waiters) == 1:

            def done(result: Any) -> None:
                waiters, self._login_waiters = self._login_waiters, []
                for w in waiters:
                    w.errback(result) if isinstance(result, Failure) else w.callback(result)

            Deferred.fromCoroutine(self._do_login()).addBoth(done)
        return d

    async def _do_login(self) -> str:
        if not (self.client_id and self.client_secret):
            raise RelayError(401, "No client credentials configured")
        response = await treq.post(
            self.base_url + "/oauth2/token",
            data={
                "grant_type": "client_credentials",
                "client_id": self.client_id,
                "client_secret": self.client_secret,
            },
            pool=self.pool,
            reactor=self.reactor,
            timeout=self.timeout,
        )
        body = await response.content()
        if response.code != 200:
            try:
                err = json.loads(body)
                text = err.get("error_description") or err.get("error") or body.decode()
            except ValueError:
                text = body.decode("utf-8", "replace")[:200]
            raise RelayError(response.code, {"issue": [{"details": {"text": text}}]})
        token = json.loads(body)
        self._token = token["access_token"]
        self._expires = time.time() + float(token.get("expires_in", 3600))
        log.debug("Logged in to {base} as {client_id}", base=self.base_url,
                  client_id=self.client_id)
        return self._token

    # -- HTTP -----------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, str, bytes, Mapping[str, str]]:
        token = await self.access_token()
        url = self.base_url + path
        if params:
            url += "?" + urlencode(params, doseq=True)
        hdrs = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json, */*"}
        data = None
        if json_body is not None:
            hdrs["Content-Type"] = FHIR_JSON
            data = json.dumps(json_body).encode("utf-8")
        hdrs.update(headers or {})
        wire_headers: dict[bytes | str, list[bytes | str]] = {k: [v] for k, v in hdrs.items()}
        response = await treq.request(
            method,
            url,
            data=data,
            headers=wire_headers,
            pool=self.pool,
            reactor=self.reactor,
            timeout=timeout or self.timeout,
        )
        body = await response.content()
        ctype = (response.headers.getRawHeaders("content-type") or [""])[0]
        resp_headers = {
            k.decode().lower(): v[0].decode("latin-1")
            for k, v in response.headers.getAllRawHeaders()
        }
        return response.code, ctype, body, resp_headers

    async def request_json(self, method: str, path: str, **kw: Any) -> Any:
        status, ctype, body, headers = await self.request(method, path, **kw)
        parsed = _parse_body(ctype, body)
        if status >= 400:
            raise RelayError(status, parsed, headers)
        return parsed

    # -- FHIR REST ------------------------------------------------------------------------

    def create(self, resource: Mapping[str, Any]) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(
            self.request_json("POST", f"/fhir/R4/{resource['resourceType']}", json_body=resource)
        )

    def read(self, resource_type: str, id: str) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(
            self.request_json("GET", f"/fhir/R4/{resource_type}/{quote(id, safe='')}")
        )

    def update(self, resource: Mapping[str, Any]) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(
            self.request_json(
                "PUT", f"/fhir/R4/{resource['resourceType']}/{quote(resource['id'], safe='')}",
                json_body=resource,
            )
        )

    def delete(self, resource_type: str, id: str) -> Deferred[Any]:
        return Deferred.fromCoroutine(
            self.request_json("DELETE", f"/fhir/R4/{resource_type}/{quote(id, safe='')}")
        )

    def search(self, resource_type: str, params: Mapping[str, Any] | None = None
               ) -> Deferred[list[dict[str, Any]]]:
        async def go() -> list[dict[str, Any]]:
            bundle = await self.request_json("GET", f"/fhir/R4/{resource_type}",
                                             params=params or {})
            return [e["resource"] for e in bundle.get("entry") or []]

        return Deferred.fromCoroutine(go())

    # -- push -----------------------------------------------------------------------------

    def push_to_agent(
        self,
        agent: Any,
        destination: Any,
        body: Any,
        content_type: str | None = None,
        wait_for_response: bool = False,
        *,
        wait_timeout: int | None = None,
        idempotency_key: str | None = None,
        return_ack: str | None = None,
        ttl: float | None = None,
        retries: int = 2,
    ) -> Deferred[Any]:
        """
        Push C{body} to C{destination} through C{agent} (same arguments as Medplum's
        C{pushToAgent}).  Waited: fires with the device's reply (text, or parsed JSON for JSON
        content types).  Not waited: fires with the 202 OperationOutcome (its
        ``issue[0].diagnostics`` is the push's status URL).  Errors raise L{RelayError}.

        A lost connection is retried up to C{retries} times with the same idempotency key.
        """
        path, payload, key = push_request(agent, destination, body, content_type,
                                          wait_for_response, wait_timeout=wait_timeout,
                                          return_ack=return_ack, ttl=ttl,
                                          idempotency_key=idempotency_key)
        agent_id = reference_id(agent, "Agent")
        http_timeout = (wait_timeout or 10_000) / 1000.0 + self.timeout

        async def go() -> Any:
            attempt = 0
            while True:
                try:
                    status, ctype, raw, headers = await self.request(
                        "POST",
                        path,
                        json_body=payload,
                        headers={"Idempotency-Key": key} if key else None,
                        timeout=http_timeout,
                    )
                except _RETRYABLE as e:
                    # Same idempotency key: the relay answers a repeat from its journal.
                    attempt += 1
                    if attempt > retries:
                        raise
                    log.warn("Push to Agent/{agent_id} lost its connection ({error}); retrying",
                             agent_id=agent_id, error=type(e).__name__)
                    continue
                parsed = _parse_body(ctype, raw)
                if status >= 400:
                    raise RelayError(status, parsed, headers)
                return parsed

        return Deferred.fromCoroutine(go())

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()


def _parse_body(ctype: str, body: bytes) -> Any:
    if "json" in ctype.lower():
        try:
            return json.loads(body)
        except ValueError:
            pass
    return body.decode("utf-8", "replace")


@inlineCallbacks
def push_to_agent(
    client: MedagentClient, agent: Any, destination: Any, body: Any, *args: Any, **kw: Any
):
    """Module-level form of L{MedagentClient.push_to_agent}."""
    result = yield client.push_to_agent(agent, destination, body, *args, **kw)
    return result
