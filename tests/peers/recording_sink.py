"""
An MLLP device for fault tests (ours, not a third-party peer): appends the MSH-10 of every
message it receives to a file, one per line, flushed, and answers AA.  With --ignore CTRL it
never answers that control id (a device that "never ACKs").

    recording_sink.py PORT LOGFILE [--ignore CTRL]
"""
import asyncio
import sys


async def main(port: int, path: str, ignore: set[bytes]) -> None:
    out = open(path, "ab", buffering=0)

    async def handle(reader, writer):
        print("connection accepted", flush=True)  # counted by tests (no payload)
        buf = b""
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                buf += chunk
                while b"\x1c\r" in buf:
                    frame, buf = buf.split(b"\x1c\r", 1)
                    msg = frame[frame.find(b"\x0b") + 1:]
                    fields = msg.split(b"\r", 1)[0].split(b"|")
                    ctrl = fields[9] if len(fields) > 9 else b""
                    out.write(ctrl + b"\n")
                    if ctrl in ignore:
                        continue
                    writer.write(b"\x0bMSH|^~\\&|SINK|LAB|EHR|HOSP|20240101120000||ACK^O01^ACK|A"
                                 + ctrl + b"|P|2.5.1\rMSA|AA|" + ctrl + b"\r\x1c\r")
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(f"recording sink on 127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    args = sys.argv[1:]
    ignore = set()
    if "--ignore" in args:
        i = args.index("--ignore")
        ignore.add(args[i + 1].encode())
        del args[i:i + 2]
    asyncio.run(main(int(args[0]), args[1], ignore))
