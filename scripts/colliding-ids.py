#!/usr/bin/env python3
"""Tips whose ids a client computed to collide in the server's id tables (docs/benchmarks.md,
"Session 20"). Before the tables' hash was keyed (src/ledger/hash.rs) a fixed multiplicative
hash placed ids, and its inverse gives ids that share one probe run, or one stripe of the id
directory. Against a server started with

    stormledger serve --data-dir DIR --shards 1 --durability buffered --token tok --listen 127.0.0.1:PORT

    colliding-ids.py PORT random N      # N tips with random ids: the baseline
    colliding-ids.py PORT colliding N   # N tips whose ids share one home bucket (fixed hash)
    colliding-ids.py PORT stripes N     # N tips in each of 4 directory stripes, then 8192 random
                                        # ids: how many are refused busy

The payer does not exist: every tip is answered `account_not_found` (remembered under its id
like any answer), so no setup is needed. Frames are built before the clock starts. Standard
library only (CRC-32C in Python: building the frames takes a few seconds).
"""
import random
import socket
import struct
import sys
import time

MAGIC, TOKEN = b"SLDG", "tok"
K = 0x9E3779B97F4A7C15  # the multiplier the tables used before the keyed hash
M = 1 << 64
K_INVERSE = pow(K, -1, M)


def _table():
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t.append(c)
    return t


_T = _table()


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c = (c >> 8) ^ _T[(c ^ b) & 0xFF]
    return c ^ 0xFFFFFFFF


def frame(kind, count, request_id, body):
    header = struct.pack("<4sHHHHIQIII", MAGIC, 1, kind, 0, 0, count, request_id, len(body),
                         crc32c(body) if body else 0, 0)
    return header + struct.pack("<I", crc32c(header)) + body


def tip(tip_id):
    # kind 6 (tip), id, a = payer 1 (absent), b = streamer 2, c = 1 coin.
    return struct.pack("<BBHIQQQQQQ24s", 6, 0, 0, 0, tip_id, 1, 2, 1, 0, 0, b"")


class Connection:
    def __init__(self, port):
        self.socket = socket.create_connection(("127.0.0.1", port))
        self.buffer = b""
        token = TOKEN.encode()
        body = struct.pack("<BBHI", 1, 0, len(token), 0) + token + b"\0" * (120 - len(token))
        self.socket.sendall(frame(1, 1, 1, body))
        kind, _, _, _ = self.read()
        assert kind == 2, "authentication failed"

    def read_exactly(self, n):
        while len(self.buffer) < n:
            data = self.socket.recv(1 << 20)
            if not data:
                raise EOFError("closed")
            self.buffer += data
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def read(self):
        header = self.read_exactly(40)
        _, _, kind, _, _, count, request_id, body_len, _, _, _ = struct.unpack("<4sHHHHIQIIII", header)
        return kind, count, request_id, self.read_exactly(body_len)


def run(port, ids, label, per_frame=4096, window=8):
    frames = [frame(4, len(ids[k:k + per_frame]), k + 1, b"".join(tip(i) for i in ids[k:k + per_frame]))
              for k in range(0, len(ids), per_frame)]
    connection = Connection(port)
    statuses, sent, answered = {}, 0, 0
    start = time.time()
    while answered < len(frames):
        while sent < len(frames) and sent - answered < window:
            connection.socket.sendall(frames[sent])
            sent += 1
        kind, _, _, body = connection.read()
        answered += 1
        assert kind == 5, f"frame kind {kind}"
        for at in range(0, len(body), 32):
            status = struct.unpack_from("<H", body, at)[0]
            statuses[status] = statuses.get(status, 0) + 1
    seconds = time.time() - start
    print(f"{label}: {len(ids)} tips in {seconds:.2f} s ({len(ids) / seconds:,.0f}/s), statuses {statuses}",
          flush=True)
    return statuses


def one_bucket(n):
    """Ids whose products with K share bits 17-33 (a table's home bucket), the rest counting."""
    out, i = [], 0
    while len(out) < n:
        product = (i << 40) | (12345 << 17) | (i & 0x1FFFF)
        candidate = (product * K_INVERSE) % M
        if 0 < candidate < (1 << 62):
            out.append(candidate)
        i += 1
    return out


def stripe_of(i):
    return ((i * K) % M) >> 56


def main():
    port, mode, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    rng = random.Random(20)
    if mode == "random":
        run(port, rng.sample(range(1, 1 << 62), n), "random ids")
    elif mode == "colliding":
        run(port, one_bucket(n), "ids sharing one home bucket under the fixed hash")
    elif mode == "stripes":
        targets = [10, 11, 12, 13]
        ids = []
        while len(ids) < n * len(targets):
            for s in targets:
                candidate = (((s << 56) | rng.getrandbits(56)) * K_INVERSE) % M
                if 0 < candidate < (1 << 62):
                    ids.append(candidate)
        run(port, ids, f"ids in stripes {targets} under the fixed hash")
        legit = rng.sample(range(1, 1 << 62), 8192 * 40)
        in_stripes = [i for i in legit if stripe_of(i) in targets][:8192]
        run(port, legit[:8192], "then random ids (status 3 = busy)")
        run(port, in_stripes, "then random ids of those stripes (status 3 = busy)")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
