#!/usr/bin/env python3
"""Many clients against one Postgres-protocol endpoint: bench/clients.sh runs it.

    clients.py PORT PID IDLE ACTIVE QUERIES TENANTS

Opens IDLE client connections (logged in, then left idle), PENDING at a time,
and reports the connect rate and the resident memory the server process PID
gained per client. Then ACTIVE of those connections each run QUERIES tenant
lookups (`SELECT v FROM t WHERE tenant_id = $n`, simple protocol) one after
another, all at once, and reports p50/p99/max latency and the queries per
second. Prints one line of `key=value` pairs. The client speaks the protocol
itself (no driver), so that 10,000 connections cost the client little.
"""

import asyncio
import random
import struct
import sys
import time

PENDING = 200


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def read_until_ready(reader: asyncio.StreamReader) -> bytes:
    """Reads messages up to ReadyForQuery; returns the first error's body, if any."""
    error = b""
    while True:
        head = await reader.readexactly(5)
        tag, n = head[:1], struct.unpack("!i", head[1:])[0]
        body = await reader.readexactly(n - 4)
        if tag == b"E" and not error:
            error = body
        if tag == b"Z":
            return error


async def login(port: int):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    params = b"user\0postgres\0database\0app\0\0"
    writer.write(struct.pack("!ii", len(params) + 8, 196608) + params)
    await writer.drain()
    error = await read_until_ready(reader)
    if error:
        raise RuntimeError(f"login refused: {error!r}")
    return reader, writer


async def query(conn, sql: str) -> None:
    reader, writer = conn
    body = sql.encode() + b"\0"
    writer.write(b"Q" + struct.pack("!i", len(body) + 4) + body)
    await writer.drain()
    error = await read_until_ready(reader)
    if error:
        raise RuntimeError(f"query failed: {error!r}")


async def main() -> None:
    port, pid, idle, active, queries, tenants = map(int, sys.argv[1:7])
    before = rss_kb(pid)
    conns = []
    gate = asyncio.Semaphore(PENDING)

    async def one():
        async with gate:
            conns.append(await login(port))

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(idle)))
    connect_s = time.perf_counter() - started
    # Let the server settle (buffers of finished logins returned) before reading.
    await asyncio.sleep(1.0)
    held = rss_kb(pid)

    latencies = []
    rng = random.Random(7)

    async def work(conn):
        for _ in range(queries):
            t = rng.randint(1, tenants)
            s = time.perf_counter()
            await query(conn, f"SELECT v FROM t WHERE tenant_id = {t}")
            latencies.append(time.perf_counter() - s)

    started = time.perf_counter()
    await asyncio.gather(*(work(c) for c in rng.sample(conns, active)))
    storm_s = time.perf_counter() - started
    latencies.sort()
    pct = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e3
    for _, writer in conns:
        writer.write(b"X\0\0\0\4")
        writer.close()
    print(
        f"clients={len(conns)} connect_per_s={idle / connect_s:.0f} "
        f"rss_before_kb={before} rss_held_kb={held} "
        f"kb_per_idle_client={(held - before) / idle:.1f} "
        f"qps={len(latencies) / storm_s:.0f} p50_ms={pct(0.50):.3f} p99_ms={pct(0.99):.3f} max_ms={latencies[-1] * 1e3:.3f}"
    )


asyncio.run(main())
