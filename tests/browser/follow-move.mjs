// Opens the admin web page of a running shardgate in headless Chromium (Debian's
// /usr/bin/chromium) and follows the move that cli/tests/web.rs drives, without
// ever reloading the page:
//
//   node follow-move.mjs URL OUT_DIR
//
// It prints `page: ready` once the page shows the shards, `page: shadow` once
// move 1 shows the shadow phase, and `page: reverse` once it shows
// the cutover's result; the test runs the next step of the move after each line.
// Screenshots go to OUT_DIR (shadow.png, move.png; failure.png on a failure).
// Exits 0 when every check held, 1 with the reason on stderr otherwise.

import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { chromium } from 'playwright-core';

const [url, outDir] = process.argv.slice(2);
if (!url || !outDir) {
  console.error('usage: node follow-move.mjs URL OUT_DIR');
  process.exit(2);
}
// How long one step may take: the move's copy and cutover run meanwhile.
const WAIT_MS = Number(process.env.SHARDGATE_PAGE_WAIT_MS || 45000);

const say = (step) => process.stdout.write(`page: ${step}\n`);
function check(ok, what, detail) {
  if (!ok) throw new Error(`${what}${detail === undefined ? '' : `\n--- seen:\n${detail}`}`);
}

/** Buckets per shard as the page's shard table shows them. */
const bucketsShown = (page) => page.evaluate(() => Object.fromEntries(
  [...document.querySelectorAll('#shards tbody tr')].map((tr) => [
    tr.dataset.shard, Number(tr.querySelector('.buckets').textContent.replace(/,/g, '')),
  ])));

const userDataDir = await mkdtemp(path.join(tmpdir(), 'shardgate-chromium-'));
await mkdir(outDir, { recursive: true });
const problems = [];
let context;
let page;
let failed = false;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    // Without the background-networking flags Chromium keeps calling out to a
    // network this machine does not have.
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: 1280, height: 1100 },
  });
  page = context.pages()[0] ?? (await context.newPage());
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error') problems.push(`console error: ${m.text()}`);
  });
  let loads = 0;
  page.on('load', () => { loads += 1; });

  await page.goto(url);
  await page.waitForFunction(
    () => document.querySelectorAll('#shards tbody tr').length >= 2
      && document.getElementById('connection').dataset.state === 'live',
    null, { timeout: WAIT_MS });
  check(!page.url().includes('token='), 'the token is removed from the address bar', page.url());
  // The open page has the node measure the shards' sizes; they follow in an event.
  await page.waitForFunction(
    () => [...document.querySelectorAll('#shards tbody tr .size')].every((td) => td.textContent !== '–')
      && document.getElementById('shard-chart-caption').textContent.startsWith('bytes per shard'),
    null, { timeout: WAIT_MS })
    .catch(() => { throw new Error('the shards\' sizes never showed on the page'); });
  // Survives only as long as the document does: a reload would lose it.
  await page.evaluate(() => { window.sameDocument = true; });
  const before = await bucketsShown(page);
  say('ready');

  // The move appears, copies and rests in shadow, all pushed to the page.
  // (These functions run in the page.)
  await page.waitForFunction(
    () => document.querySelector('#move-1')?.dataset.phase === 'shadow', null, { timeout: WAIT_MS })
    .catch(() => { throw new Error('move 1 did not reach shadow on the page'); });
  const shadow = await page.locator('#move-1').innerText();
  check(/rows \(100%\)/.test(shadow), 'the copy shows as complete', shadow);
  check(/change stream/.test(shadow) && /lag /.test(shadow), 'the change stream\'s lag is shown', shadow);
  check(/not verified yet/.test(shadow), 'the move is shown as not verified yet', shadow);
  check(/copy .* → shadow .*\(now\)/.test(shadow), 'the timeline shows copy, then the current phase', shadow);
  await page.screenshot({ path: path.join(outDir, 'shadow.png'), fullPage: true });
  say('shadow');

  // The test verifies and cuts over; the page follows.
  await page.waitForFunction(
    () => document.querySelector('#move-1')?.dataset.phase === 'reverse', null, { timeout: WAIT_MS })
    .catch(() => { throw new Error('move 1 did not reach reverse on the page'); });
  const done = await page.locator('#move-1').innerText();
  check((await page.locator('#move-1 .phase').innerText()) === 'reverse', 'the phase reads reverse', done);
  check(/verified clean/.test(done), 'the verify result is shown', done);
  check(/pause \d+(\.\d+)? (µs|ms)/.test(done), 'the cutover\'s pause is shown', done);
  check(/1 cutover\(s\)/.test(done), 'the cutover is counted', done);
  check(/reverse stream/.test(done), 'the reverse stream is shown', done);
  const holds = await page.locator('#move-1 table.pauses').innerText().catch(() => '');
  check(/cutover/.test(holds) && /verify/.test(holds), 'the verify\'s and the cutover\'s holds are listed', holds);
  const steps = await page.locator('#move-1 .timeline-steps').innerText();
  for (const p of ['copy', 'verify', 'cutover', 'reverse']) {
    check(steps.includes(p), `the timeline has the ${p} phase`, steps);
  }
  check(await page.locator('#move-1 .timeline .step').count() >= 5, 'the timeline draws each phase', steps);
  const after = await bucketsShown(page);
  check(after.shard_0 === before.shard_0 - 1 && after.shard_1 === before.shard_1 + 1,
    'the bucket counts follow the cutover', JSON.stringify({ before, after }));
  check(await page.locator('#shard-chart .bar').count() === 2, 'the chart has a bar per shard');
  check(await page.locator('#placements rect.moving').count() === 1, 'the moving bucket is outlined');
  check(await page.evaluate(() => window.sameDocument === true) && loads === 1,
    'the page was never reloaded', `loads: ${loads}`);
  check(problems.length === 0, 'no script or console errors', problems.join('\n'));
  await page.screenshot({ path: path.join(outDir, 'move.png'), fullPage: true });
  say('reverse');
} catch (e) {
  failed = true;
  console.error(`browser check failed: ${e.message}`);
  if (problems.length) console.error(problems.join('\n'));
  if (page) {
    await page.screenshot({ path: path.join(outDir, 'failure.png'), fullPage: true }).catch(() => {});
    const text = await page.evaluate(() => document.body.innerText).catch(() => '(no page text)');
    console.error(`--- page text:\n${text}`);
  }
} finally {
  await context?.close().catch(() => {});
  await rm(userDataDir, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
