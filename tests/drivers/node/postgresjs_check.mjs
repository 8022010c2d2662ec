// postgres.js through the router: its prepared statements (on by default),
// tagged-template parameters, sql.begin transactions, a pipelined batch in a
// transaction, the multi-row insert helper, COPY streams and SQLSTATEs.
// Usage: node postgresjs_check.mjs ROUTER_URL TENANT_A TENANT_B
import { readFileSync } from 'node:fs';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import * as c from './common.mjs';

const postgres = c.driver('postgres');
const [url, a, b] = c.args();
console.log(`driver: postgres.js ${c.version('postgres')}`);

// postgres.js reads no sslrootcert (it would send it to the server as a
// setting): its users give the CA as a TLS option, as here. Node checks the
// chain and the host name (verify-full).
const u = new URL(url);
const root = u.searchParams.get('sslrootcert');
u.searchParams.delete('sslrootcert');
u.searchParams.delete('sslmode');
const ssl = root ? { ca: readFileSync(root), rejectUnauthorized: true } : false;
// One connection, so a prepared statement is reused and the order is the script's.
const sql = postgres(u.toString(), { max: 1, onnotice: () => {}, ssl });
// postgres.js sends a timestamptz parameter through a JavaScript Date (milliseconds):
// the microseconds of the canonical row go as text.
const insert = (s, t, i) => {
  const r = c.row(t, i);
  return s`INSERT INTO items (tenant_id, id, note, amount, flag, data, ts, uid, score, doc)
    VALUES (${r[0]}, ${r[1]}, ${r[2]}, ${r[3]}, ${r[4]}, ${r[5]}, ${r[6]}::text::timestamptz, ${r[7]}, ${r[8]}, ${s.json({ t, i })})`;
};
const select = async (t, i) => (await sql.unsafe(c.SELECT_ONE, [t, i], { prepare: true }))[0];

c.check((await sql`SELECT 1 AS x`)[0].x === 1, 'SELECT 1');
await insert(sql, a, 1);
await insert(sql, b, 1);
for (const t of [a, b]) {
  for (let k = 0; k < 3; k++) c.checkRow(await select(t, 1), t, 1, 'prepared select');
  const [r] = await sql`SELECT id FROM items WHERE tenant_id = ${t} AND id = ${1}`;
  c.check(r.id === 1, 'template select');
}

// sql.begin: a thrown error rolls back; a returned promise commits on both shards.
await c.check(
  await sql.begin(async (s) => {
    await insert(s, a, 2);
    await insert(s, b, 2);
    throw new Error('roll back');
  }).then(() => false, (e) => e.message === 'roll back'),
  'sql.begin rolls back on a throw',
);
await sql.begin(async (s) => {
  await insert(s, a, 3);
  await insert(s, b, 3);
});
c.check(Number((await sql`SELECT count(*) AS n FROM items WHERE id = 2`)[0].n) === 0, 'rolled-back rows are visible');

// A batch: queries returned as an array from sql.begin are pipelined in one transaction.
await sql.begin((s) => [insert(s, a, 10), insert(s, b, 10), insert(s, a, 11), insert(s, b, 11)]);
await c.expectSqlstate('23505', sql.begin((s) => [insert(s, a, 20), insert(s, b, 20), insert(s, b, 21), insert(s, a, 1)]),
  'a pipelined batch with a duplicate row');
// The multi-row insert helper with rows of both shards is one statement through the
// extended protocol: each shard gets its rows, all committed or none.
await sql`INSERT INTO items ${sql([{ tenant_id: a, id: 22 }, { tenant_id: b, id: 22 }])}`;
c.check(Number((await sql`SELECT count(*) AS n FROM items WHERE id = 22`)[0].n) === 2,
  'a multi-row insert across shards wrote both rows');
await c.expectSqlstate('23505', sql`INSERT INTO items ${sql([{ tenant_id: a, id: 24 }, { tenant_id: b, id: 1 }])}`,
  'a multi-row insert across shards with a duplicate row');
c.check(Number((await sql`SELECT count(*) AS n FROM items WHERE id = 24`)[0].n) === 0,
  'a failed multi-row insert across shards left a row');
await sql`DELETE FROM items WHERE tenant_id = ${a} AND id = 22`;
await sql`DELETE FROM items WHERE tenant_id = ${b} AND id = 22`;

// COPY FROM STDIN (split by tenant) and COPY TO STDOUT as streams.
const lines = [30, 31].flatMap((i) => [a, b].map((t) => c.copyLine(t, i)));
await pipeline(Readable.from(lines), await sql`COPY items (tenant_id, id, note, amount, flag, data, ts, uid, score, doc) FROM STDIN`.writable());
const chunks = [];
await pipeline(await sql`COPY (SELECT id FROM items WHERE tenant_id = ${sql.unsafe(String(b))} ORDER BY id) TO STDOUT`.readable(),
  new Writable({ write(chunk, _, done) { chunks.push(chunk); done(); } }));
const copied = Buffer.concat(chunks).toString().split('\n').filter(Boolean);
c.check(copied.join(',') === '1,3,10,11,30,31', `COPY TO STDOUT gave ${copied}`);

// Errors with their SQLSTATE; the connection goes on.
await c.expectSqlstate('23505', insert(sql, a, 1), 'duplicate key');
await c.expectSqlstate('0A000', sql`UPDATE items SET tenant_id = ${b} WHERE tenant_id = ${a}`, 'moving a row');
await c.expectSqlstate('22P02', sql`SELECT * FROM items WHERE tenant_id = ${'x'}`, 'bad key');

const got = (await sql`SELECT tenant_id, id FROM items ORDER BY tenant_id, id`).map((r) => [Number(r.tenant_id), r.id]);
const want = c.expectedIds(a, b, [1, 3, 10, 11, 30, 31]);
c.check(JSON.stringify(got) === JSON.stringify(want), `rows through the router: ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`);
for (const t of [a, b]) {
  for (const i of [3, 10, 11, 30]) c.checkRow(await select(t, i), t, i, `row ${i}`);
}
await sql.end();
console.log('ok');
