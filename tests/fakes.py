"""
Verified fakes shared by the unit tests.

L{InlineThreadPool} + L{InlineReactor} run "threaded" work synchronously, so code built on
L{medagent.storage.sqlite.database.Database} can be tested with C{SynchronousTestCase}; the same
code runs on the real thread pool in the integration tests.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

from twisted.internet.task import Clock

from medagent.storage.sqlite.database import Database


class InlineThreadPool:
    """The parts of L{twisted.python.threadpool.ThreadPool} that deferToThreadPool uses."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def callInThread(self, f: Callable[..., Any], *a: Any, **kw: Any) -> None:
        f(*a, **kw)

    def callInThreadWithCallback(self, onResult: Callable[[bool, Any], None],
                                 f: Callable[..., Any], *a: Any, **kw: Any) -> None:
        try:
            result = f(*a, **kw)
        except BaseException:
            from twisted.python.failure import Failure

            onResult(False, Failure())
        else:
            onResult(True, result)


class InlineReactor(Clock):
    """A Clock whose callFromThread runs at once (the 'thread' was the caller)."""

    def callFromThread(self, f: Callable[..., Any], *a: Any, **kw: Any) -> None:
        f(*a, **kw)


def inline_database(testcase: Any, schema: str, reactor: InlineReactor | None = None) -> Database:
    """A real SQLite file in a temp folder, driven synchronously."""
    folder = tempfile.mkdtemp(prefix="medagent-test-")
    testcase.addCleanup(_rmtree, folder)
    db = Database(reactor or InlineReactor(), os.path.join(folder, "test.sqlite"), schema=schema,
                  threadpool=InlineThreadPool())
    db.start()
    testcase.addCleanup(db.stop)
    return db


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
