"""
What the relay and the agent need from durable storage, independent of the database.

Every implementation (today L{medagent.storage.sqlite}; a PostgreSQL one is planned) must give
the guarantees written on each method.  Rules common to all of them:

- B{Threads.}  Every method is called on the reactor thread and returns at once: database work
  runs on threads the implementation owns (SQLite: one worker thread; PostgreSQL: psycopg in
  its own thread pool) and the returned Deferred fires on the reactor thread.  An
  implementation never calls back into application objects from its own threads; the one
  piece of caller code that runs on a database thread is a L{PreparedWrite}, which may touch
  only its own immutable data and the L{Transaction} handle it is given.
- B{Errors.}  A failure is delivered through the Deferred, never raised from the call (except
  for a programming error in the arguments).  A call after the store is stopped fails its
  Deferred.
- B{Atomicity.}  Each method is one transaction: it happens entirely or not at all.
- B{Ordering.}  Writes issued from the reactor thread are applied in the order they were
  issued (the journal's batched writes too: a batch keeps call order).
- B{Dialect.}  No SQL leaves the implementation; records (L{medagent.storage.records},
  L{medagent.storage.journal.Push}) are plain Python values.

The contract tests are C{tests/storage_contract.py}: a new implementation passes them by
subclassing their mixins.
"""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol, Sequence

from twisted.internet.defer import Deferred

if TYPE_CHECKING:
    from medagent.storage.inbound import InboundMessage
    from medagent.storage.journal import Push, Trend
    from medagent.storage.records import (Delivery, NewDelivery, SharedConsoleSession,
                                          StoredClient)


# -- resources -----------------------------------------------------------------------------


class Transaction(Protocol):
    """
    What a L{PreparedWrite} may do inside a resource write's own transaction, on the database
    thread: whatever it does commits with the write or is rolled back with it.  Nothing else
    (no connection, no cursor) is handed out.
    """

    def enqueue_deliveries(self, rows: Sequence["NewDelivery"]) -> list["Delivery"]:
        """
        Queue Subscription deliveries (as L{DeliveryQueue.enqueue} would) in this transaction;
        returns them as stored, in C{rows} order.  Raising fails (rolls back) the write.
        """


class PreparedWrite(Protocol):
    """A hook's plan for one write, built on the reactor thread by L{WriteHook.prepare}."""

    def in_transaction(self, tx: Transaction, interaction: str,
                       resource: dict[str, Any] | None,
                       previous: dict[str, Any] | None) -> Any:
        """
        Database thread, inside the write's transaction, after the write itself.
        C{interaction} is ``create``/``update``/``delete`` as the store decided it;
        C{resource} is the new version as stored (with C{meta.versionId}; C{None} for a
        delete), C{previous} the version it replaced (or C{None}).  May use only C{tx} and
        data captured at C{prepare} time, and must not touch application state.  Returns a
        token for L{WriteHook.committed}; raising rolls the write back and fails it.
        """


class WriteHook(Protocol):
    """Something that must happen atomically with resource writes (Subscriptions)."""

    def prepare(self, resource_type: str, id: str,
                resource: dict[str, Any] | None) -> PreparedWrite:
        """
        Reactor thread, before the write goes to the database: read whatever application
        state the hook needs and capture it in the returned (immutable) plan.  C{resource}
        is the resource as it will be written (without the new C{meta}); C{None} for a
        delete.  The plan must copy what it needs: the store completes C{resource} on the
        database thread.  Raising fails the write, which then never reaches the database.
        """

    def committed(self, token: Any) -> None:
        """Reactor thread, after the write committed, with C{in_transaction}'s token."""


