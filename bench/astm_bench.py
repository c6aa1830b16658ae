#!/usr/bin/env python3
"""
ASTM push throughput, side by side with the baseline, into the same third-party receiver.

For each transport, a fresh labmcp-astm-lis receiver (strict E1381: checksums, frame numbers,
ETB joins) takes the same N orders (H, P, O, L = 4 frames each) from:

* ours:       medagent's ASTMSender (Twisted, one message in flight, as the dispatcher runs it);
* python-astm: python-astm 0.5.0's Client (the baseline; TCP only, so over the pty it reaches
              the receiver through a socat TCP->pty bridge);
* floor:      a blocking raw-socket/pyserial loop that writes each frame and waits for its
              ACK, nothing else: the receiver's own ACK round trip.

Transports: loopback TCP, and a pty pair (socat null-modem).  A pty ignores the baud rate, so
the run also reports what our link adds per frame beyond the receiver's ACK round trip (ours
minus floor).  The receiver must accept every frame (its stats: frames_rejected=0).

Usage: python bench/astm_bench.py [--orders N]   (peers from .ci/peers-astm.sh)
Last line: one JSON object.  Every process it starts is killed before it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.environ.get("MEDAGENT_PEERS") or os.path.join(ROOT, ".peers")
FIXTURES = os.path.join(ROOT, "tests", "peers", "astm")
LABMCP_PY = os.path.join(PEERS, "venv-labmcp", "bin", "python")
PYASTM_PY = os.path.join(PEERS, "venv-astm", "bin", "python")
SHIM = os.path.join(FIXTURES, "shim")
MAX_ORDERS = 5000
TIMESTAMP = "20240115103000"


def order_records(i: int) -> list[str]:
    """The order every sender sends: what python-astm's client encodes for its records."""
    return [f"H|\\^&||||||||||P||{TIMESTAMP}",
            f"P|1||PID{i:05d}||DOE^JOHN||19800101|M",
            f"O|1|SPEC{i:05d}||^^^GLU|R||||||N",
            "L|1|N"]


# ------------------------------------------------------------------ child modes


def run_ours(url: str, n: int) -> dict:
    sys.path.insert(0, ROOT)
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    from medagent.astm.sender import ASTMSender
    from medagent.contenttypes import ASTM
    from medagent.destination import parse_destination

    out: dict = {}

    async def main() -> None:
        sender = ASTMSender(reactor)
        dest = parse_destination(url)
        bodies = ["\r".join(order_records(i)) + "\r" for i in range(n)]
        frames = 0
        try:
            t0 = time.perf_counter()
            for body in bodies:
                reply = await sender.send(dest, ASTM, body, {})
                frames += json.loads(reply.body)["frames"]
            out["elapsed"] = time.perf_counter() - t0
            out["frames"] = frames
        except Exception as e:  # reported, not raised: the orchestrator prints it
            out["error"] = str(e)
        finally:
            await sender.close()
            reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(main()))
    reactor.run()
    return out


def run_pyastm(port: int, n: int) -> dict:
    from astm.client import Client
    from astm.records import HeaderRecord

    def emitter():
        for i in range(n):
            yield HeaderRecord()
            yield ["P", "1", None, f"PID{i:05d}", None, ["DOE", "JOHN"], None, "19800101", "M"]
            yield ["O", "1", f"SPEC{i:05d}", None, [None, None, None, "GLU"], "R", None, None,
                   None, None, None, "N"]
            yield ["L", "1", "N"]

    t0 = time.perf_counter()
    Client(emitter, host="127.0.0.1", port=port, timeout=10).run(timeout=1, count=None)
    return {"elapsed": time.perf_counter() - t0, "frames": 4 * n}


def run_floor(kind: str, target: str, n: int) -> dict:
    """Write frame, wait for its ACK; no state machine, no timers, no checks beyond ACK."""
    def cs(b: bytes) -> bytes:
        return b"%02X" % (sum(b) & 0xFF)

    if kind == "tcp":
        s = socket.create_connection(("127.0.0.1", int(target)))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(15)
        send, recv = s.sendall, (lambda: s.recv(1))
    else:
        import serial
        p = serial.Serial(target, 9600, timeout=15)
        send, recv = p.write, (lambda: p.read(1))
    frames = 0
    t0 = time.perf_counter()
    for i in range(n):
        send(b"\x05")
        if recv() != b"\x06":
            return {"error": "ENQ not ACKed"}
        for fn, rec in enumerate(order_records(i), start=1):
            body = b"%d" % (fn % 8) + rec.encode() + b"\r\x03"
            send(b"\x02" + body + cs(body) + b"\r\n")
            if recv() != b"\x06":
                return {"error": f"frame {fn} not ACKed"}
            frames += 1
        send(b"\x04")
    return {"elapsed": time.perf_counter() - t0, "frames": frames}


