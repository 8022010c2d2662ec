"""asyncpg through the router: prepared statements (asyncpg prepares every
statement and uses binary parameters and results), transactions, executemany,
COPY and SQLSTATEs. Usage: asyncpg_check.py ROUTER_URL TENANT_A TENANT_B"""

import asyncio
import io
import json

import common
from common import check, check_row, row

try:
    import asyncpg
except ImportError as e:
    common.missing("asyncpg", e)

url, a, b = common.args()
print(f"driver: asyncpg {asyncpg.__version__}")

COLS = common.COLUMNS
INSERT = f"INSERT INTO items ({COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
SELECT_ONE = f"SELECT {COLS} FROM items WHERE tenant_id = $1 AND id = $2"


def params(t, i):
    r = row(t, i)
    return r[:9] + (json.dumps(r[9]),)


async def expect_sqlstate(code, coro, what):
    try:
        await coro
    except asyncpg.PostgresError as e:
        check(e.sqlstate == code, f"{what}: SQLSTATE {e.sqlstate} ({e}), expected {code}")
        return e
    common.fail(f"{what}: no error, expected SQLSTATE {code}")


async def main():
    conn = await asyncpg.connect(url)
    check(await conn.fetchval("SELECT 1") == 1, "SELECT 1")

    # A prepared statement, run for both shards, and read back (binary results).
    insert = await conn.prepare(INSERT)
    await insert.fetch(*params(a, 1))
    await insert.fetch(*params(b, 1))
    select = await conn.prepare(SELECT_ONE)
    for t in (a, b):
        for _ in range(3):
            check_row(await select.fetchrow(t, 1), t, 1, "prepared fetchrow")
        check_row(await conn.fetchrow(SELECT_ONE, t, 1), t, 1, "fetchrow")

    # A transaction rolled back leaves nothing; one committed writes both shards.
    tr = conn.transaction()
    await tr.start()
    await conn.execute(INSERT, *params(a, 2))
    await conn.execute(INSERT, *params(b, 2))
    await tr.rollback()
    async with conn.transaction():
        await conn.execute(INSERT, *params(a, 3))
        await conn.execute(INSERT, *params(b, 3))
    check(await conn.fetchval("SELECT count(*) FROM items WHERE id = 2") == 0, "rolled-back rows are visible")
    # One statement for both tenants inside a transaction that already wrote
    # one of them: it joins the transaction on both shards.
    async with conn.transaction():
        await conn.execute("UPDATE items SET flag = flag WHERE tenant_id = $1 AND id = 3", a)
        status = await conn.execute("UPDATE items SET flag = flag WHERE tenant_id = ANY($1) AND id = 3", [a, b])
        check(status == "UPDATE 2", f"an UPDATE of both tenants inside a transaction: {status}")
    # A read of every shard inside a transaction sees its own writes there.
    async with conn.transaction():
        await conn.execute(INSERT, *params(a, 4))
        n = await conn.fetchval("SELECT count(*) FROM items WHERE id = 4")
        check(n == 1, f"a read of every shard inside the transaction that wrote the row: {n}")
    check(await conn.fetchval("SELECT count(*) FROM items WHERE id = 4") == 1, "committed")
    await conn.execute("DELETE FROM items WHERE tenant_id = $1 AND id = 4", a)

    # executemany: one pipeline; across shards it needs a transaction block.
    async with conn.transaction():
        await conn.executemany(INSERT, [params(a, 10), params(b, 10), params(a, 11), params(b, 11)])
    async def failing_batch():
        async with conn.transaction():
            await conn.executemany(INSERT, [params(a, 20), params(b, 20), params(b, 21), params(a, 1)])
    await expect_sqlstate("23505", failing_batch(), "executemany with a duplicate row")
    # Without a transaction block the pipeline is one implicit transaction, as
    # in Postgres: committed on both shards, or (a row fails) on neither.
    await conn.executemany(INSERT, [params(a, 12), params(b, 12)])
    await expect_sqlstate(
        "23505", conn.executemany(INSERT, [params(a, 22), params(b, 22), params(b, 1)]), "executemany, no BEGIN"
    )

    # COPY: CSV from a file-like object, and the binary format
    # (copy_records_to_table), both split by tenant.
    csv = "".join(
        ",".join([str(t), str(i), '"' + common.note(t, i).replace('"', '""') + '"', f"{i}.25",
                  "t" if i % 2 == 0 else "f", "\\x" + row(t, i)[5].hex(), row(t, i)[6].isoformat(),
                  str(row(t, i)[7]), repr(i + 0.5), '"' + json.dumps(row(t, i)[9]).replace('"', '""') + '"']) + "\n"
        for i in (30, 31) for t in (a, b)
    )
    status = await conn.copy_to_table("items", source=io.BytesIO(csv.encode()), columns=COLS.split(", "), format="csv")
    check(status == "COPY 4", f"COPY status {status!r}")
    records = [params(t, i) for i in (32, 33) for t in (a, b)]
    status = await conn.copy_records_to_table("items", records=records, columns=COLS.split(", "))
    check(status == "COPY 4", f"binary COPY status {status!r}")
    # A NULL tenant in binary COPY: 23502, and none of the COPY's rows stay.
    await expect_sqlstate(
        "23502",
        conn.copy_records_to_table("items", records=[(a, 34), (None, 35)], columns=["tenant_id", "id"]),
        "binary COPY with a NULL tenant",
    )
    check(await conn.fetchval("SELECT count(*) FROM items WHERE id IN (34, 35)") == 0, "rows of a failed COPY")
    # Binary COPY out of every shard is one stream: one header, every row, one trailer.
    out = io.BytesIO()
    await conn.copy_from_table("items", columns=["tenant_id", "id"], format="binary", output=out)
    data = out.getvalue()
    check(data[:11] == b"PGCOPY\n\xff\r\n\0", f"binary COPY TO header {data[:19]!r}")
    at, got = 19 + int.from_bytes(data[15:19], "big"), []
    while data[at:at + 2] != b"\xff\xff":
        check(data[at:at + 6] == b"\0\x02\0\0\0\x08", f"binary COPY TO tuple at {at}: {data[at:at + 6]!r}")
        got.append((int.from_bytes(data[at + 6:at + 14], "big", signed=True), int.from_bytes(data[at + 18:at + 22], "big")))
        at += 22
    check(at + 2 == len(data), f"binary COPY TO: {len(data) - at - 2} bytes after the trailer")
    want = common.expected_ids(a, b, [1, 3, 10, 11, 12, 30, 31, 32, 33])
    check(sorted(got) == want, f"binary COPY TO gave {sorted(got)}, expected {want}")
    out = io.BytesIO()
    await conn.copy_from_query("SELECT id FROM items WHERE tenant_id = $1 ORDER BY id", a, output=out)
    check(
        out.getvalue().split() == [b"1", b"3", b"10", b"11", b"12", b"30", b"31", b"32", b"33"],
        f"COPY TO gave {out.getvalue()!r}",
    )

    # Errors with their SQLSTATE, the connection usable after each.
    e = await expect_sqlstate("23505", insert.fetch(*params(a, 1)), "duplicate key")
    check(isinstance(e, asyncpg.UniqueViolationError), f"23505 raised as {type(e).__name__}")
    e = await expect_sqlstate(
        "0A000", conn.execute("UPDATE items SET tenant_id = $1 WHERE tenant_id = $2", b, a), "moving a row"
    )
    check(isinstance(e, asyncpg.FeatureNotSupportedError), f"0A000 raised as {type(e).__name__}")
    await expect_sqlstate("22P02", conn.fetch("SELECT * FROM items WHERE tenant_id = 'x'"), "bad key")
    # A parameter of the wrong type is the driver's error, before the router.
    try:
        await select.fetch("x", 1)
        common.fail("a text tenant_id bound to an int8 parameter was accepted")
    except asyncpg.DataError:
        pass

    got = [tuple(r) for r in await conn.fetch("SELECT tenant_id, id FROM items ORDER BY tenant_id, id")]
    want = common.expected_ids(a, b, [1, 3, 10, 11, 12, 30, 31, 32, 33])
    check(got == want, f"rows through the router: {got}, expected {want}")
    check(await conn.fetchval("SELECT count(*) FROM items") == len(want), "count(*) across shards")
    for t in (a, b):
        for i in (3, 10, 11, 30, 32, 33):
            check_row(await select.fetchrow(t, i), t, i, f"row {i}")
    await conn.close()


asyncio.run(main())
print("ok")
