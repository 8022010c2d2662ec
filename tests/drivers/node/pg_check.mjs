// node-postgres (pg) through the router: named prepared statements,
// parameterized queries, transactions, a batch across shards in one
// transaction, COPY (pg-copy-streams) and SQLSTATEs.
// Usage: node pg_check.mjs ROUTER_URL TENANT_A TENANT_B
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import * as c from './common.mjs';

const pg = c.driver('pg');
const { from: copyFrom, to: copyTo } = c.driver('pg-copy-streams');
const [url, a, b] = c.args();
console.log(`driver: pg ${c.version('pg')}, pg-copy-streams ${c.version('pg-copy-streams')}`);

const INSERT = `INSERT INTO items (${c.COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)`;
const client = new pg.Client({ connectionString: url });
await client.connect();
const one = async (sql, values) => (await client.query(sql, values)).rows[0];
c.check((await one('SELECT 1 AS x')).x === 1, 'SELECT 1');

// Named prepared statements (parsed once per connection, then bound), one row per shard.
for (const t of [a, b]) {
  await client.query({ name: 'insert_item', text: INSERT, values: c.row(t, 1) });
}
for (const t of [a, b]) {
  for (let k = 0; k < 3; k++) {
    c.checkRow(await one({ name: 'select_item', text: c.SELECT_ONE, values: [t, 1] }), t, 1, 'prepared select');
  }
  c.checkRow(await one(c.SELECT_ONE, [t, 1]), t, 1, 'unnamed select');
}

// Rolled back: nothing stays. Committed: both shards.
await client.query('BEGIN');
await client.query(INSERT, c.row(a, 2));
await client.query(INSERT, c.row(b, 2));
await client.query('ROLLBACK');
await client.query('BEGIN');
await client.query({ name: 'insert_item', text: INSERT, values: c.row(a, 3) });
await client.query({ name: 'insert_item', text: INSERT, values: c.row(b, 3) });
await client.query('COMMIT');
c.check(Number((await one('SELECT count(*) AS n FROM items WHERE id = 2')).n) === 0, 'rolled-back rows are visible');

// A batch: one statement per row, for both shards, in one transaction.
async function batch(rows) {
  await client.query('BEGIN');
  try {
    for (const [t, i] of rows) await client.query({ name: 'insert_item', text: INSERT, values: c.row(t, i) });
    await client.query('COMMIT');
  } catch (e) {
    await client.query('ROLLBACK');
    throw e;
  }
}
await batch([[a, 10], [b, 10], [a, 11], [b, 11]]);
await c.expectSqlstate('23505', batch([[a, 20], [b, 20], [b, 21], [a, 1]]), 'a batch with a duplicate row');

// COPY FROM STDIN (split by tenant) and COPY TO STDOUT.
const lines = [30, 31].flatMap((i) => [a, b].map((t) => c.copyLine(t, i)));
const copy = client.query(copyFrom(`COPY items (${c.COLUMNS}) FROM STDIN`));
await pipeline(Readable.from(lines), copy);
c.check(copy.rowCount === 4, `COPY rowCount ${copy.rowCount}`);
const chunks = [];
await pipeline(client.query(copyTo(`COPY (SELECT id FROM items WHERE tenant_id = ${a} ORDER BY id) TO STDOUT`)),
  async function* (source) { for await (const chunk of source) chunks.push(chunk); });
const copied = Buffer.concat(chunks).toString().split('\n').filter(Boolean);
c.check(copied.join(',') === '1,3,10,11,30,31', `COPY TO STDOUT gave ${copied}`);

// Errors with their SQLSTATE; the connection goes on.
await c.expectSqlstate('23505', client.query({ name: 'insert_item', text: INSERT, values: c.row(b, 1) }), 'duplicate key');
await c.expectSqlstate('0A000', client.query('UPDATE items SET tenant_id = $1 WHERE tenant_id = $2', [b, a]), 'moving a row');
await c.expectSqlstate('22P02', client.query('SELECT * FROM items WHERE tenant_id = $1', ['x']), 'bad key');

const got = (await client.query('SELECT tenant_id, id FROM items ORDER BY tenant_id, id')).rows.map((r) => [Number(r.tenant_id), r.id]);
const want = c.expectedIds(a, b, [1, 3, 10, 11, 30, 31]);
c.check(JSON.stringify(got) === JSON.stringify(want), `rows through the router: ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`);
for (const t of [a, b]) {
  for (const i of [3, 10, 11, 30]) c.checkRow(await one({ name: 'select_item', text: c.SELECT_ONE, values: [t, i] }), t, i, `row ${i}`);
}
await client.end();
console.log('ok');
