"""
Durable storage of the relay and the agent, behind interfaces.

- L{medagent.storage.interfaces}: the contracts (C{ResourceStore}, C{PushJournal},
  C{ClientRegistry}, C{DeliveryQueue}, the write-hook C{Transaction}, the agent's queues).
- L{medagent.storage.resources}, L{medagent.storage.journal}, L{medagent.storage.records}:
  the records and rules every implementation shares (no SQL).
- L{medagent.storage.sqlite}: the embedded SQLite implementation; every SQL string of the
  relay and the agent (queues, DICOM worklist) lives under it.
"""