class ResourceStore(Protocol):
    """
    Versioned FHIR resources (L{medagent.storage.resources}); every call returns a Deferred.

    - C{create} gives a missing C{id} a new one, fails 409 if the id is live; a deleted id
      may be created again (its version goes on counting).  C{update} creates or replaces; with
      C{if_match} (``W/"n"`` or ``n``) it fails 412 unless the current version is ``n``.
      Both set C{meta.versionId} (1, 2, ...: one more per write, deletes included) and
      C{meta.lastUpdated}, and fire with the resource as stored.
    - C{read} of a missing or deleted resource fails 404.  C{delete} fails 404 when there is
      nothing live to delete, and fires with the version it deleted.
    - C{search}: AND across parameters, OR across comma-separated values, only live
      resources, in write order (``meta.lastUpdated``, then order of writing);
      C{_count} (0..1000, default 100) and C{_offset} page it; unknown parameters fail 400.
    - Every write runs the C{write_hooks} (L{WriteHook}) inside its transaction, then the
      C{listeners} ``(interaction, resource, previous)`` after it committed.
    """

    write_hooks: list[WriteHook]
    listeners: list[Callable[[str, dict[str, Any] | None, dict[str, Any] | None], None]]

    def create(self, resource: dict[str, Any]) -> Deferred[dict[str, Any]]: ...

    def read(self, resource_type: str, id: str) -> Deferred[dict[str, Any]]: ...

    def update(
        self, resource: dict[str, Any], if_match: str | None = None
    ) -> Deferred[dict[str, Any]]: ...

    def delete(self, resource_type: str, id: str) -> Deferred[dict[str, Any]]: ...

    def search(
        self, resource_type: str, params: Mapping[str, list[str]]
    ) -> Deferred[list[dict[str, Any]]]: ...


# -- the push journal ----------------------------------------------------------------------


class PushJournal(Protocol):
    """
    Every push, before it is anything else (L{medagent.storage.journal}).  Each push gets a
    C{seq}, increasing in the order C{create} was called; lists are ordered by it.

    Writes (C{create}, C{transition}, C{remember_key}) may be group committed; C{flushed},
    C{open_pushes} and C{current} are ordered after every write issued before them (they see
    those writes), the other reads may run before pending writes commit.  The idempotency
    lookups and C{prune} use a window of L{medagent.storage.journal.IDEMPOTENCY_WINDOW}
    seconds on the journal's clock.
    """

    def new_id(self) -> str:
        """A fresh push id (unique, URL-safe)."""

    def create(self, push: "Push") -> Deferred["Push"]:
        """
        Store a new push; sets C{created}/C{updated} (now) and C{seq}; fires once durable.
        Fails with L{medagent.storage.journal.RepeatedPush} (nothing stored) when, checked
        in the insert's own transaction, an earlier push has the same requester and
        Idempotency-Key (L{find_by_key}) or is the same message (L{find_same_message}): two
        relay nodes on one database cannot both journal one message.
        """

    def transition(self, push: "Push", state: str, *, error: str | None = None,
                   reply: tuple[int, str, str] | None = None, count_attempt: bool = False,
                   in_doubt: bool = False) -> Deferred["Push"]:
        """
        Move C{push} to C{state}: the object at once, the journal in call order.  C{error}
        and C{reply} replace the last ones when given; C{count_attempt} adds one attempt;
        C{in_doubt}, once set, stays set.  The push's C{expires_at} is written too (a retry
        clears it, so the expiry sweep leaves the retried push alone).
        """

    def find_by_key(self, requester: str, key: str) -> Deferred["Push | None"]:
        """
        The first (lowest C{seq}) push C{requester} created with Idempotency-Key C{key}, or
        bound to it by L{remember_key}, inside the window and not cancelled.
        """

    def remember_key(self, requester: str, key: str, push_id: str) -> Deferred[None]:
        """Bind C{requester}'s C{key} to C{push_id}; a key already bound keeps its push."""

    def find_same_message(self, agent_id: str, device: str, control_id: str,
                          body_hash: str) -> Deferred["Push | None"]:
        """
        The first push through C{agent_id} to C{device} (a
        L{medagent.destination.lane_key}) with this MSH-10 and body hash, inside the window
        and not cancelled, whoever sent it.
        """

    def get(self, push_id: str) -> Deferred["Push"]:
        """The push; fails 404 if there is none."""

    def current(self, push_id: str) -> Deferred["Push"]:
        """L{get}, after every write issued before it."""

    def open_for_agent(self, agent_id: str, *, after_seq: int = 0, limit: int = 500,
                       states: Iterable[str] = ...) -> Deferred[list["Push"]]:
        """Pushes of C{agent_id} in C{states} (default: open) with C{seq > after_seq}, by C{seq}."""

    def agents_with_queued(self, agent_ids: Iterable[str]) -> Deferred[set[str]]:
        """Which of C{agent_ids} have pushes C{queued} (one read for many agents: a cluster
        node's poll asks it of every agent it holds)."""

    def open_pushes(self, agent_id: str, *, after_seq: int = 0,
                    remotes: Iterable[str] | None = None, exclude_remotes: Iterable[str] = (),
                    limit: int = 500, states: Iterable[str] = ...) -> Deferred[list["Push"]]:
        """L{open_for_agent} restricted to / excluding some remotes, after pending writes."""

    def search(self, params: Mapping[str, str], limit: int = 100) -> Deferred[list["Push"]]:
        """
        Pushes matching every filter given (L{medagent.storage.journal.FILTERS}: C{agent},
        C{state}, C{destination}, C{requester}, C{control_id} (MSH-10), C{accession},
        C{resent_from}; C{since}/C{until}: C{created} in [since, until)), newest first.
        C{control_id} and C{accession} are indexed.
        """

    def search_page(self, params: Mapping[str, str], *, count: int,
                    before_seq: int | None = None
                    ) -> Deferred[tuple[list["Push"], int, int | None]]:
        """
        One page, newest first: C{(pushes, total, next_before)}.  C{total} counts all
        matches; C{next_before} is the cursor of the next page (C{None} on the last); a push
        written while a list is walked never shifts a page.
        """

    def counts(self, agent_id: str) -> Deferred[dict[str, Any]]:
        """Pushes of C{agent_id} per state (every state present), ``oldestOpenAgeSeconds``."""

    def agent_summaries(self, since: float) -> Deferred[dict[str, dict[str, Any]]]:
        """
        By agent id, for agents with open pushes or failures: C{open} (count of queued, sent
        and accepted), C{oldestOpen} (creation time of the oldest open push, or None) and
        C{failedSince} (pushes that became failed at or after C{since}).
        """

    def outcome_counts(self, since: float, limit: int = 1000
                       ) -> Deferred[dict[str, dict[str, int]]]:
        """Per agent with pushes that ended delivered or failed at or after C{since}:
        C{finished} (delivered and failed) and C{failed}; at most C{limit} agents."""

    def lane_summaries(self, agent_id: str) -> Deferred[list[dict[str, Any]]]:
        """
        One entry per device URL the agent's pushes went to, by URL (at most 500):
        C{remote}, C{open}, C{oldestOpenAgeSeconds}, C{lastState}, C{lastUpdated} and
        C{lastError} of its newest final push (None each when it has none).
        """

    def trends(self, start: float, width: float, count: int, agent_id: str | None = None
               ) -> Deferred[dict[str, "Trend"]]:
        """
        By agent id (only C{agent_id}'s when given; agents with no push in the window
        left out): a L{medagent.storage.journal.Trend} over C{count} buckets of C{width}
        seconds from C{start}: pushes created, ended failed or expired, and open at each
        bucket's end.  One query, reading only pushes open now or updated since C{start}
        (indexed: never a scan of older rows).  C{width} > 0 and 1 <= C{count} <=
        L{medagent.storage.journal.MAX_TREND_BUCKETS}, else ValueError (raised).
        """

    def expire_overdue(self) -> Deferred[int]:
        """Queued pushes whose C{expires_at} has passed become ``expired``; how many."""

    def prune(self, older_than: float) -> Deferred[int]:
        """Delete final pushes not updated for C{older_than} s (and old key bindings)."""

    def flushed(self) -> Deferred[None]:
        """Fires once every write issued before this call is durable."""


