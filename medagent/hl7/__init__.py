"""
HL7 v2 for the agent: MLLP framing (L{mllp}), message helpers and ACKs (L{message}), the
Twisted client/server protocols with the ``mllp://`` sender and the inbound channel
(L{protocol}), and FHIR ServiceRequest to ORM/OML orders (L{orders}).
"""
