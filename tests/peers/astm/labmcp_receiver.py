# Strict-ish ASTM E1381 receiver (checks frame numbers mod 8, checksums, ETB joins, 30 s receive
# timeout) from the PyPI package labmcp-astm-lis, driven without its MCP layer.
# Usage: labmcp_receiver.py tcp-listen 15210   |   labmcp_receiver.py serial $PEERS/serial/ttyB [baud]
# (medagent copy: every output line is written whole, under a lock - the receiver thread's EVENT
# lines and the main thread's MESSAGE lines used to interleave mid-line under load.)
import sys, time, json, threading
_lock = threading.Lock()
def say(*parts):
    line = ' '.join(str(p) for p in parts) + '\n'
    with _lock:
        sys.stdout.write(line)
        sys.stdout.flush()
from labmcp.transports import open_transport
from labmcp_astm_lis.driver import ASTMReceiver, ListenTransport, ResultStore

class PrintAudit:                                   # receives the receiver's protocol events
    def event(self, message, where=None): say('EVENT', message)
    def __getattr__(self, name): return lambda *a, **k: None

store = ResultStore(redacted=False)
kind, target = sys.argv[1], sys.argv[2]
if kind == 'tcp-listen':
    open_link = lambda: ListenTransport('127.0.0.1', int(target))
else:
    baud = int(sys.argv[3]) if len(sys.argv) > 3 else 9600
    open_link = lambda: open_transport(f'serial://{target}', baudrate=baud, bytesize=8, parity='N', stopbits=1)
rx = ASTMReceiver(open_link, mode=kind, where=f'{kind}:{target}', store=store, audit=PrintAudit(), redact=False)
say(f'labmcp-astm-lis receiver on {kind}:{target}')
seen = 0
while True:
    time.sleep(0.3)
    msgs, total = store.messages(limit=1000)
    if total > seen:
        for m in msgs[-(total - seen):]:
            d = json.loads(json.dumps(m, default=lambda o: getattr(o, '__dict__', str(o))))
            say('MESSAGE', json.dumps({k: d.get(k) for k in ('complete', 'source', 'records')}))
        seen = total
        say('STATS', rx.protocol.stats)
