"""What every Python driver check shares: its arguments, the canonical row of a
(tenant, id) and the checks of what comes back. The Rust side
(tests/tests/driver_matrix.rs) defines the same rows and checks them on the
shards directly.

Ids, for each of the two tenants (one on each shard):
  1      inserted with a prepared / parameterized statement
  2      inserted in a transaction that rolls back (must be absent)
  3      inserted in a transaction that commits on both shards
  10, 11 a batch (executemany) in one transaction, committed
  12     asyncpg, pgjdbc: a batch without BEGIN (one implicit transaction), committed
  20-23  batches whose last row fails, or that are refused: none of it stays
  30, 31 COPY FROM STDIN (drivers that have COPY)
  32, 33 binary COPY FROM STDIN (asyncpg's copy_records_to_table)
  40, 41 psycopg 3 pipeline mode, committed
"""

import datetime
import decimal
import json
import sys
import uuid

COLUMNS = "tenant_id, id, note, amount, flag, data, ts, uid, score, doc"
SELECT_ONE = f"SELECT {COLUMNS} FROM items WHERE tenant_id = %s AND id = %s"
TS = datetime.datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=datetime.timezone.utc)


def args():
    if len(sys.argv) != 4:
        fail(f"usage: {sys.argv[0]} ROUTER_URL TENANT_A TENANT_B")
    return sys.argv[1], int(sys.argv[2]), int(sys.argv[3])


def fail(msg):
    print(f"FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def missing(driver, err):
    fail(f"the Python driver {driver} is not installed ({err}): run scripts/install-deps.sh")


def check(cond, msg):
    if not cond:
        fail(msg)


def note(t, i):
    return f"t{t} row {i}: é ' \" \\ ✓"


def row(t, i):
    """The row (tenant t, id i) as Python values, in COLUMNS order."""
    return (
        t,
        i,
        note(t, i),
        decimal.Decimal(f"{i}.25"),
        i % 2 == 0,
        bytes([0, 1, 255, i % 256]),
        TS,
        uuid.UUID(f"00000000-0000-4000-8000-{t:06d}{i:06d}"),
        i + 0.5,
        {"t": t, "i": i},
    )


def copy_line(t, i):
    """The row as a line of COPY's text format."""
    r = row(t, i)
    esc = r[2].replace("\\", "\\\\")
    return "\t".join(
        [str(t), str(i), esc, str(r[3]), "t" if r[4] else "f", "\\\\x" + r[5].hex(),
         r[6].isoformat(), str(r[7]), repr(r[8]), json.dumps(r[9])]
    ) + "\n"


def check_row(got, t, i, what):
    want = row(t, i)
    got = tuple(got)
    if isinstance(got[9], str):
        got = got[:9] + (json.loads(got[9]),)
    if isinstance(got[5], memoryview):
        got = got[:5] + (bytes(got[5]),) + got[6:]
    check(got == want, f"{what}: row ({t}, {i}) came back as {got!r}, expected {want!r}")


def expected_ids(a, b, ids):
    return sorted((t, i) for t in (a, b) for i in ids)
