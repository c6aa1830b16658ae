"""
The answer policy of an agent's MLLP channel as pure functions: which acknowledgements a
device gets for one message in each channel mode (``original``, ``enhanced``, ``aa``), what of
the cloud's reply is passed on, and in which codec.

No Deferreds, no I/O, no logging: L{medagent.hl7.channel.MLLPChannel} asks these functions at
each point of its conversation (the forward has fired, the cloud has answered, the forward
failed, a frame is unusable) and does the sending and the logging itself.  Kept apart so that
every decision of the three modes can be tested on its own, without a connection or a clock.
"""

from __future__ import annotations

import attr

from medagent.delivery import Reply
from medagent.hl7 import message as hl7msg
from medagent.hl7.message import HL7Error
from medagent.hl7.mllp import WIDE_CODECS

CHANNEL_MODES = ("original", "enhanced", "aa")
APP_LEVEL_ACKS = ("AL", "ER", "NE", "SU")

#: The error text of the AE we build when the cloud gave no usable HL7 acknowledgement.
NO_APP_ACK = "No HL7 acknowledgement from the receiving application"

# Why a cloud reply is not used, or is used with a remark (CloudAnswer.issue), for the log.
NO_REPLY = "no-reply"  # the forward brought no reply at all
ERROR_STATUS = "error-status"  # status 400 or more
NOT_HL7 = "not-hl7"  # the body is not HL7
NO_MSA = "no-msa"  # HL7 without MSA: a response message, passed on as is
OTHER_ID = "other-id"  # an ACK for another control id: passed on as is, but remarked


def check_settings(mode: str, app_level_ack: str) -> str:
    """
    Check a channel's C{mode} and C{app_level_ack} (raising C{ValueError} with the allowed
    values), so that a misconfigured listener fails when it starts, not per message.
    Returns C{app_level_ack} upper-cased.
    """
    if mode not in CHANNEL_MODES:
        raise ValueError(f"MLLP channel mode must be one of {', '.join(CHANNEL_MODES)}")
    app_level_ack = app_level_ack.upper()
    if app_level_ack not in APP_LEVEL_ACKS:
        raise ValueError(f"appLevelAck must be one of {', '.join(APP_LEVEL_ACKS)}")
    return app_level_ack


@attr.s(frozen=True, auto_attribs=True)
class Answer:
    """
    One answer to the device: an acknowledgement the channel builds from the message
    (C{code} as MSA-1, C{error} as the text of a negative one), or the cloud's HL7 text passed
    on as is (C{body}).  The channel builds and encodes it; deciding needs neither.
    """

    code: str = ""
    error: str | None = None
    body: str | None = None

    @classmethod
    def built(cls, code: str, error: str | None = None) -> "Answer":
        """An ACK with MSA-1 C{code}, built by the channel from the device's message."""
        return cls(code=code, error=error)

    @classmethod
    def passed(cls, body: str) -> "Answer":
        """The cloud's answer C{body}, sent to the device as it is."""
        return cls(body=body)


@attr.s(frozen=True, auto_attribs=True)
class CloudAnswer:
    """
    What the cloud's reply gives the device: C{body}, the normalised HL7 text to pass on (None
    when nothing in it is usable), and C{issue}, why it is not used or what is odd about it
    (empty when it is a plain ACK for the message), with the details the log needs.
    """

    body: str | None
    issue: str = ""
    status: int = 0
    error: str = ""
    ack_id: str = ""


def read_cloud_answer(reply: Reply | None, control_id: str) -> CloudAnswer:
    """
    The usable HL7 answer in the cloud's C{reply} to the message C{control_id}: none for no
    reply, an error status or a body that is not HL7; an HL7 response without MSA, or an ACK
    for another control id, is still passed on (the device may expect it).
    """
    if reply is None:
        return CloudAnswer(None, NO_REPLY)
    if reply.status_code >= 400:
        return CloudAnswer(None, ERROR_STATUS, status=reply.status_code)
    try:
        body = hl7msg.normalise(reply.body)
    except HL7Error as e:
        return CloudAnswer(None, NOT_HL7, error=str(e))
    try:
        ack = hl7msg.parse_ack(body)
    except HL7Error:
        return CloudAnswer(body, NO_MSA)
    if ack.control_id != control_id:
        return CloudAnswer(body, OTHER_ID, ack_id=ack.control_id)
    return CloudAnswer(body)


