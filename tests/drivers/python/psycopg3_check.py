"""psycopg 3 through the router: server-side prepared statements, binary
parameters and results, transactions, executemany, pipeline mode, COPY and
SQLSTATEs. Usage: psycopg3_check.py ROUTER_URL TENANT_A TENANT_B"""

import common
from common import check, check_row, row

try:
    import psycopg
    from psycopg import errors
    from psycopg.types.json import Jsonb
except ImportError as e:
    common.missing("psycopg", e)

url, a, b = common.args()
print(f"driver: psycopg {psycopg.__version__} ({psycopg.pq.__impl__}, libpq {psycopg.pq.version()})")

INSERT = f"INSERT INTO items ({common.COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
INSERT_BINARY = f"INSERT INTO items ({common.COLUMNS}) VALUES (%b, %b, %b, %b, %b, %b, %b, %b, %b, %b)"


def params(t, i):
    r = row(t, i)
    return r[:9] + (Jsonb(r[9]),)


def expect_sqlstate(code, fn, what):
    try:
        fn()
    except psycopg.Error as e:
        check(e.sqlstate == code, f"{what}: SQLSTATE {e.sqlstate} ({e}), expected {code}")
        return e
    common.fail(f"{what}: no error, expected SQLSTATE {code}")


def ids_through_router(conn):
    return [tuple(r) for r in conn.execute("SELECT tenant_id, id FROM items ORDER BY tenant_id, id")]


with psycopg.connect(url, autocommit=True) as conn:
    check(conn.execute("SELECT 1").fetchone()[0] == 1, "SELECT 1")

    # Prepared statements (prepare=True: a named statement on first use), text
    # parameters for tenant a, binary ones for tenant b; read back in both formats.
    conn.execute(INSERT, params(a, 1), prepare=True)
    conn.execute(INSERT_BINARY, params(b, 1), prepare=True)
    for t in (a, b):
        for _ in range(3):  # the prepared statement is reused
            check_row(conn.execute(common.SELECT_ONE, (t, 1), prepare=True).fetchone(), t, 1, "text results")
        cur = conn.cursor(binary=True)
        check_row(cur.execute(common.SELECT_ONE, (t, 1)).fetchone(), t, 1, "binary results")

    # A transaction that rolls back leaves nothing; one that commits writes on both shards.
    with conn.transaction(force_rollback=True):
        conn.execute(INSERT, params(a, 2))
        conn.execute(INSERT, params(b, 2))
    with conn.transaction():
        conn.execute(INSERT, params(a, 3))
        conn.execute(INSERT, params(b, 3))
    check(conn.execute("SELECT count(*) FROM items WHERE id = 2").fetchone()[0] == 0, "rolled-back rows are visible")

    # executemany (psycopg 3 pipelines it) across both shards in one transaction.
    with conn.transaction():
        conn.cursor().executemany(INSERT, [params(a, 10), params(b, 10), params(a, 11), params(b, 11)])
    # A batch whose last row fails: nothing of it stays on either shard.
    def failing_batch():
        with conn.transaction():
            conn.cursor().executemany(INSERT, [params(a, 20), params(b, 20), params(b, 21), params(a, 1)])
    expect_sqlstate("23505", failing_batch, "executemany with a duplicate row")

    # Pipeline mode, explicitly: statements and their results in one round trip.
    with conn.pipeline():
        with conn.transaction():
            conn.execute(INSERT, params(a, 40))
            conn.execute(INSERT, params(b, 40))
            conn.execute(INSERT, params(a, 41))
            cur = conn.execute(INSERT, params(b, 41))
        check(cur.rowcount == 1, f"pipelined INSERT rowcount {cur.rowcount}")
    # A pipeline whose transaction fails at its last statement commits nothing.
    def failing_pipeline():
        with conn.pipeline():
            with conn.transaction():
                conn.execute(INSERT, params(a, 42))
                conn.execute(INSERT, params(b, 42))
                conn.execute(INSERT, params(b, 1))
    expect_sqlstate("23505", failing_pipeline, "pipeline with a duplicate row")

    # A pipeline of different statements: psycopg parses the unnamed statement
    # again before each; each must run its own text, reads seeing the writes
    # before them.
    amount = "SELECT amount FROM items WHERE tenant_id = %s AND id = 40"
    with conn.pipeline():
        before = conn.execute(amount, (b,))
        conn.execute("UPDATE items SET amount = amount + 1 WHERE tenant_id = %s AND id = 40", (b,))
        after = conn.execute("SELECT amount, %s::int FROM items WHERE tenant_id = %s AND id = 40", (7, b))
        conn.execute("UPDATE items SET amount = amount - 1 WHERE tenant_id = %s AND id = 40", (b,))
        last = conn.execute(amount, (b,))
    start = before.fetchone()[0]
    got = (after.fetchone(), last.fetchone()[0])
    check(got == ((start + 1, 7), start), f"a pipeline of different statements read {got}, from {start}")

    # COPY FROM STDIN, text format, rows of both shards.
    with conn.cursor().copy(f"COPY items ({common.COLUMNS}) FROM STDIN") as cp:
        for i in (30, 31):
            for t in (a, b):
                cp.write(common.copy_line(t, i))
    # COPY TO STDOUT of one tenant's rows.
    with conn.cursor().copy(f"COPY (SELECT id FROM items WHERE tenant_id = {a} ORDER BY id) TO STDOUT") as cp:
        copied = [int(r[0]) for r in cp.rows()]
    check(copied == [1, 3, 10, 11, 30, 31, 40, 41], f"COPY TO STDOUT gave {copied}")

    # Errors come back with their SQLSTATE and leave the connection usable.
    expect_sqlstate("23505", lambda: conn.execute(INSERT, params(a, 1)), "duplicate key")
    expect_sqlstate("23505", lambda: conn.execute(INSERT, params(b, 1), prepare=True), "duplicate key, prepared")
    e = expect_sqlstate(
        "0A000", lambda: conn.execute("UPDATE items SET tenant_id = %s WHERE tenant_id = %s", (b, a)), "moving a row"
    )
    check(isinstance(e, errors.FeatureNotSupported), f"0A000 raised as {type(e).__name__}")
    expect_sqlstate("22P02", lambda: conn.execute("SELECT * FROM items WHERE tenant_id = 'x'"), "bad key")

    want = common.expected_ids(a, b, [1, 3, 10, 11, 30, 31, 40, 41])
    got = ids_through_router(conn)
    check(got == want, f"rows through the router: {got}, expected {want}")
    for t in (a, b):
        for i in (3, 10, 30, 40):
            check_row(conn.execute(common.SELECT_ONE, (t, i)).fetchone(), t, i, f"row {i}")

print("ok")
