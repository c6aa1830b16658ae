"""
The ``medplum`` object a Bot's ``handler(medplum, event)`` gets: a small synchronous client
for the relay that started the bot, logged in as the bot itself (``Bot/{id}``) with a
short-lived token.

Bots run in a worker process, one run at a time, so blocking calls are what a bot author
expects; this module uses only the standard library (no Twisted) to keep workers small.
Method names follow Python style (``create_resource``) with Medplum's camelCase names as
aliases (``createResource``), so a bot ported from TypeScript reads the same.

Inside the relay's bot sandbox there is no network: the client reaches the relay through the
Unix socket the relay binds into the sandbox (C{unix_socket}); C{base_url} is then only the
name in the URLs.  Every call is bounded by the bot's remaining run time.
``push_to_agent`` carries an idempotency key (MSH-10 for HL7 v2, a key per call otherwise) and
retries a lost connection with it, so a retried push never reaches the device twice.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import json
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException
from typing import Any, Mapping

from medagent.contenttypes import FHIR_JSON, JSON_TYPES
from medagent.fhir import outcome_text, push_request

DEFAULT_TIMEOUT = 30.0
MAX_RESPONSE = 32 * 1024 * 1024


class OperationOutcomeError(Exception):
    """The relay answered with an error (C{status}); C{outcome} is its OperationOutcome."""

    def __init__(self, status: int, outcome: Any) -> None:
        super().__init__(f"HTTP {status}: {outcome_text(outcome)}")
        self.status = status
        self.outcome = outcome


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over the relay's Unix socket (the only way out of the bot sandbox)."""

    def __init__(self, path: str, host: str, **kw: Any) -> None:
        super().__init__(host, **kw)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout if isinstance(self.timeout, (int, float)) else None)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class _UnixHandler(urllib.request.HTTPHandler):
    """Replaces the default HTTP handler: every http: URL goes to the socket."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path

    def http_open(self, req: Any) -> Any:
        return self.do_open(functools.partial(_UnixConnection, self._path), req)


class BotClient:
    """Synchronous relay client for bots (see the module docstring)."""

    def __init__(
        self,
        base_url: str | None,
        access_token: str | None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        deadline: float | None = None,
        retries: int = 2,
        insecure_loopback: bool = False,
        unix_socket: str | None = None,
    ) -> None:
        if unix_socket and not base_url:
            base_url = "http://medagent-relay"
        self.base_url = (base_url or "").rstrip("/")
        self._token = access_token
        self.timeout = timeout
        #: time.monotonic() by which the run must be over; no call waits past it
        self.deadline = deadline
        self.retries = retries
        handlers: list[Any] = [urllib.request.ProxyHandler({})]
        if unix_socket:
            handlers.append(_UnixHandler(unix_socket))
        if insecure_loopback and self.base_url.startswith("https:") and _is_loopback(
                self.base_url):
            # The relay's own TLS listener on loopback, addressed by IP: nothing to verify.
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)

    # -- HTTP -----------------------------------------------------------------------------

    def _timeout(self, wanted: float | None = None) -> float:
        timeout = wanted or self.timeout
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0.05:
                raise TimeoutError("The bot's time limit is reached")
            timeout = min(timeout, left)
        return timeout

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = FHIR_JSON,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, str, bytes]:
        """One HTTP call to the relay: (status, content type, body).  Errors are answers."""
        if not self.base_url:
            raise RuntimeError("This bot has no relay URL to call (relay bot_base_url unset)")
        url = self.base_url + path
        if params:
            url += ("&" if "?" in url else "?") + urllib.parse.urlencode(params, doseq=True)
        hdrs = {"Accept": "application/fhir+json, */*", "User-Agent": "medagent-bot"}
        if self._token:
            hdrs["Authorization"] = f"Bearer {self._token}"
        data = None
        if body is not None:
            if isinstance(body, (bytes, bytearray)):
                data = bytes(body)
            elif isinstance(body, str) and content_type not in JSON_TYPES:
                data = body.encode("utf-8")
            else:
                data = json.dumps(body).encode("utf-8")
            hdrs["Content-Type"] = content_type
        hdrs.update(headers or {})
        req = urllib.request.Request(url, data=data, headers=hdrs, method=method.upper())
        try:
            with self._opener.open(req, timeout=self._timeout(timeout)) as resp:
                return resp.status, resp.headers.get("Content-Type", ""), _read(resp)
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.headers.get("Content-Type", ""), _read(e)

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        status, ctype, raw = self.request(method, path, **kw)
        parsed = _parse(ctype, raw)
        if status >= 400:
            raise OperationOutcomeError(status, parsed)
        return parsed

    def _retrying(self, method: str, path: str, **kw: Any) -> tuple[int, str, bytes]:
        """For calls that are safe to repeat: retry a lost connection a few times."""
        attempt = 0
        while True:
            try:
                return self.request(method, path, **kw)
            except (urllib.error.URLError, HTTPException, ConnectionError) as e:
                if isinstance(e, urllib.error.URLError) and isinstance(e.reason, TimeoutError):
                    raise
                attempt += 1
                if attempt > self.retries:
                    raise
                time.sleep(min(0.2 * attempt, max(0.0, self._timeout() - 0.1)))

    # -- FHIR REST ------------------------------------------------------------------------

    def create_resource(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        return self._json("POST", f"/fhir/R4/{_type(resource)}", body=dict(resource))

    def read_resource(self, resource_type: str, id: str) -> dict[str, Any]:
        status, ctype, raw = self._retrying(
            "GET", f"/fhir/R4/{resource_type}/{urllib.parse.quote(id, safe='')}")
        parsed = _parse(ctype, raw)
        if status >= 400:
            raise OperationOutcomeError(status, parsed)
        return parsed

    def read_reference(self, reference: Any) -> dict[str, Any]:
        """``{'reference': 'Patient/1'}`` or ``'Patient/1'`` → the resource."""
        ref = reference.get("reference") if isinstance(reference, Mapping) else reference
        if not isinstance(ref, str) or ref.count("/") != 1:
            raise ValueError(f"Not a relative reference: {ref!r}")
        resource_type, id = ref.split("/")
        return self.read_resource(resource_type, id)

    def update_resource(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        if not resource.get("id"):
            raise ValueError("update_resource needs a resource with an id")
        return self._json(
            "PUT",
            f"/fhir/R4/{_type(resource)}/{urllib.parse.quote(str(resource['id']), safe='')}",
            body=dict(resource),
        )

    def delete_resource(self, resource_type: str, id: str) -> Any:
        return self._json("DELETE", f"/fhir/R4/{resource_type}/{urllib.parse.quote(id, safe='')}")

    def search(self, resource_type: str, query: Any = None) -> dict[str, Any]:
        """The search Bundle; C{query} is a dict, a list of pairs or ``'a=1&b=2'``."""
        params: Any
        if query is None:
            params = {}
        elif isinstance(query, str):
            params = urllib.parse.parse_qsl(query.lstrip("?"), keep_blank_values=True)
        else:
            params = query
        status, ctype, raw = self._retrying("GET", f"/fhir/R4/{resource_type}", params=params)
        parsed = _parse(ctype, raw)
        if status >= 400:
            raise OperationOutcomeError(status, parsed)
        return parsed

    def search_resources(self, resource_type: str, query: Any = None) -> list[dict[str, Any]]:
        bundle = self.search(resource_type, query)
        return [e["resource"] for e in bundle.get("entry") or [] if "resource" in e]

    def search_one(self, resource_type: str, query: Any = None) -> dict[str, Any] | None:
        if isinstance(query, Mapping):
            query = {**query, "_count": 1}
        elif isinstance(query, str):
            query = (query + "&" if query else "") + "_count=1"
        found = self.search_resources(resource_type, query or {"_count": 1})
        return found[0] if found else None

    # -- push -----------------------------------------------------------------------------

    def push_to_agent(
        self,
        agent: Any,
        destination: Any,
        body: Any,
        content_type: str | None = None,
        wait_for_response: bool = False,
        wait_timeout: int | None = None,
        *,
        idempotency_key: str | None = None,
        return_ack: str | None = None,
    ) -> Any:
        """
        Push C{body} to C{destination} (a Device, ``Device/{id}``, ``Device?search`` or a URL
        such as ``mllp://host:port``) through C{agent}.  Waited: returns the device's answer
        (text, or parsed JSON).  Not waited: returns the 202 OperationOutcome, whose
        ``issue[0].diagnostics`` is the push's status URL.  Errors raise
        L{OperationOutcomeError}.  C{wait_timeout} is in milliseconds, as in Medplum.
        """
        path, payload, key = push_request(agent, destination, body, content_type,
                                          wait_for_response, wait_timeout=wait_timeout,
                                          return_ack=return_ack,
                                          idempotency_key=idempotency_key)
        http_timeout = (wait_timeout or 10_000) / 1000.0 + self.timeout
        status, ctype, raw = self._retrying(
            "POST",
            path,
            body=payload,
            content_type="application/json",
            headers={"Idempotency-Key": key} if key else None,
            timeout=http_timeout,
        )
        parsed = _parse(ctype, raw)
        if status >= 400:
            raise OperationOutcomeError(status, parsed)
        return parsed

    # -- Medplum spellings ------------------------------------------------------------------

    createResource = create_resource
    readResource = read_resource
    readReference = read_reference
    updateResource = update_resource
    deleteResource = delete_resource
    searchResources = search_resources
    searchOne = search_one

    def pushToAgent(self, agent: Any, destination: Any, body: Any,
                    contentType: str | None = None, waitForResponse: bool = False,
                    options: Mapping[str, Any] | None = None) -> Any:
        options = options or {}
        return self.push_to_agent(agent, destination, body, contentType, waitForResponse,
                                  options.get("waitTimeout"))


def _type(resource: Mapping[str, Any]) -> str:
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        raise ValueError("resource needs a resourceType")
    return resource_type


def _read(resp: Any) -> bytes:
    data = resp.read(MAX_RESPONSE + 1)
    if len(data) > MAX_RESPONSE:
        raise OperationOutcomeError(502, f"Response larger than {MAX_RESPONSE} bytes")
    return data


def _parse(ctype: str, raw: bytes) -> Any:
    if "json" in (ctype or "").lower():
        try:
            return json.loads(raw)
        except ValueError:
            pass
    return raw.decode("utf-8", "replace")