def ack_code(text: str) -> str | None:
    """MSA-1 of C{text}, or None if it is not an acknowledgement."""
    try:
        return hl7msg.parse_ack(text).code
    except HL7Error:
        return None


def should_send_app_ack(app_level_ack: str, code: str | None) -> bool:
    """
    Enhanced mode: whether an application answer with MSA-1 C{code} (None: a response
    without MSA) goes to the device under C{app_level_ack} (MSH-16 semantics): ``AL`` always,
    ``NE`` never, ``ER`` only if not AA, ``SU`` only if AA.  Anything but AA/AE/AR (a response,
    a commit code) always goes: the rule is about application acknowledgements only.
    """
    if code not in ("AA", "AE", "AR"):
        return True
    if app_level_ack == "AL":
        return True
    if app_level_ack == "NE":
        return False
    if app_level_ack == "ER":
        return code != "AA"
    return code == "AA"  # SU


def commit_answers(mode: str) -> list[Answer]:
    """
    What the device gets as soon as the forward has fired (the message is ours now, on disk
    or with the cloud): ``CA`` in enhanced mode, ``AA`` in aa mode, nothing in original mode,
    which answers with the cloud's acknowledgement only.
    """
    if mode == "enhanced":
        return [Answer.built("CA")]
    if mode == "aa":
        return [Answer.built("AA")]
    return []


def waits_for_cloud(mode: str) -> bool:
    """
    Whether a stored message (the agent's durable outbox: the cloud answers later) keeps the
    device waiting for the cloud's answer: only in original mode, where that answer is the
    only one the device gets.  Enhanced and aa modes answer at once and take the next message.
    """
    return mode == "original"


def uses_cloud_answer(mode: str) -> bool:
    """Whether the cloud's answer reaches the device at all (not in aa mode)."""
    return mode != "aa"


def application_answers(
    mode: str, app_level_ack: str, cloud_body: str | None, *, stored: bool = False
) -> list[Answer]:
    """
    What the device gets once the cloud has answered, C{cloud_body} being the usable HL7 of
    that answer (None: nothing usable; see L{read_cloud_answer}), after L{commit_answers}:

      - original: the cloud's answer, else an AE built by us (never silence);
      - enhanced: the cloud's answer, if L{should_send_app_ack} lets it through.  Without one,
        nothing more than the CA after a direct forward; after a stored forward
        (C{stored}: the device has its CA and has moved on) an AE built by us under the same
        rule, so that the sender still learns that the application did not answer;
      - aa: nothing (the device has its AA and is not told the cloud's answer).
    """
    if mode == "aa":
        return []
    if mode == "enhanced":
        if cloud_body is not None:
            answer, code = Answer.passed(cloud_body), ack_code(cloud_body)
        elif stored:
            answer, code = Answer.built("AE", NO_APP_ACK), "AE"
        else:
            return []
        return [answer] if should_send_app_ack(app_level_ack, code) else []
    if cloud_body is None:
        return [Answer.built("AE", NO_APP_ACK)]
    return [Answer.passed(cloud_body)]


def failure_answer(mode: str, reason: str) -> Answer:
    """
    The device's answer when the forward failed or timed out (the message is not ours):
    ``CE`` in enhanced mode, else ``AE``, with C{reason}: the device learns it was not taken.
    """
    code = "CE" if mode == "enhanced" else "AE"
    return Answer.built(code, f"Message not accepted: {reason}")


def reject_code(mode: str) -> str:
    """MSA-1 for a frame that is not a usable HL7 message, or is too large: CR or AR."""
    return "CR" if mode == "enhanced" else "AR"


def answer_codec(encoding: str | None, text: str, fallback: str = "utf-8") -> str:
    """
    The codec of an answer C{text}: the channel's C{encoding}, else the answer's MSH-18, else
    C{fallback}; an unknown codec, or one whose bytes MLLP cannot carry (UTF-16/32), becomes
    C{fallback}.
    """
    codec = encoding
    if codec is None:
        try:
            codec = hl7msg.charset(text)
        except HL7Error:
            codec = None
    codec = codec or fallback
    try:
        codec = hl7msg.check_codec(codec)
    except HL7Error:
        codec = fallback
    return fallback if codec.startswith(WIDE_CODECS) else codec
