"""
Inbound channels (device → cloud), configured in the cloud as Medplum does it:
``Agent.channel[]`` names an ``Endpoint`` whose ``address`` says what to listen on.

    mllp://0.0.0.0:2575?enhanced=true&appLevelAck=ER&encoding=latin-1   HL7 v2 listener
    astm://0.0.0.0:15200                                                 ASTM over TCP
    astm+serial:///dev/ttyUSB0?baudrate=9600                             ASTM over a serial port
    dicom://AGENT_AE@0.0.0.0:11112?allowed=MODALITY1,MODALITY2           C-STORE / C-ECHO SCP
    dicom-mwl://WORKLIST_AE@0.0.0.0:11113                                worklist + MPPS SCP

Each protocol package declares the channel schemes it serves (L{medagent.schemes}); this
manager only diffs the configuration and starts what the registry builds.

Channels start when the agent first connects and change on ``$reload-config`` without
touching the channels whose settings did not change.  Everything a channel receives goes up
through the agent's durable L{Outbox}.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import attr
from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger

from medagent import schemes
from medagent._twisted import ChildService
from medagent.agent.outbox import Outbox
from medagent.destination import Destination, DestinationError, parse_destination

log = Logger()

class ChannelConfigError(ValueError):
    pass


@attr.s(frozen=True, auto_attribs=True)
class ChannelSpec:
    name: str
    address: str


def listen_endpoint(destination: Destination) -> str:
    host = destination.host if destination.host not in ("", "*") else "0.0.0.0"
    return f"tcp:{destination.port}:interface={host}"


class ChannelManager(service.MultiService):
    def __init__(
        self,
        reactor: Any,
        outbox: Outbox,
        fetch_config: Callable[[], Deferred],
        data_dir: str,
        upload_binary: Callable[[str, str], Deferred] | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.outbox = outbox
        self.fetch_config = fetch_config
        self.data_dir = data_dir
        #: (path, content type) → Deferred[reference]: a stored instance becomes a Binary
        self.upload_binary = upload_binary
        self.running_specs: dict[str, tuple[ChannelSpec, ChildService, Any]] = {}
        self.worklists: dict[str, Any] = {}

    # -- configuration -----------------------------------------------------------------------

    def reload(self) -> Deferred[None]:
        """Fetch ``Agent`` + ``Endpoint``s and apply the difference."""
        return self.fetch_config().addCallback(self.apply)

    def apply(self, specs: list[ChannelSpec]) -> Deferred[None]:
        seen: set[int] = set()
        for spec in specs:
            try:
                port = parse_destination(spec.address, needs_port=False).port
            except DestinationError as e:
                raise ChannelConfigError(f"Channel {spec.name!r}: {e}")
            if port is not None:
                if port in seen:
                    raise ChannelConfigError(f"Two channels listen on port {port}")
                seen.add(port)
        wanted = {s.name: s for s in specs}
        stops = []
        for name, (spec, svc, _) in list(self.running_specs.items()):
            if wanted.get(name) != spec:
                log.info("Channel {name}: stopping", name=name)
                stops.append(self._stop(name))

        def start_new(_: Any) -> None:
            for name, spec in wanted.items():
                if name in self.running_specs:
                    continue
                try:
                    self._start(spec)
                except (ChannelConfigError, DestinationError, ValueError) as e:
                    log.error("Channel {name} not started: {error}", name=name, error=str(e))

        return DeferredList(stops, consumeErrors=True).addCallback(start_new)

    def _stop(self, name: str) -> Deferred[Any]:
        spec, svc, app = self.running_specs.pop(name)
        self.worklists.pop(name.lower(), None)
        d = maybeDeferred(svc.disownServiceParent)
        closer = getattr(app, "close_connections", None)
        if closer is not None:
            d.addBoth(lambda r: (closer(), r)[1])
        return d

    def _start(self, spec: ChannelSpec) -> None:
        destination = parse_destination(spec.address, needs_port=False)
        scheme = destination.scheme
        name = spec.name
        factory = schemes.channel_factories().get(scheme)
        if factory is None:
            raise ChannelConfigError(
                f"Unsupported channel address scheme {scheme}:// "
                f"(supported: {', '.join(schemes.channel_schemes())})")

        def register_worklist(app: Any) -> None:
            self.worklists[name.lower()] = app

        context = schemes.ChannelContext(
            name=name,
            address=spec.address,
            destination=destination,
            endpoint=listen_endpoint(destination),
            data_dir=self.data_dir,
            safe_name=_safe_name(name),
            forward=lambda ct, body, remote: self.outbox.forward(name, ct, body, remote),
            forward_and_wait=self._waiting_forward(name),
            forward_instance=self._instance_forward(name),
            register_worklist=register_worklist,
        )
        svc, app = factory(self.reactor, context)
        svc.setServiceParent(self)
        self.running_specs[name] = (spec, svc, app)
        log.info("Channel {name}: {scheme} on {where}", name=name, scheme=scheme,
                 where=destination.path or f"{destination.host}:{destination.port}")

    def _waiting_forward(self, name: str) -> Callable[[str, str, str], Deferred]:
        """For channels that wait for one answer per message (ASTM, DICOM)."""
        return lambda ct, body, remote: self.outbox.forward_and_wait(name, ct, body, remote)

    def _instance_forward(self, name: str) -> Callable[[str, str, str], Deferred]:
        """
        DICOM instances: the Part 10 file (on the agent's disk already) is uploaded as a
        ``Binary`` first, and the metadata goes up with its reference instead of the local
        path.  A failure leaves the instance pending; the channel forwards it again later.
        """
        forward = self._waiting_forward(name)
        upload_binary = self.upload_binary
        if upload_binary is None:
            return forward

        def instance(ct: str, body: str, remote: str) -> Deferred:
            doc = json.loads(body)
            info = doc.get("instance") or {}

            def uploaded(reference: str) -> Deferred:
                doc["binary"] = {"reference": reference}
                info.pop("path", None)
                return forward(ct, json.dumps(doc), remote)

            return upload_binary(info["path"], "application/dicom").addCallback(uploaded)

        return instance

    def worklist(self, name: str) -> Any:
        return self.worklists.get(name.lower())


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "channel"


def specs_from_resources(agent: dict[str, Any], endpoints: dict[str, dict[str, Any]]
                         ) -> list[ChannelSpec]:
    """``Agent.channel[]`` + the ``Endpoint``s they reference → the channels to run."""
    specs = []
    for channel in agent.get("channel") or []:
        name = channel.get("name")
        ref = ((channel.get("endpoint") or {}).get("reference") or "")
        endpoint = endpoints.get(ref.split("/", 1)[-1])
        if not name or endpoint is None:
            log.info("Agent channel {name} has no endpoint here ({ref}): nothing to listen on",
                     name=name, ref=ref or "none")
            continue
        if endpoint.get("status") == "off":
            log.info("Channel {name}: endpoint is off", name=name)
            continue
        address = endpoint.get("address")
        if not address:
            log.warn("Channel {name}: endpoint has no address; skipped", name=name)
            continue
        specs.append(ChannelSpec(name=name, address=address))
    return specs
