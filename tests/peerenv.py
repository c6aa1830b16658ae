"""
Where third-party peers live, and how a test asks for one.

Peers are installed by ``.ci/peers-*.sh`` under ``$MEDAGENT_PEERS`` (default ``.peers`` in the
repository).  A test that needs a missing peer is skipped, unless ``MEDAGENT_REQUIRE_PEERS=1``
(as in CI), where it fails: a green CI run must have talked to the real peers.
"""

from __future__ import annotations

import os
import shutil

from twisted.trial.unittest import SkipTest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.environ.get("MEDAGENT_PEERS") or os.path.join(ROOT, ".peers")
FIXTURES = os.path.join(ROOT, "tests", "peers")


def require_peers() -> bool:
    return os.environ.get("MEDAGENT_REQUIRE_PEERS") == "1"


def need(condition: bool, what: str) -> None:
    """Skip (or, in CI, fail) when a peer is missing."""
    if condition:
        return
    message = f"third-party peer not installed: {what} (run the .ci/peers-*.sh scripts)"
    if require_peers():
        raise AssertionError(message)
    raise SkipTest(message)


def peer_path(*parts: str) -> str:
    return os.path.join(PEERS, *parts)


def need_program(name: str) -> str:
    path = shutil.which(name)
    need(path is not None, name)
    return path  # type: ignore[return-value]


def need_node_module(module: str) -> str:
    """The node_modules folder that holds C{module}; node must be on PATH."""
    need_program("node")
    folder = peer_path("node", "node_modules")
    need(os.path.isdir(os.path.join(folder, *module.split("/"))), f"npm {module}")
    return folder