# ------------------------------------------------------------------ orchestration


class Procs:
    """Everything started, to be killed (by process group) whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.tmp = tempfile.mkdtemp(prefix="medagent-astm-bench-")

    def start(self, name: str, argv: list[str], env: dict | None = None) -> tuple:
        log = open(os.path.join(self.tmp, f"{name}.log"), "w+b")
        full = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full,
                             start_new_session=True, cwd=ROOT)
        self.procs.append(p)
        return p, log.name

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)
        self.procs.clear()


def wait_text(path: str, needle: str, timeout: float, count: int = 1) -> str:
    deadline = time.monotonic() + timeout
    while True:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        if text.count(needle) >= count:
            return text
        if time.monotonic() > deadline:
            raise RuntimeError(f"{os.path.basename(path)}: no {needle!r} x{count} in {timeout}s:"
                               f"\n{text[-1500:]}")
        time.sleep(0.05)


def child(procs: Procs, name: str, python: str, args: list[str], env: dict | None = None
          ) -> dict:
    p, log = procs.start(name, [python, os.path.abspath(__file__), *args], env)
    try:
        p.wait(600)
    except subprocess.TimeoutExpired:
        procs.stop(p)
        return {"error": "timed out"}
    with open(log, "rb") as f:
        lines = f.read().decode("utf-8", "replace").strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"error": "no result: " + " | ".join(lines[-5:])}


def receiver_check(log: str, n: int) -> dict:
    """What the receiver stored: wait (bounded) for its n-th message and the STATS after it."""
    deadline = time.monotonic() + 120
    while True:
        with open(log, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        seen = [i for i, line in enumerate(lines) if line.startswith("MESSAGE ")]
        if len(seen) >= n and any(line.startswith("STATS") for line in lines[seen[-1]:]):
            break
        if time.monotonic() > deadline:
            break  # reported below as fewer complete messages
        time.sleep(0.05)
    text = "\n".join(lines)
    stats = [line for line in text.splitlines() if line.startswith("STATS")]
    fields = dict(re.findall(r"(\w+)=(\d+)", stats[-1])) if stats else {}
    complete = sum(1 for line in text.splitlines()
                   if line.startswith("MESSAGE ") and '"complete": true' in line)
    return {"messages_complete": complete,
            "frames_accepted": int(fields.get("frames_accepted", -1)),
            "frames_rejected": int(fields.get("frames_rejected", -1))}


def labmcp(procs: Procs, name: str, args: list[str]) -> tuple:
    p, log = procs.start(name, [LABMCP_PY, "-u", os.path.join(FIXTURES, "labmcp_receiver.py"),
                                *args])
    wait_text(log, "receiver on", 30)
    return p, log


def socat_pair(procs: Procs, name: str) -> tuple:
    a, b = os.path.join(procs.tmp, f"{name}A"), os.path.join(procs.tmp, f"{name}B")
    p, log = procs.start(f"socat-{name}", ["socat", "-d", "-d", f"pty,raw,echo=0,link={a}",
                                           f"pty,raw,echo=0,link={b}"])
    wait_text(log, "starting data transfer loop", 10)
    return p, a, b


def one(procs: Procs, label: str, n: int, setup, run) -> dict:
    """Fresh receiver, run one sender, check what the receiver took; stop them all."""
    try:
        ctx = setup()
        result = run(ctx)
        if "error" not in result:
            result.update(receiver_check(ctx["log"], n))
            result["orders_per_s"] = round(n / result["elapsed"], 1)
            result["frames_per_s"] = round(result["frames"] / result["elapsed"], 1)
            result["ms_per_frame"] = round(1000 * result["elapsed"] / result["frames"], 4)
            result["elapsed"] = round(result["elapsed"], 3)
            result["all_frames_accepted"] = (result["frames_rejected"] == 0 and
                                             result["frames_accepted"] == result["frames"] and
                                             result["messages_complete"] == n)
    except Exception as e:
        result = {"error": str(e)[-500:]}
    finally:
        procs.stop_all()
    print(f"{label:28s} {json.dumps(result)}", flush=True)
    return result


def main() -> int:
    sys.path.insert(0, ROOT)
    from tests.procs import free_port  # the parent only: children run in the peers' venvs

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--orders", type=int, default=200)
    args = ap.parse_args()
    n = max(1, min(args.orders, MAX_ORDERS))
    missing = [what for what, ok in (
        ("labmcp-astm-lis", os.access(LABMCP_PY, os.X_OK)),
        ("python-astm", os.access(PYASTM_PY, os.X_OK)),
        ("socat", bool(subprocess.run(["sh", "-c", "command -v socat"],
                                      capture_output=True).stdout))) if not ok]
    if missing:
        print(json.dumps({"error": f"peers missing: {missing}; run .ci/peers-astm.sh"}))
        return 1
    procs = Procs()
    me = sys.executable
    pyastm_env = {"PYTHONPATH": SHIM}
    results: dict = {"orders": n, "frames_per_order": 4, "receiver": "labmcp-astm-lis 0.1.3",
                     "tcp": {}, "pty": {}}
    try:
        def tcp_setup() -> dict:
            port = free_port()
            _, log = labmcp(procs, "labmcp-tcp", ["tcp-listen", str(port)])
            return {"port": port, "log": log}

        tcp = results["tcp"]
        tcp["ours"] = one(procs, "tcp ours", n, tcp_setup, lambda c: child(
            procs, "ours-tcp", me, ["_ours", f"astm://127.0.0.1:{c['port']}", str(n)]))
        tcp["python_astm"] = one(procs, "tcp python-astm", n, tcp_setup, lambda c: child(
            procs, "pyastm-tcp", PYASTM_PY, ["_pyastm", str(c["port"]), str(n)], pyastm_env))
        tcp["floor"] = one(procs, "tcp floor (raw ACK loop)", n, tcp_setup, lambda c: child(
            procs, "floor-tcp", me, ["_floor", "tcp", str(c["port"]), str(n)]))

        def pty_setup() -> dict:
            _, a, b = socat_pair(procs, "tty")
            _, log = labmcp(procs, "labmcp-pty", ["serial", b, "9600"])
            return {"ours": a, "log": log}

        def pty_bridge_setup() -> dict:
            # python-astm speaks TCP only: TCP -> socat -> pty -> receiver.
            port = free_port()
            c = os.path.join(procs.tmp, "ttyBridge")
            _, slog = procs.start("socat-bridge", [
                "socat", "-d", "-d", f"pty,raw,echo=0,link={c}",
                f"tcp-listen:{port},bind=127.0.0.1,reuseaddr"])
            wait_text(slog, "listening on", 10)
            _, log = labmcp(procs, "labmcp-bridge", ["serial", c, "9600"])
            return {"port": port, "log": log}

        pty = results["pty"]
        pty["ours"] = one(procs, "pty ours", n, pty_setup, lambda c: child(
            procs, "ours-pty", me, ["_ours", f"astm+serial://{c['ours']}?baudrate=9600", str(n)]))
        pty["python_astm"] = one(procs, "pty python-astm (via TCP)", n, pty_bridge_setup,
                                 lambda c: child(procs, "pyastm-pty", PYASTM_PY,
                                                 ["_pyastm", str(c["port"]), str(n)],
                                                 pyastm_env))
        pty["floor"] = one(procs, "pty floor (raw ACK loop)", n, pty_setup, lambda c: child(
            procs, "floor-pty", me, ["_floor", "serial", c["ours"], str(n)]))
    finally:
        procs.stop_all()

    summary: dict = {}
    for name in ("tcp", "pty"):
        r = results[name]
        ours, base, floor = r["ours"], r["python_astm"], r["floor"]
        if all("ms_per_frame" in x for x in (ours, base, floor)):
            summary[name] = {
                "ours_orders_per_s": ours["orders_per_s"],
                "python_astm_orders_per_s": base["orders_per_s"],
                "ours_frames_per_s": ours["frames_per_s"],
                "python_astm_frames_per_s": base["frames_per_s"],
                "ratio_vs_python_astm": round(ours["orders_per_s"] / base["orders_per_s"], 2),
                "receiver_ack_rtt_ms_per_frame": floor["ms_per_frame"],
                "link_added_ms_per_frame": round(ours["ms_per_frame"] - floor["ms_per_frame"],
                                                 4),
                "strict_receiver_accepted_every_frame": ours["all_frames_accepted"],
            }
    results["summary"] = summary
    ok = len(summary) == 2 and all(s["strict_receiver_accepted_every_frame"]
                                   for s in summary.values())
    results["ok"] = ok
    if ok:
        shutil.rmtree(procs.tmp, ignore_errors=True)
    else:
        results["logs"] = procs.tmp
    print(json.dumps(results))
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        mode, rest = sys.argv[1], sys.argv[2:]
        if mode == "_ours":
            res = run_ours(rest[0], int(rest[1]))
        elif mode == "_pyastm":
            res = run_pyastm(int(rest[0]), int(rest[1]))
        else:
            res = run_floor(rest[0], rest[1], int(rest[2]))
        print(json.dumps(res), flush=True)
        sys.exit(0)
    sys.exit(main())
