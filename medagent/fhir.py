"""
FHIR bits shared by relay and client: OperationOutcome building and reading, errors that carry
an HTTP status, Parameters flattening.  No I/O.
"""

from __future__ import annotations

from typing import Any, Mapping

from medagent.contenttypes import HL7_V2


class FHIRError(Exception):
    """
    A request that fails with an HTTP status and an C{OperationOutcome} saying why.
    C{code} is the FHIR issue type (``invalid``, ``not-found``, ``security``...).
    """

    def __init__(
        self,
        status: int,
        message: str,
        code: str = "invalid",
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.message, code=self.code, severity="error")


def bad_request(message: str) -> FHIRError:
    return FHIRError(400, message, "invalid")


def not_found(message: str) -> FHIRError:
    return FHIRError(404, message, "not-found")


def unauthorized(message: str = "Unauthorized") -> FHIRError:
    return FHIRError(401, message, "login", headers={"WWW-Authenticate": 'Bearer realm="medagent"'})


def forbidden(message: str = "Forbidden") -> FHIRError:
    return FHIRError(403, message, "forbidden")


def operation_outcome(
    text: str,
    *,
    code: str = "informational",
    severity: str = "information",
    id: str | None = None,
    diagnostics: str | None = None,
) -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": severity, "code": code, "details": {"text": text}}
    if diagnostics is not None:
        issue["diagnostics"] = diagnostics
    outcome: dict[str, Any] = {"resourceType": "OperationOutcome", "issue": [issue]}
    if id is not None:
        outcome = {"resourceType": "OperationOutcome", "id": id, "issue": [issue]}
    return outcome


def outcome_text(outcome: Any) -> str:
    """The human text of an OperationOutcome (for errors raised by the client)."""
    if not isinstance(outcome, Mapping):
        return str(outcome)
    texts = []
    for issue in outcome.get("issue") or []:
        if not isinstance(issue, Mapping):
            continue
        text = (issue.get("details") or {}).get("text") or issue.get("diagnostics")
        if text:
            texts.append(str(text))
    return "; ".join(texts) or "Unknown error"


def parameters_to_dict(resource: Mapping[str, Any]) -> dict[str, Any]:
    """
    Flatten a FHIR C{Parameters} resource to ``{name: value}``, taking whichever ``value[x]``
    is present (Medplum only reads ``valueString``; we take them all).
    """
    out: dict[str, Any] = {}
    params = resource.get("parameter") or []
    if not isinstance(params, list):
        raise bad_request("Parameters.parameter must be a list")
    for param in params:
        if not isinstance(param, Mapping) or not isinstance(param.get("name"), str):
            raise bad_request("Each Parameters.parameter needs a name")
        value: Any = None
        for key, v in param.items():
            if key.startswith("value"):
                value = v
                break
        else:
            if "resource" in param:
                value = param["resource"]
        out[param["name"]] = value
    return out


def reference_id(ref: Any, resource_type: str) -> str:
    """``'abc'``, ``'Agent/abc'``, ``{'reference': 'Agent/abc'}`` or a resource → ``'abc'``."""
    if isinstance(ref, Mapping):
        if ref.get("id"):
            return str(ref["id"])
        ref = ref.get("reference", "")
    ref = str(ref)
    return ref.split("/", 1)[1] if ref.startswith(resource_type + "/") else ref


def destination_text(dest: Any) -> str:
    """A Device resource, a reference or a string → the ``destination`` of a push."""
    if isinstance(dest, Mapping):
        if dest.get("reference"):
            return str(dest["reference"])
        if dest.get("resourceType") and dest.get("id"):
            return f"{dest['resourceType']}/{dest['id']}"
        raise ValueError("destination must be a Device, a reference, or a string")
    return str(dest)



def push_request(
    agent: Any,
    destination: Any,
    body: Any,
    content_type: str | None,
    wait_for_response: bool,
    *,
    wait_timeout: int | None = None,
    return_ack: str | None = None,
    ttl: float | None = None,
    idempotency_key: str | None = None,
) -> tuple[str, dict[str, Any], str | None]:
    """
    The ``$push`` call of both clients (ours over treq, the bots' synchronous one): the path,
    the JSON body (Medplum's field names; absent values left out) and the idempotency key.
    HL7 v2 is recognised by its MSH-10; anything else gets a key per call, so a retry after a
    lost connection is recognised too.
    """
    from urllib.parse import quote
    import uuid

    payload: dict[str, Any] = {
        "destination": destination_text(destination),
        "body": body,
        "contentType": content_type,
        "waitForResponse": bool(wait_for_response),
        "waitTimeout": int(wait_timeout) if wait_timeout is not None else None,
        "returnAck": return_ack,
        "ttl": ttl,
    }
    payload = {k: v for k, v in payload.items() if v is not None}
    key = idempotency_key or (None if content_type == HL7_V2 else str(uuid.uuid4()))
    path = f"/fhir/R4/Agent/{quote(reference_id(agent, 'Agent'), safe='')}/$push"
    return path, payload, key