# -- the inbound log -----------------------------------------------------------------------


class InboundLog(Protocol):
    """
    Every message devices sent through agents' channels, with its outcome
    (L{medagent.storage.inbound.InboundMessage}); bounded by L{prune}.  Each message gets a
    C{seq}, increasing in the order C{add} was called; lists are ordered by it.  C{add} may
    be group committed; the reads may run before pending writes commit.
    """

    def new_id(self) -> str:
        """A fresh message id (unique, URL-safe)."""

    def add(self, message: "InboundMessage") -> Deferred["InboundMessage"]:
        """Store a message (sets C{seq}); fires once durable."""

    def get(self, message_id: str) -> Deferred["InboundMessage"]:
        """The message; fails 404 if there is none."""

    def search_page(self, params: Mapping[str, str], *, count: int,
                    before_seq: int | None = None
                    ) -> Deferred[tuple[list["InboundMessage"], int, int | None]]:
        """
        One page, newest first, of the messages matching every filter given
        (L{medagent.storage.inbound.FILTERS}; C{since}/C{until}: C{received} in
        [since, until)): C{(messages, total, next_before)} as L{PushJournal.search_page}.
        C{control_id}, C{patient_id}, C{accession}, C{study_uid}, C{sop_uid} and C{agent}
        (with C{channel}) are indexed.
        """

    def channel_summaries(self, agent_id: str, since: float
                          ) -> Deferred[list[dict[str, Any]]]:
        """Per channel of C{agent_id}: messages since C{since} and the newest one's outcome
        (L{medagent.storage.inbound.channel_summaries})."""

    def prune(self, before: float, max_rows: int | None = None,
              limit: int = ...) -> Deferred[int]:
        """Delete messages received before C{before}, then the oldest beyond C{max_rows}, at
        most C{limit} (L{medagent.storage.inbound.PRUNE_BATCH}) in one call; how many."""


