"""
The MLLP channel's answer policy (medagent.hl7.acking) as plain functions: every decision of
the original, enhanced and aa modes, without a connection, a clock or a Deferred.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from medagent.contenttypes import HL7_V2
from medagent.delivery import Reply
from medagent.hl7 import acking
from medagent.hl7.acking import NO_APP_ACK, Answer
from medagent.hl7.message import build_ack
from tests.hl7_fakes import orm

MODES = ("original", "enhanced", "aa")


def ack(cid: str, code: str) -> str:
    return build_ack(orm(cid), code)


class SettingsTests(SynchronousTestCase):
    def test_modes_and_levels_are_checked(self) -> None:
        for mode in MODES:
            self.assertEqual(acking.check_settings(mode, "AL"), "AL")
        self.assertEqual(acking.check_settings("enhanced", "er"), "ER")
        e = self.assertRaises(ValueError, acking.check_settings, "fast", "AL")
        self.assertIn("original, enhanced, aa", str(e))
        e = self.assertRaises(ValueError, acking.check_settings, "enhanced", "XX")
        self.assertIn("AL, ER, NE, SU", str(e))


class ReadCloudAnswerTests(SynchronousTestCase):
    def test_an_ack_for_the_message_is_passed_on(self) -> None:
        body = ack("M1", "AE")
        read = acking.read_cloud_answer(Reply(body.replace("\r", "\n"), HL7_V2), "M1")
        self.assertEqual((read.body, read.issue), (body, ""))

    def test_nothing_usable(self) -> None:
        self.assertEqual(acking.read_cloud_answer(None, "M1").issue, acking.NO_REPLY)
        read = acking.read_cloud_answer(Reply(ack("M1", "AA"), HL7_V2, status_code=400), "M1")
        self.assertEqual((read.body, read.issue, read.status), (None, acking.ERROR_STATUS, 400))
        read = acking.read_cloud_answer(Reply("Bot execution logs:\n...", "text/plain"), "M1")
        self.assertEqual((read.body, read.issue), (None, acking.NOT_HL7))
        self.assertIn("MSH", read.error)

    def test_odd_but_passed_on(self) -> None:
        read = acking.read_cloud_answer(Reply(orm("R1"), HL7_V2), "M1")
        self.assertEqual((read.body, read.issue), (orm("R1"), acking.NO_MSA))
        other = ack("M2", "AA")
        read = acking.read_cloud_answer(Reply(other, HL7_V2), "M1")
        self.assertEqual((read.body, read.issue, read.ack_id), (other, acking.OTHER_ID, "M2"))


class AppLevelAckTests(SynchronousTestCase):
    def test_rules(self) -> None:
        expected = {
            "AL": {"AA": True, "AE": True, "AR": True},
            "NE": {"AA": False, "AE": False, "AR": False},
            "ER": {"AA": False, "AE": True, "AR": True},
            "SU": {"AA": True, "AE": False, "AR": False},
        }
        for level, codes in expected.items():
            for code, send in codes.items():
                self.assertEqual(acking.should_send_app_ack(level, code), send, (level, code))
            # A commit code or a response without MSA is not an application ACK: always sent.
            for code in ("CA", "CE", "CR", None):
                self.assertTrue(acking.should_send_app_ack(level, code), (level, code))

    def test_ack_code(self) -> None:
        self.assertEqual(acking.ack_code(ack("M1", "AR")), "AR")
        self.assertIsNone(acking.ack_code(orm("R1")))
        self.assertIsNone(acking.ack_code("not hl7"))


class ModeTests(SynchronousTestCase):
    def test_commit_answers(self) -> None:
        self.assertEqual(acking.commit_answers("original"), [])
        self.assertEqual(acking.commit_answers("enhanced"), [Answer.built("CA")])
        self.assertEqual(acking.commit_answers("aa"), [Answer.built("AA")])

    def test_which_modes_wait_for_and_use_the_cloud(self) -> None:
        self.assertEqual([m for m in MODES if acking.waits_for_cloud(m)], ["original"])
        self.assertEqual([m for m in MODES if acking.uses_cloud_answer(m)],
                         ["original", "enhanced"])

    def test_original(self) -> None:
        body = ack("M1", "AR")
        for level in ("AL", "NE"):  # appLevelAck is an enhanced-mode setting
            for stored in (False, True):
                self.assertEqual(acking.application_answers("original", level, body,
                                                            stored=stored),
                                 [Answer.passed(body)])
                self.assertEqual(acking.application_answers("original", level, None,
                                                            stored=stored),
                                 [Answer.built("AE", NO_APP_ACK)])

    def test_enhanced_passes_the_cloud_answer_per_app_level_ack(self) -> None:
        error = ack("M1", "AE")
        for stored in (False, True):
            self.assertEqual(acking.application_answers("enhanced", "ER", error, stored=stored),
                             [Answer.passed(error)])
            self.assertEqual(acking.application_answers("enhanced", "ER", ack("M1", "AA"),
                                                        stored=stored), [])
            self.assertEqual(acking.application_answers("enhanced", "NE", orm("R1"),
                                                        stored=stored),
                             [Answer.passed(orm("R1"))])

    def test_enhanced_without_a_cloud_answer(self) -> None:
        # After a direct forward the CA is all; after a stored one the sender learns it.
        for level in ("AL", "ER", "NE", "SU"):
            self.assertEqual(acking.application_answers("enhanced", level, None), [], level)
        self.assertEqual(acking.application_answers("enhanced", "AL", None, stored=True),
                         [Answer.built("AE", NO_APP_ACK)])
        self.assertEqual(acking.application_answers("enhanced", "ER", None, stored=True),
                         [Answer.built("AE", NO_APP_ACK)])
        self.assertEqual(acking.application_answers("enhanced", "NE", None, stored=True), [])
        self.assertEqual(acking.application_answers("enhanced", "SU", None, stored=True), [])

    def test_aa_never_sends_the_cloud_answer(self) -> None:
        for body in (ack("M1", "AE"), None):
            for stored in (False, True):
                self.assertEqual(acking.application_answers("aa", "AL", body, stored=stored), [])

    def test_failures_and_rejects(self) -> None:
        self.assertEqual(acking.failure_answer("original", "relay down"),
                         Answer.built("AE", "Message not accepted: relay down"))
        self.assertEqual(acking.failure_answer("enhanced", "relay down"),
                         Answer.built("CE", "Message not accepted: relay down"))
        self.assertEqual(acking.failure_answer("aa", "relay down").code, "AE")
        self.assertEqual([acking.reject_code(m) for m in MODES], ["AR", "CR", "AR"])


class CodecTests(SynchronousTestCase):
    def test_answer_codec(self) -> None:
        latin = orm("M1", msh18="8859/1")
        self.assertEqual(acking.answer_codec(None, orm("M1")), "utf-8")
        self.assertEqual(acking.answer_codec(None, orm("M1"), "cp1252"), "cp1252")
        self.assertEqual(acking.answer_codec(None, latin), "iso8859-1")
        self.assertEqual(acking.answer_codec("cp1252", latin), "cp1252")  # the channel's wins
        # MLLP cannot carry UTF-16; an unknown MSH-18 is not guessed at.
        self.assertEqual(acking.answer_codec(None, orm("M1", msh18="UNICODE UTF-16"), "ascii"),
                         "ascii")
        self.assertEqual(acking.answer_codec(None, orm("M1", msh18="KLINGON"), "ascii"), "ascii")
