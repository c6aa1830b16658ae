"""
The relay's HTTP API, split by responsibility (L{medagent.relay.web} builds the Site):

  - L{router}: the route table (a twisted.web resource tree, then a table of FHIR paths) and
    the one place that turns a handler's L{Response} or L{FHIRError} into bytes;
  - L{context}: L{RouteContext} (what every handler gets), L{Response} and body helpers;
  - L{oauth}: the token endpoint, ``auth/me`` and ``ClientApplication/{id}/$revoke``;
  - L{fhir_rest}: read, search, create, update, delete of the resources we keep;
  - L{agent_ops}: the Agent operations besides ``$push``, also in their type-level bulk form;
  - L{pushes}: ``$push`` and the AgentPush status, list, cancel and retry.

Handlers are coroutines C{(RouteContext) -> Response} that raise L{medagent.fhir.FHIRError}
for an error; the router answers both, so every error is an C{OperationOutcome}.
"""