# -- OAuth2 clients ------------------------------------------------------------------------


class ClientRegistry(Protocol):
    """
    The registered clients (L{medagent.storage.records.StoredClient}); secrets, tokens and
    roles are L{medagent.relay.auth.Authority}'s.  A revocation is for good.  The C{*_sync}
    calls block the calling thread, for tools that run without a reactor (the CLI).
    """

    def add(self, client: "StoredClient") -> Deferred[None]:
        """Store a new client; fails if its id exists."""

    def add_sync(self, client: "StoredClient") -> None: ...

    def list(self) -> Deferred[list["StoredClient"]]:
        """Every client, revoked ones too, oldest first."""

    # builtins.list: the method C{list} above shadows the builtin inside this class body.
    def list_sync(self) -> builtins.list["StoredClient"]: ...

    def lookup(self, client_id: str) -> Deferred["StoredClient | None"]:
        """The client (revoked or not), or C{None}: the token endpoint's read."""

    def revoke(self, client_id: str) -> Deferred[bool]:
        """Mark the client revoked; C{False} (and nothing changed) for an unknown id."""

    def revoke_sync(self, client_id: str) -> bool: ...

    def revoked(self) -> Deferred[set[str]]:
        """The ids of every revoked client (re-read periodically by every relay node)."""


# -- Subscription deliveries ---------------------------------------------------------------


class DeliveryQueue(Protocol):
    """
    Durable Subscription deliveries (L{medagent.storage.records.Delivery}).

    A lane is (subscription, resource type, resource id): only the oldest pending delivery
    of a lane may be claimed, so deliveries of one resource go out one at a time in order.
    A claimed delivery is leased: not claimable again until C{retry}, C{finish} or, after a
    crash or stop, C{recover}.  All times are the caller's clock (seconds).
    """

    def enqueue(self, rows: Sequence["NewDelivery"]) -> Deferred[list["Delivery"]]:
        """Queue deliveries in a transaction of their own; fires with them, in C{rows} order."""

    def recover(self, now: float) -> Deferred[int]:
        """Leased pending deliveries are due at C{now} and get their attempt back; how many."""

    def claim(self, now: float, lease: float, limit: int
              ) -> Deferred[tuple[list["Delivery"], float | None]]:
        """
        Lease up to C{limit} due (C{next_attempt <= now}), unleased, first-in-lane pending
        deliveries, oldest first, counting an attempt and making them due again at
        C{now + lease}; also the earliest later C{next_attempt} of an unleased first-in-lane
        pending delivery (C{None} if none), for the caller's timer.
        """

    def retry(self, delivery_id: str, *, attempts: int, next_attempt: float, error: str,
              now: float) -> Deferred[None]:
        """End the lease; due again at C{next_attempt} with C{attempts} and C{error}."""

    def finish(self, delivery_id: str, state: str, *, error: str | None, now: float,
               keep_payload: bool) -> Deferred[None]:
        """Final state (delivered/failed/cancelled); the payload is dropped unless kept."""

    def sweep(self, *, finished_before: float, failed_before: float) -> Deferred[int]:
        """Delete delivered/cancelled rows updated before C{finished_before}, failed ones
        before C{failed_before}; how many."""

    def list(self, subscription_id: str | None = None, state: str | None = None,
             limit: int = 100) -> Deferred[list["Delivery"]]:
        """Deliveries (optionally of one Subscription / in one state), newest first."""

    def backlog(self) -> Deferred[tuple[int, float | None]]:
        """(pending deliveries, creation time of the oldest pending one or None): metrics."""


# -- agent sessions across relay nodes ----------------------------------------------------


