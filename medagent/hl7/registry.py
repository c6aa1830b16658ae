"""The HL7 v2 schemes: ``mllp://`` / ``mllps://`` destinations and the ``mllp://`` channel."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medagent.schemes import ChannelContext, SenderContext


def mllp_sender(reactor: Any, context: SenderContext) -> Any:
    from medagent.hl7.sender import MLLPSender

    return MLLPSender(reactor, tls_ca=context.tls_ca, tls_cert=context.tls_cert,
                      tls_key=context.tls_key)


def mllp_channel(reactor: Any, context: ChannelContext) -> tuple[Any, Any]:
    from twisted.application import strports

    from medagent.hl7.channel import MLLPChannel

    destination = context.destination
    enhanced = (destination.param("enhanced") or "").lower()
    mode = {"true": "enhanced", "aa": "aa"}.get(enhanced, "original")
    app = MLLPChannel(
        context.forward,
        mode=mode,
        encoding=destination.param("encoding") or None,
        app_level_ack=destination.param("appLevelAck") or "AL",
        clock=reactor,
        name=context.name,
    )
    # MLLPChannel is a Factory, which provides IProtocolFactory via @implementer (unseen by mypy).
    return strports.service(context.endpoint, app, reactor=reactor), app  # type: ignore[arg-type]


SENDERS = {"mllp": mllp_sender, "mllps": mllp_sender}
CHANNELS = {"mllp": mllp_channel}
