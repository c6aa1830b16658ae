"""
The DICOM schemes: ``dicom://`` (C-STORE / C-ECHO) destinations and storage channels,
``worklist://`` pushes into a ``dicom-mwl://`` worklist channel.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medagent.schemes import ChannelContext, SenderContext


def dicom_sender(reactor: Any, context: SenderContext) -> Any:
    from medagent.dicom.scu import DICOMSender

    return DICOMSender(reactor)


def worklist_sender(reactor: Any, context: SenderContext) -> Any:
    from medagent.dicom.worklist import WorklistSender

    return WorklistSender(context.worklist)


def storage_channel(reactor: Any, context: ChannelContext) -> tuple[Any, Any]:
    from medagent.dicom.scp import StorageChannel

    channel = StorageChannel(
        context.forward_instance,
        reactor=reactor,
        ae_title=context.destination.user or "MEDAGENT",
        storage_dir=os.path.join(context.data_dir, "dicom", context.safe_name),
        endpoint=context.endpoint,
        allowed_calling=_list(context.destination.param("allowed")),
    )
    return channel, channel


def worklist_channel(reactor: Any, context: ChannelContext) -> tuple[Any, Any]:
    from medagent.dicom.worklist import WorklistChannel

    channel = WorklistChannel(
        context.forward_and_wait,
        reactor=reactor,
        name=context.name,
        ae_title=context.destination.user or "MEDAGENT",
        db_path=os.path.join(context.data_dir, f"worklist-{context.safe_name}.sqlite"),
        endpoint=context.endpoint,
        allowed_calling=_list(context.destination.param("allowed")),
    )
    context.register_worklist(channel)
    return channel, channel


def _list(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


SENDERS = {"dicom": dicom_sender, "worklist": worklist_sender}
CHANNELS = {"dicom": storage_channel, "dicom-mwl": worklist_channel}