class AgentSessions(Protocol):
    """
    Which relay node holds each agent's websocket, for relay nodes that share a database: at
    most one live session per agent id across all of them.  A session is a lease of C{lease}
    seconds on the database's clock, renewed by its node; one not renewed in time is free for
    any node to take (its node died or lost the database).
    """

    def claim(self, agent_id: str, node_id: str, session_id: str, lease: float
              ) -> Deferred[str | None]:
        """
        Take C{agent_id}'s session for C{session_id} on C{node_id}: fires with C{None} when
        taken (the row was free, expired, or C{node_id}'s own), else with the node holding it.
        """

    def renew(self, node_id: str, session_ids: Sequence[str], lease: float
              ) -> Deferred[set[str]]:
        """Extend these sessions of C{node_id}; fires with the ones it still holds."""

    def release(self, agent_id: str, session_id: str) -> Deferred[None]:
        """Give the session up (only if C{session_id} still holds it)."""

    def holder(self, agent_id: str) -> Deferred[str | None]:
        """The node holding a live session for C{agent_id}, or C{None}."""


class ConsoleSessions(Protocol):
    """
    The console's sign-in sessions, for relay nodes that share a database: a browser signed
    in on one node is signed in on every node behind the balancer, and signing out (or the
    client's revocation) ends it on all of them.  Idle expiry runs on the database's clock.
    """

    def add(self, session: "SharedConsoleSession") -> Deferred[None]:
        """Keep a new session (fires once it is committed: the next page may hit another
        node)."""

    def use(self, id_hash: bytes, idle: float) -> Deferred["SharedConsoleSession | None"]:
        """The session, marked used now, or C{None}: unknown, ended, or unused for longer
        than C{idle} seconds."""

    def drop(self, id_hash: bytes) -> Deferred[None]:
        """End the session (sign-out)."""

    def drop_client(self, client_id: str) -> Deferred[None]:
        """End every session of a client (it was revoked)."""

    def prune(self, idle: float) -> Deferred[int]:
        """Forget sessions unused for longer than C{idle}; fires with how many."""


class ClusterNotices(Protocol):
    """
    Wake-up hints between relay nodes (PostgreSQL's C{LISTEN/NOTIFY}).  Never the only path
    of anything: a notice is not stored, so one lost (a node reconnecting to the database)
    costs at most the receiver's next poll, never a message.  Payloads are small mappings of
    ids (never message content).
    """

    def notify(self, notice: Mapping[str, Any]) -> Deferred[None]:
        """Send C{notice} to every listening node once the writes issued before it commit."""

    def listen(self, received: Callable[[list[dict[str, Any]]], None],
               connected: Callable[[], None], lost: Callable[[str], None]) -> None:
        """
        Start receiving (an owned thread with a connection of its own), reconnecting with a
        backoff: C{received} with each batch of notices, C{connected} each time listening
        starts (notices may have been missed before: poll everything once), C{lost} when the
        connection broke; all called on the reactor thread.
        """

    def stop(self) -> None:
        """Stop listening (the thread ends within a second)."""


class SigningKeys(Protocol):
    """
    The token signing keys relay nodes on one database share, so a token from one node is
    valid at all: a ring of keys, the newest old enough signing, any not retired verifying.
    """

    def load(self, first: "tuple[str, bytes] | None" = None
             ) -> Deferred["tuple[dict[str, bytes], str]"]:
        """The ring (kid → secret) and the kid that signs; with no key yet, C{first} (a
        node's existing C{token.key}, so its tokens stay valid) or a new random one."""

    def rotate(self) -> Deferred[str]:
        """Publish a new key (it signs once every node has read it); fires with its kid."""

    def retire(self, kid: str) -> Deferred[bool]:
        """Withdraw a key: the tokens it signed fail from now on; C{False} if none such."""

    def list(self) -> Deferred[builtins.list[dict[str, Any]]]:
        """Every key's kid, created, retired and whether it signs (never the secret)."""


class LanePauses(Protocol):
    """
    Lanes an operator paused: the relay sends none of the pushes of a paused (agent, device
    lane) to the agent; they stay queued in the journal, in order, until the lane is resumed.
    Kept in the database so that every relay node of a cluster (and a restarted relay)
    holds the same lanes.  A lane is named by its key (L{medagent.destination.lane_key}).
    """

    def pause(self, agent_id: str, lane: str, by: str, now: float) -> Deferred[bool]:
        """Record the pause; C{False} if the lane was paused already (its record is kept)."""

    def resume(self, agent_id: str, lane: str) -> Deferred[bool]:
        """Remove the pause; C{False} if the lane was not paused."""

    def list(self, agent_id: str | None = None, limit: int = 1000
             ) -> Deferred[builtins.list[dict[str, Any]]]:
        """The pauses (of C{agent_id}, or all), each C{{agent, lane, by, since}}, by agent
        and lane, at most C{limit}."""


