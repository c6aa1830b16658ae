"""
Python Bots: a pool of worker processes, the sandbox they run bots in, and the runner.

A Bot resource carries Python source defining ``handler(medplum, event)``.  The relay never
runs it in its own process (L{workers}: warm zygotes, each run forked into a sandbox of its
own, killed at the end of the run or at its time limit).  L{runner} resolves the Bot, gives
it a short-lived token for its own identity and runs it; every run is recorded as an
C{AuditEvent} (L{audit}) without payload.  L{resource} reads what a Bot resource asks for,
L{outcomes} names how a run ends, L{service} starts and stops it all with the relay.  The
``$execute`` HTTP operation is the web layer's (L{medagent.relay.http.execute}).

The names other modules use are importable from here (C{from medagent.relay import bots as
b}; C{b.SUCCESS}, C{b.BotRunner}...).
"""

from medagent.relay.bots.audit import (
    AUDIT_OUTCOME,
    AUDIT_SUBTYPE,
    AUDIT_TYPE,
    EXT,
    EXT_BOT_RUN,
    audit_event,
)
from medagent.relay.bots.outcomes import (
    BUSY,
    CRASH,
    DISABLED,
    ERROR,
    HTTP_STATUS,
    INVALID,
    MEMORY,
    NOT_FOUND,
    STOPPED,
    SUCCESS,
    TIMEOUT,
)
from medagent.relay.bots.resource import (
    MAX_CODE_BYTES,
    BotCodeError,
    answer_type,
    bot_code,
    bot_secrets,
    bot_time_limit,
    parse_input,
)
from medagent.relay.bots.runner import (
    AUDIT_LOG_CHARS,
    DEFAULT_TIME_LIMIT,
    MAX_TIME_LIMIT,
    BotRun,
    BotRunner,
)
from medagent.relay.bots.service import BotsService, base_url_from_listen
from medagent.relay.bots.workers import (
    BACKSTOP_GRACE,
    BOOT,
    DEFAULT_BOT_USER,
    DEFAULT_FILE_MB,
    DEFAULT_MAX_LOG,
    DEFAULT_MAX_MESSAGE,
    DEFAULT_MAX_PROCS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_RUNS,
    DEFAULT_MEMORY_MB,
    DEFAULT_QUEUE_TIMEOUT,
    DEFAULT_TMP_MB,
    DEFAULT_WORKERS,
    RESPAWN_BACKOFF,
    STARTUP_TIMEOUT,
    WorkerPool,
    resolve_bot_ids,
    unused_id,
)
from medagent.storage.resources import now_iso

__all__ = [
    "AUDIT_LOG_CHARS", "AUDIT_OUTCOME", "AUDIT_SUBTYPE", "AUDIT_TYPE", "BACKSTOP_GRACE", "BOOT",
    "BUSY", "CRASH", "DEFAULT_BOT_USER", "DEFAULT_FILE_MB", "DEFAULT_MAX_LOG",
    "DEFAULT_MAX_MESSAGE", "DEFAULT_MAX_PROCS", "DEFAULT_MAX_QUEUE", "DEFAULT_MAX_RUNS",
    "DEFAULT_MEMORY_MB", "DEFAULT_QUEUE_TIMEOUT", "DEFAULT_TIME_LIMIT", "DEFAULT_TMP_MB",
    "DEFAULT_WORKERS", "DISABLED", "ERROR", "EXT", "EXT_BOT_RUN", "HTTP_STATUS", "INVALID",
    "MAX_CODE_BYTES", "MAX_TIME_LIMIT", "MEMORY", "NOT_FOUND", "RESPAWN_BACKOFF",
    "STARTUP_TIMEOUT", "STOPPED", "SUCCESS", "TIMEOUT", "BotCodeError", "BotRun", "BotRunner",
    "BotsService", "WorkerPool", "answer_type", "audit_event", "base_url_from_listen",
    "bot_code", "bot_secrets", "bot_time_limit", "now_iso", "parse_input", "resolve_bot_ids",
    "unused_id",
]
