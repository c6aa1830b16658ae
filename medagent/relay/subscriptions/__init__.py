"""
FHIR Subscriptions (``rest-hook``) with durable, retried, ordered delivery.

- L{criteria}: ``Subscription.criteria`` and whether a resource matches it (pure);
- L{spec}: what a Subscription resource asks for, checked once when it is written;
- L{webhook}: the HMAC signature and the HTTP POST to ``http(s)`` endpoints (through the
  SSRF guard of L{medagent.relay.webhooks});
- L{manager}: L{SubscriptionManager}, which matches writes and delivers them (to a Bot or a
  URL), retried with backoff, in order, each attempt audited.

The names other modules use are importable from here.
"""

from medagent.relay.subscriptions.criteria import Criteria, CriteriaError, matches, parse_criteria
from medagent.relay.subscriptions.manager import (
    SKIP_TYPES,
    SubscriptionManager,
    delivery_rows,
    no_jitter,
    retry_delay,
)
from medagent.relay.subscriptions.spec import (
    DEFAULT_MAX_ATTEMPTS,
    EXT_FHIRPATH,
    EXT_INTERACTION,
    EXT_MAX_ATTEMPTS,
    EXT_SECRET,
    INTERACTIONS,
    MAX_ATTEMPTS_CAP,
    Spec,
    subscription_spec,
)
from medagent.relay.subscriptions.webhook import MAX_HOOK_RESPONSE, Poster, sign, treq_poster
from medagent.storage.records import (  # the states are also this package's vocabulary
    CANCELLED,
    DELIVERED,
    FAILED,
    PENDING,
)

__all__ = [
    "CANCELLED", "DEFAULT_MAX_ATTEMPTS", "DELIVERED", "EXT_FHIRPATH", "EXT_INTERACTION",
    "EXT_MAX_ATTEMPTS", "EXT_SECRET", "FAILED", "INTERACTIONS", "MAX_ATTEMPTS_CAP",
    "MAX_HOOK_RESPONSE", "PENDING", "SKIP_TYPES", "Criteria", "CriteriaError", "Poster",
    "Spec", "SubscriptionManager", "delivery_rows", "matches", "no_jitter", "parse_criteria",
    "retry_delay", "sign", "subscription_spec", "treq_poster",
]