class AgentCalls(Protocol):
    """
    Agent operations (``$reload-config``, ``$fetch-logs``, ``$stats``, cancel) asked on one
    relay node of an agent another node holds: a row per call, taken and answered by the
    holding node.  A call is answered at most once, and only before its deadline; the asking
    node removes it when it has its answer or gives up.
    """

    def place(self, call_id: str, agent_id: str, node_id: str, from_node: str,
              request: Mapping[str, Any], timeout: float) -> Deferred[None]:
        """Ask C{node_id} (the holder of C{agent_id}'s session) to run C{request}."""

    def take(self, node_id: str, limit: int = 100) -> Deferred[list[dict[str, Any]]]:
        """The calls to C{node_id} nobody took yet and still in time (C{id}, C{agent_id},
        C{from_node}, C{request}), now taken; calls long past their deadline are removed."""

    def answer(self, call_id: str, answer: Mapping[str, Any]) -> Deferred[None]:
        """Record a taken call's answer."""

    def result(self, call_id: str) -> Deferred[dict[str, Any] | None]:
        """The call's answer, or C{None} while there is none."""

    def forget(self, call_id: str) -> Deferred[None]:
        """Remove the call (answered, or given up on)."""


# -- the agent's durable queues ------------------------------------------------------------


class InboxStore(Protocol):
    """
    The entries of the agent's durable inbox (L{medagent.agent.queue.DurableQueue} keeps the
    behaviour: lanes, retries, the in-doubt rules): L{medagent.storage.sqlite.agent_queue}.
    Entries are ``queued`` → ``delivering`` → ``done`` (with the answer), numbered by C{seq}
    in arrival order; a push id is held at most once.  C{store}, C{claim},
    C{mark_delivering}, C{answer}, C{requeue}, C{cancel} and C{confirm} are applied in call
    order (the queue relies on a claim never overtaking a cancel, and an answer never
    overtaking the next claim).  Callables passed in (C{resolve}, C{refuse}, C{answer_for})
    are pure and may run on the database thread.
    """

    def recover(self, now: float, resolve: Any
                ) -> Deferred[tuple[list[tuple[int, str, str, str]], int]]: ...

    def store(self, values: Sequence[Any]) -> Deferred[tuple[bool, Any]]: ...

    def claim(self, seq: int, state: str, now: float) -> Deferred[dict[str, Any] | None]: ...

    def mark_delivering(self, seq: int, now: float, refuse: Any) -> Deferred[None]: ...

    def answer(self, seq: int, answer: Mapping[str, Any], error: str | None,
               now: float) -> Deferred[None]: ...

    def requeue(self, seq: int, error: str, now: float) -> Deferred[None]: ...

    def cancel(self, push_id: str, now: float, reason: str, answer_for: Any
               ) -> Deferred[tuple[str, tuple[int, str] | None]]: ...

    def confirm(self, push_id: str) -> Deferred[None]: ...

    def unconfirmed(self, limit: int) -> Deferred[list[dict[str, Any]]]: ...

    def prune(self, before: float) -> Deferred[int]: ...

    def oldest_open(self) -> Deferred[list[tuple[str, float]]]: ...

    def holds(self) -> Deferred[builtins.list[str]]:
        """The lanes the relay said to hold (L{medagent.wire.LANES_HOLD}), as recorded."""

    def set_holds(self, lanes: Sequence[str]) -> Deferred[None]:
        """Replace the recorded lanes to hold with C{lanes}."""


class OutboxStore(Protocol):
    """
    The rows of the agent's outbox (messages received from devices, kept until the relay
    answers them): L{medagent.storage.sqlite.outbox.SQLiteOutboxStore}.  C{add} is durable
    when it fires; C{pending} lists what is left in the order it was added.
    """

    def add(self, row: Mapping[str, Any], created: float) -> Deferred[None]: ...

    def remove(self, callback: str) -> Deferred[None]: ...

    def pending(self, limit: int) -> Deferred[list[dict[str, Any]]]: ...

    def count(self) -> Deferred[int]: ...
