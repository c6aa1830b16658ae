"""The ASTM schemes: ``astm://`` (TCP) and ``astm+serial://`` destinations and channels."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medagent.schemes import ChannelContext, SenderContext


def astm_sender(reactor: Any, context: SenderContext) -> Any:
    from medagent.astm.sender import ASTMSender

    return ASTMSender(reactor, on_inbound=context.astm_inbound)


def astm_channel(reactor: Any, context: ChannelContext) -> tuple[Any, Any]:
    from medagent.astm.channel import ASTMChannel

    kw: dict[str, Any] = ({"serial": context.address}
                          if context.destination.scheme == "astm+serial"
                          else {"endpoint": context.endpoint})
    channel = ASTMChannel(context.forward_and_wait, reactor=reactor, name=context.name, **kw)
    return channel, channel


SENDERS = {"astm": astm_sender, "astm+serial": astm_sender}
CHANNELS = {"astm": astm_channel, "astm+serial": astm_channel}
