"""
HL7 v2 for the agent: MLLP framing (L{mllp}), message helpers and ACKs (L{message}), the
device connection (L{client}) pooled by the ``mllp://`` sender (L{sender}), the inbound
channel (L{channel}) on its listening protocol (L{server}) with its answer policy
(L{acking}), and FHIR ServiceRequest to ORM/OML orders (L{orders}).
"""
