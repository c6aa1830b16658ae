"""
Delivery to ``http(s)`` endpoints: the ``X-Signature`` HMAC and the HTTP POST.  The guard
against requests to internal addresses (SSRF) is L{medagent.relay.webhooks}'s; every
connection the poster makes goes through it.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Callable, Mapping

from twisted.internet.defer import Deferred, ensureDeferred

from medagent.relay.webhooks import GuardedEndpointFactory, WebhookPolicy

#: Bytes of a webhook's answer we read (and drop) before giving up on the connection.
MAX_HOOK_RESPONSE = 64 * 1024


def sign(secret: str, body: bytes) -> str:
    """``X-Signature``: hex HMAC-SHA256 of the exact body bytes, keyed by the secret."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


Poster = Callable[[str, bytes, Mapping[str, str], float], Deferred]


def treq_poster(reactor: Any, policy: WebhookPolicy | None = None
                ) -> tuple[Poster, Callable[[], Deferred]]:
    """
    An HTTP POST for URL endpoints (treq, own pool) and the function that closes it.  Every
    connection goes through L{GuardedEndpointFactory}: resolved, checked against the
    L{WebhookPolicy}, connected to the checked address; redirects are not followed.
    """
    import treq
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 4
    agent = Agent.usingEndpointFactory(
        reactor, GuardedEndpointFactory(reactor, policy or WebhookPolicy()), pool=pool)
    client = HTTPClient(agent)

    async def post(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> int:
        # treq's stub wants exactly this (invariant) dict type.
        request_headers: dict[bytes | str, list[bytes | str]] = {
            k: [v] for k, v in headers.items()}
        response = await client.post(url, data=body, headers=request_headers,
                                     allow_redirects=False, timeout=timeout)
        seen = [0]

        def drain(data: bytes) -> None:
            seen[0] += len(data)
            if seen[0] > MAX_HOOK_RESPONSE:
                raise ValueError("webhook response too large")

        try:
            await treq.collect(response, drain)  # read it, so the connection can be reused
        except Exception:
            pass  # the status is what counts; an oversized body just loses the connection
        return response.code

    return ((lambda *a: ensureDeferred(post(*a))), pool.closeCachedConnections)
