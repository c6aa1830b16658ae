"""
The outcomes of a bot run, and what each one answers over HTTP (and to an agent's channel).

The worker pool, the runner, the audit trail, subscriptions and agent channels all speak in
these words; they live apart so that none of them has to import another for a constant.
"""

from __future__ import annotations

SUCCESS = "success"
ERROR = "error"  # the handler raised
INVALID = "invalid"  # no handler, syntax error, unusable return value, bad Bot resource
NOT_FOUND = "not-found"
TIMEOUT = "timeout"
MEMORY = "memory"
CRASH = "crash"  # the worker died
BUSY = "busy"  # no worker free within the queue timeout, or the queue is full
STOPPED = "stopped"  # the relay is shutting down
DISABLED = "disabled"  # no sandbox for bots on this relay (see WorkerPool.start)
HTTP_STATUS = {SUCCESS: 200, ERROR: 400, INVALID: 400, NOT_FOUND: 404, TIMEOUT: 504,
               MEMORY: 400, CRASH: 500, BUSY: 503, STOPPED: 503, DISABLED: 503}
