// What the JavaScript driver checks share: arguments, the drivers' location
// (scripts/install-deps.sh installs them outside the clone and the test passes
// SHARDGATE_DRIVERS_NODE), and the canonical rows of tests/drivers/python/common.py.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import util from 'node:util';

export function args() {
  if (process.argv.length !== 5) fail(`usage: ${process.argv[1]} ROUTER_URL TENANT_A TENANT_B`);
  return [process.argv[2], Number(process.argv[3]), Number(process.argv[4])];
}

export function fail(msg) {
  console.error(`FAILED: ${msg}`);
  process.exit(1);
}

export function check(cond, msg) {
  if (!cond) fail(msg);
}

/** `require` for the drivers installed in $SHARDGATE_DRIVERS_NODE. */
export function driver(name) {
  const dir = process.env.SHARDGATE_DRIVERS_NODE;
  if (!dir) fail('SHARDGATE_DRIVERS_NODE is not set: run scripts/install-deps.sh and the test through cargo');
  const require = createRequire(path.join(dir, 'package.json'));
  try {
    return require(name);
  } catch (e) {
    fail(`the JavaScript driver ${name} is not installed in ${dir} (${e.message}): run scripts/install-deps.sh`);
  }
}

/** The installed version of a driver. */
export function version(name) {
  const file = path.join(process.env.SHARDGATE_DRIVERS_NODE, 'node_modules', name, 'package.json');
  return JSON.parse(readFileSync(file, 'utf8')).version;
}

export const COLUMNS = 'tenant_id, id, note, amount, flag, data, ts, uid, score, doc';
export const TS_TEXT = '2024-01-02 03:04:05.123456+00';

export function note(t, i) {
  return `t${t} row ${i}: é ' " \\ ✓`;
}

/** The row (t, i) as the values a query binds, in COLUMNS order. */
export function row(t, i) {
  return [
    t, i, note(t, i), `${i}.25`, i % 2 === 0, Buffer.from([0, 1, 255, i % 256]), TS_TEXT,
    `00000000-0000-4000-8000-${String(t).padStart(6, '0')}${String(i).padStart(6, '0')}`, i + 0.5,
    JSON.stringify({ t, i }),
  ];
}

/** The row as a line of COPY's text format. */
export function copyLine(t, i) {
  const r = row(t, i);
  return [t, i, r[2].replaceAll('\\', '\\\\'), r[3], r[4] ? 't' : 'f', '\\\\x' + r[5].toString('hex'), r[6], r[7],
    String(r[8]), r[9]].join('\t') + '\n';
}

/** Checks a row read back (with `ts` selected as text in UTC, see SELECT_ONE). */
export function checkRow(got, t, i, what) {
  const want = row(t, i);
  const norm = [
    Number(got.tenant_id), Number(got.id), got.note, String(got.amount), got.flag, Buffer.from(got.data),
    got.ts, got.uid, Number(got.score), got.doc,
  ];
  const expect = [...want.slice(0, 9), JSON.parse(want[9])];
  check(util.isDeepStrictEqual(norm, expect), `${what}: row (${t}, ${i}) came back as ${util.inspect(norm)}, expected ${util.inspect(expect)}`);
}

export const SELECT_ONE = `SELECT tenant_id, id, note, amount, flag, data,
  to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00' AS ts, uid, score, doc
  FROM items WHERE tenant_id = $1 AND id = $2`;

export function expectedIds(a, b, ids) {
  return [a, b].flatMap((t) => ids.map((i) => [t, i])).sort((x, y) => x[0] - y[0] || x[1] - y[1]);
}

export async function expectSqlstate(code, promise, what) {
  try {
    await promise;
  } catch (e) {
    check(e.code === code, `${what}: SQLSTATE ${e.code} (${e.message}), expected ${code}`);
    return e;
  }
  fail(`${what}: no error, expected SQLSTATE ${code}`);
}
