"""
Every content type medagent names, in one place: what a push's ``contentType`` may say, what
a device's answer comes back as, and which types count as JSON or text.  Constants only (no
imports), so the relay, the agent, the protocol packages and the bot worker share them.
"""

from __future__ import annotations

#: HL7 v2 in ER7 ("pipe") encoding, as Medplum names it.
HL7_V2 = "x-application/hl7-v2+er7"
#: ASTM E1394 records.
ASTM = "x-application/astm"
#: Reachability check (TCP connect, ENQ probe, C-ECHO by scheme).
PING = "x-application/ping"
#: A DICOM Part 10 file, base64 in the push's body.
DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
#: Raw bytes, base64 in the push's body.
OCTET_STREAM = "application/octet-stream"
TEXT = "text/plain"
JSON = "application/json"
FHIR_JSON = "application/fhir+json"

#: Request/response bodies that are JSON (FHIR's own and its legacy spelling included).
JSON_TYPES = (JSON, FHIR_JSON, "application/json+fhir")
#: The spellings of HL7 v2 a Bot's ``$execute`` accepts as HL7.
HL7_TYPES = (HL7_V2, "application/hl7-v2", "application/hl7-v2+er7")
#: Input content types whose text answer keeps the input's type ($execute, channels).
TEXT_TYPES = (HL7_V2, ASTM, "application/hl7-v2", "application/edifact")
