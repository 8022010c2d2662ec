"""psycopg2 through the router: parameters (psycopg2 quotes them into the
query text and sends simple queries), transactions, executemany and
execute_values batches, COPY and SQLSTATEs.
Usage: psycopg2_check.py ROUTER_URL TENANT_A TENANT_B"""

import io

import common
from common import check, check_row, row

try:
    import psycopg2
    import psycopg2.errorcodes
    import psycopg2.extras
except ImportError as e:
    common.missing("psycopg2", e)

url, a, b = common.args()
print(f"driver: psycopg2 {psycopg2.__version__}, libpq {psycopg2.extensions.libpq_version()}")
psycopg2.extras.register_uuid()

INSERT = f"INSERT INTO items ({common.COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"


def params(t, i):
    r = row(t, i)
    return r[:9] + (psycopg2.extras.Json(r[9]),)


def fetch(cur, t, i):
    cur.execute(common.SELECT_ONE, (t, i))
    return cur.fetchone()


def expect_sqlstate(code, fn, what):
    try:
        fn()
    except psycopg2.Error as e:
        check(e.pgcode == code, f"{what}: SQLSTATE {e.pgcode} ({e}), expected {code}")
        return e
    common.fail(f"{what}: no error, expected SQLSTATE {code}")


conn = psycopg2.connect(url)
cur = conn.cursor()
cur.execute("SELECT 1")
check(cur.fetchone()[0] == 1, "SELECT 1")
conn.rollback()

# Parameterized inserts (psycopg2 opens a transaction first: BEGIN, both shards, COMMIT).
cur.execute(INSERT, params(a, 1))
cur.execute(INSERT, params(b, 1))
conn.commit()
for t in (a, b):
    check_row(fetch(cur, t, 1), t, 1, "read back")
conn.commit()

# Rolled back: nothing stays. Committed: both shards.
cur.execute(INSERT, params(a, 2))
cur.execute(INSERT, params(b, 2))
conn.rollback()
cur.execute(INSERT, params(a, 3))
cur.execute(INSERT, params(b, 3))
conn.commit()
cur.execute("SELECT count(*) FROM items WHERE id = 2")
check(cur.fetchone()[0] == 0, "rolled-back rows are visible")
conn.commit()

# Batches: executemany in a transaction (one statement per row, both shards,
# one commit) and execute_values (one multi-row INSERT for both shards, which
# the router splits and commits on both or neither, in autocommit or inside a
# transaction block).
cur.executemany(INSERT, [params(a, 10), params(b, 10)])
conn.commit()
conn.autocommit = True
psycopg2.extras.execute_values(
    cur, f"INSERT INTO items ({common.COLUMNS}) VALUES %s", [params(a, 11), params(b, 11)]
)
def failing_values():
    psycopg2.extras.execute_values(
        cur, f"INSERT INTO items ({common.COLUMNS}) VALUES %s", [params(a, 21), params(b, 20), params(b, 1)]
    )
expect_sqlstate("23505", failing_values, "execute_values with a duplicate row")
conn.autocommit = False
def failing_batch():
    cur.executemany(INSERT, [params(a, 20), params(b, 20), params(b, 21), params(a, 1)])
expect_sqlstate("23505", failing_batch, "executemany with a duplicate row")
conn.rollback()
def values_in_a_block():
    psycopg2.extras.execute_values(
        cur, f"INSERT INTO items ({common.COLUMNS}) VALUES %s", [params(a, 22), params(b, 22)]
    )
# Inside a transaction block a multi-row INSERT for several shards joins the
# block on each shard: rolled back with it, nothing stays.
values_in_a_block()
for t in (a, b):
    cur.execute("SELECT count(*) FROM items WHERE tenant_id = %s AND id = 22", (t,))
    check(cur.fetchone()[0] == 1, "execute_values in a block sees its own row on each shard")
conn.rollback()
cur.execute("SELECT count(*) FROM items WHERE id = 22")
check(cur.fetchone()[0] == 0, "execute_values rolled back with its block")
conn.rollback()

# COPY FROM STDIN (copy_expert) with rows of both shards: split by the
# router outside a transaction block (autocommit), refused inside one.
data = io.StringIO("".join(common.copy_line(t, i) for i in (30, 31) for t in (a, b)))
def copy_in_a_block():
    cur.copy_expert(f"COPY items ({common.COLUMNS}) FROM STDIN", data)
expect_sqlstate("0A000", copy_in_a_block, "COPY across shards in a transaction block")
conn.rollback()
conn.autocommit = True
data.seek(0)
cur.copy_expert(f"COPY items ({common.COLUMNS}) FROM STDIN", data)
check(cur.rowcount == 4, f"COPY rowcount {cur.rowcount}")
conn.autocommit = False
out = io.StringIO()
cur.copy_expert(f"COPY (SELECT id FROM items WHERE tenant_id = {b} ORDER BY id) TO STDOUT", out)
check(out.getvalue().split() == ["1", "3", "10", "11", "30", "31"], f"COPY TO STDOUT gave {out.getvalue()!r}")
conn.commit()

# Errors, each in its own transaction, with the connection usable after.
conn.autocommit = True
expect_sqlstate("23505", lambda: cur.execute(INSERT, params(b, 1)), "duplicate key")
expect_sqlstate(
    "0A000", lambda: cur.execute("UPDATE items SET tenant_id = %s WHERE tenant_id = %s", (b, a)), "moving a row"
)
e = expect_sqlstate("22P02", lambda: cur.execute("SELECT * FROM items WHERE tenant_id = 'x'"), "bad key")
check(psycopg2.errorcodes.lookup(e.pgcode) == "INVALID_TEXT_REPRESENTATION", "errorcodes lookup")

cur.execute("SELECT tenant_id, id FROM items ORDER BY tenant_id, id")
got = [tuple(r) for r in cur.fetchall()]
want = common.expected_ids(a, b, [1, 3, 10, 11, 30, 31])
check(got == want, f"rows through the router: {got}, expected {want}")
for t in (a, b):
    for i in (3, 10, 11, 30):
        check_row(fetch(cur, t, i), t, i, f"row {i}")
conn.close()
print("ok")
