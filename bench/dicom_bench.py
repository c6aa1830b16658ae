"""
DICOM C-STORE throughput, side by side with dcmtk (a C++ tool), in one run:

  SCU: our DICOMSender -> dcmtk storescp   vs   dcmtk storescu -> the same storescp
  SCP: dcmtk storescu -> our StorageChannel vs   dcmtk storescu -> dcmtk storescp

with 100 small instances (Basic Text SR, ~1 kB) and 10 large ones (CT, 5 MB pixel data);
and the small set stored by 4 storescu processes at once (4 associations), to our channel
and to storescp.
All dcmtk processes run with TCP_NODELAY=1 (dcmtk's fastest setting; with Nagle on, every
dcmtk exchange waits ~40 ms for a delayed ACK).  Our storage channel fsyncs each instance
before answering (its custody rule); storescp does not.

Prints a table, and as the last line one JSON object.  Binds 127.0.0.1 / free ports only,
kills what it starts, removes its temporary folder.  Usage: python bench/dicom_bench.py
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.internet.utils import getProcessOutputAndValue  # noqa: E402

from medagent.destination import parse_destination  # noqa: E402
from medagent.dicom.scp import StorageChannel  # noqa: E402
from medagent.dicom.scu import DICOMSender  # noqa: E402
from tests.procs import free_port  # noqa: E402

SMALL, LARGE = 100, 10
PARALLEL = 4  # concurrent storescu associations in the parallel SCP phase
LARGE_PIXELS = 1600 * 1600  # 16-bit: 5.12 MB of pixel data
DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")
PHASE_TIMEOUT = 300


def write_instance(path: str, large: bool) -> int:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName, ds.PatientID = "BENCH^PATIENT", "B1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.AccessionNumber, ds.StudyDate, ds.StudyTime = "BENCH1", "20240101", "120000"
    if large:
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        ds.Modality = "CT"
        ds.Rows = ds.Columns = 1600
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = os.urandom(LARGE_PIXELS * 2)
    else:
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
        ds.Modality = "SR"
        ds.ValueType = "CONTAINER"
        ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.save_as(path, enforce_file_format=True)
    return os.path.getsize(path)


def rates(count: int, size: int, seconds: float) -> dict:
    return {"instances": count, "bytes": size, "seconds": round(seconds, 4),
            "instancesPerSecond": round(count / seconds, 1),
            "MBps": round(size / seconds / 1e6, 2)}


async def wait_port(port: int, timeout: float = 15) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            await task.deferLater(reactor, 0.05, lambda: None)
    raise RuntimeError(f"port {port} did not open")


async def storescu(files: list[str], port: int, aec: str) -> float:
    started = time.perf_counter()
    out, err, code = await getProcessOutputAndValue(
        shutil.which("storescu"), ["-aet", "BENCH", "-aec", aec, "127.0.0.1", str(port),
                                   *files], env=DCMTK_ENV)
    elapsed = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"storescu failed ({code}): {(out + err)[-500:]!r}")
    return elapsed


async def ours_scu(files: list[str], port: int) -> float:
    bodies = []
    for f in files:
        with open(f, "rb") as fh:
            bodies.append(base64.b64encode(fh.read()).decode())
    sender = DICOMSender(reactor, ae_title="BENCH")
    dest = parse_destination(f"dicom://STORESCP@127.0.0.1:{port}")
    try:
        started = time.perf_counter()
        for body in bodies:
            reply = await sender.send(dest, "application/dicom", body, {})
            if not reply.delivered:
                raise RuntimeError(reply.body)
        return time.perf_counter() - started
    finally:
        await sender.close()


async def main(reactor) -> None:
    for tool in ("storescp", "storescu"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: run .ci/peers-dicom.sh")
    tmp = tempfile.mkdtemp(prefix="medagent-dicom-bench-")
    procs = []
    channel = None
    try:
        small = [os.path.join(tmp, f"small{i}.dcm") for i in range(SMALL)]
        large = [os.path.join(tmp, f"large{i}.dcm") for i in range(LARGE)]
        sizes = {"small": sum(write_instance(p, False) for p in small),
                 "large": sum(write_instance(p, True) for p in large)}
        sets = {"small": small, "large": large}

        port = free_port()
        out_dir = os.path.join(tmp, "storescp")
        os.makedirs(out_dir)
        from twisted.internet import protocol

        class Quiet(protocol.ProcessProtocol):
            def __init__(self) -> None:
                self.ended = defer.Deferred()

            def processEnded(self, reason) -> None:
                self.ended.callback(None)

        scp = Quiet()
        procs.append(reactor.spawnProcess(scp, shutil.which("storescp"),
                                          ["storescp", "--aetitle", "STORESCP", "-od",
                                           out_dir, str(port)], env=DCMTK_ENV))
        await wait_port(port)

        results: dict = {"scu": {}, "scp": {}}
        forwarded = [0]

        def forward(content_type, body, remote):
            forwarded[0] += 1
            return defer.succeed(None)

        ch_port = free_port()
        channel = StorageChannel(forward, reactor=reactor, ae_title="AGENTSCP",
                                 storage_dir=os.path.join(tmp, "channel"),
                                 endpoint=f"tcp:{ch_port}:interface=127.0.0.1")
        await channel.startService()

        for name, files in sets.items():
            # warm-up (association set-up paths, imports, page cache)
            await ours_scu(files[:2], port)
            await storescu(files[:2], port, "STORESCP")
            await storescu(files[:2], ch_port, "AGENTSCP")
            t_dcmtk = await storescu(files, port, "STORESCP")
            t_ours = await ours_scu(files, port)
            results["scu"][name] = {
                "ours": rates(len(files), sizes[name], t_ours),
                "dcmtk": rates(len(files), sizes[name], t_dcmtk),
                "ratio": round(t_dcmtk / t_ours, 2),
            }
            t_storescp = await storescu(files, port, "STORESCP")
            t_channel = await storescu(files, ch_port, "AGENTSCP")
            results["scp"][name] = {
                "ours": rates(len(files), sizes[name], t_channel),
                "dcmtk": rates(len(files), sizes[name], t_storescp),
                "ratio": round(t_storescp / t_channel, 2),
            }
        # Several modalities at once: PARALLEL storescu processes sharing the small set, each
        # on its own association - where our channel's writes are grouped (one folder fsync
        # for the instances that arrive together).
        async def parallel(to_port: int, aec: str) -> float:
            shares = [small[i::PARALLEL] for i in range(PARALLEL)]
            started = time.perf_counter()
            await defer.gatherResults([defer.ensureDeferred(storescu(share, to_port, aec))
                                       for share in shares])
            return time.perf_counter() - started

        groups_before = getattr(getattr(channel, "_commit", None), "groups", None)
        t_storescp = await parallel(port, "STORESCP")
        t_channel = await parallel(ch_port, "AGENTSCP")
        groups = getattr(getattr(channel, "_commit", None), "groups", None)
        results["scpParallel"] = {
            "associations": PARALLEL,
            "ours": rates(SMALL, sizes["small"], t_channel),
            "dcmtk": rates(SMALL, sizes["small"], t_storescp),
            "ratio": round(t_storescp / t_channel, 2),
            "writeGroups": None if groups is None else groups - groups_before,
        }
        results["forwarded"] = forwarded[0]
        results["notes"] = ("ratio = dcmtk time / our time (>= 1 means we are faster); "
                            "dcmtk with TCP_NODELAY=1; our SCP fsyncs every instance")
        print(f"{'direction':<8} {'set':<6} {'ours inst/s':>12} {'ours MB/s':>10} "
              f"{'dcmtk inst/s':>13} {'dcmtk MB/s':>11} {'ratio':>6}")
        for direction in ("scu", "scp"):
            for name in ("small", "large"):
                r = results[direction][name]
                print(f"{direction:<8} {name:<6} {r['ours']['instancesPerSecond']:>12} "
                      f"{r['ours']['MBps']:>10} {r['dcmtk']['instancesPerSecond']:>13} "
                      f"{r['dcmtk']['MBps']:>11} {r['ratio']:>6}")
        r = results["scpParallel"]
        print(f"{'scp x' + str(PARALLEL):<8} {'small':<6} {r['ours']['instancesPerSecond']:>12} "
              f"{r['ours']['MBps']:>10} {r['dcmtk']['instancesPerSecond']:>13} "
              f"{r['dcmtk']['MBps']:>11} {r['ratio']:>6}")
        print(json.dumps(results))
    finally:
        if channel is not None and channel.running:
            await channel.stopService()
        for p in procs:
            try:
                p.signalProcess("KILL")
            except Exception:
                pass
            await scp.ended
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    def run(reactor):
        d = defer.ensureDeferred(main(reactor))
        return d.addTimeout(4 * PHASE_TIMEOUT, reactor)

    task.react(run)
