#!/usr/bin/env node
// Drives the real ComfyUI frontend in headless Chromium (playwright-core, no bundled browser).
//
// Usage:
//   node ui_driver.mjs URL WORKFLOW.json SCREENSHOT.png [--wait SECONDS] [--no-queue]
//   node ui_driver.mjs --check      (prints {ok, playwright_core, chromium, chromium_version})
//   node ui_driver.mjs URL --templates MODULE [SCREENSHOT.png]
//   node ui_driver.mjs URL --new-nodes TYPE[,TYPE...]
//   node ui_driver.mjs URL --cancel WORKFLOW.json NODE_ID TRAIN_STEPS
//
// --templates opens the template browser (command Comfy.BrowseTemplates), picks the category of the
// custom-node pack MODULE and waits for its cards' thumbnails; it prints {ok, cards: [{name, title,
// loaded, width, height, error_icon}], thumbnail_responses: [{url, status, type}], page_errors,
// blocked, error} and screenshots the dialog.
//
// Loads the UI-format workflow with app.loadGraphData(), converts it with app.graphToPrompt(),
// and (unless --no-queue) POSTs it to /prompt from inside the page, like the Queue button does.
// With --wait it polls /history/<id> until the prompt finishes (or SECONDS pass) and takes a
// second screenshot (SCREENSHOT with ".done" before the extension).
// Prints one JSON object on stdout: {ok, prompt_id, status, response, missing_node_types,
// api_prompt, controls, widgets_values, history_status, page_errors, console_errors, blocked,
// screenshots, error}. "widgets_values" is what the UI re-serializes after loading (node id ->
// list), to compare with the file; "controls" lists every control_after_generate widget.
//
// playwright-core is found via $SVARE_PLAYWRIGHT (path to the playwright-core package folder),
// else via the folders in $NODE_PATH, else next to this file. The browser is $SVARE_CHROMIUM
// (default /usr/bin/chromium): a system Chromium, nothing is downloaded. Every request the page
// makes to a host other than the server's loopback origin is aborted (listed in "blocked").
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--disable-dev-shm-usage',
];

async function loadPlaywright() {
  const require = createRequire(import.meta.url);
  let resolved;
  if (process.env.SVARE_PLAYWRIGHT) {
    resolved = require.resolve(process.env.SVARE_PLAYWRIGHT);
  } else {
    const paths = (process.env.NODE_PATH || '').split(path.delimiter).filter(Boolean);
    resolved = require.resolve('playwright-core', paths.length ? { paths } : undefined);
  }
  const mod = await import(pathToFileURL(resolved).href);
  return { pw: mod.default ?? mod, resolved };
}

const chromiumPath = () => process.env.SVARE_CHROMIUM || '/usr/bin/chromium';

function isLocal(urlStr) {
  try {
    const u = new URL(urlStr);
    if (u.protocol === 'data:' || u.protocol === 'blob:' || u.protocol === 'about:') return true;
    return ['127.0.0.1', 'localhost', '[::1]', '::1'].includes(u.hostname) || u.hostname.startsWith('127.');
  } catch { return false; }
}

async function check() {
  const out = { ok: false, playwright_core: null, chromium: chromiumPath(), chromium_version: null, error: null };
  try {
    const { pw, resolved } = await loadPlaywright();
    out.playwright_core = resolved;
    try {
      const req = createRequire(resolved);
      out.playwright_core_version = req(path.join(path.dirname(resolved), 'package.json')).version;
    } catch { /* version is informational */ }
    if (!fs.existsSync(out.chromium)) throw new Error(`no Chromium at ${out.chromium} (set SVARE_CHROMIUM)`);
    const browser = await pw.chromium.launch({ executablePath: out.chromium, headless: true, args: CHROMIUM_ARGS });
    out.chromium_version = browser.version();
    await browser.close();
    out.ok = true;
  } catch (e) {
    out.error = String(e && e.message || e);
  }
  process.stdout.write(JSON.stringify(out) + '\n');
  process.exit(out.ok ? 0 : 1);
}

function parseArgs(argv) {
  const pos = [];
  const opts = { wait: 0, queue: true };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--wait') opts.wait = Number(argv[++i]);
    else if (a === '--no-queue') opts.queue = false;
    else pos.push(a);
  }
  if (pos.length < 2) {
    console.error('usage: node ui_driver.mjs URL WORKFLOW.json [SCREENSHOT.png] [--wait S] [--no-queue]');
    process.exit(2);
  }
  return { url: pos[0], workflowPath: pos[1], screenshot: pos[2] || '', ...opts };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Opens the frontend in a fresh headless Chromium profile (only loopback requests allowed; page
// errors, console errors and blocked URLs recorded in `out`), waits until `ready` holds in the page,
// (after before(page), if given, has attached its listeners) runs fn(page), then closes the browser and removes the profile.
const graphReady = () => window.app && window.app.graph && window.app.canvas &&
  window.LiteGraph && Object.keys(window.LiteGraph.registered_node_types || {}).length > 0;

async function withApp(url, out, fn, { ready = graphReady, before = null } = {}) {
  const { chromium } = (await loadPlaywright()).pw;
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'svare-chromium-'));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: chromiumPath(), headless: true, args: CHROMIUM_ARGS, viewport: { width: 1600, height: 1000 },
  });
  try {
    await context.route('**/*', (route) => {
      const u = route.request().url();
      if (isLocal(u)) return route.continue();
      out.blocked.push(u);
      return route.abort();
    });
    const page = context.pages()[0] ?? await context.newPage();
    page.on('pageerror', (e) => out.page_errors.push(String(e && e.stack || e).slice(0, 1500)));
    page.on('console', (m) => { if (m.type() === 'error') out.console_errors.push(m.text()); });
    if (before) before(page);
    await page.goto(url, { waitUntil: 'domcontentloaded', timeout: 120000 });
    await page.waitForFunction(ready, null, { timeout: 120000, polling: 250 });
    await sleep(1000);
    // Close any first-run dialog (templates browser etc.) so screenshots show the graph.
    await page.keyboard.press('Escape').catch(() => {});
    await fn(page);
  } catch (e) {
    out.error = String(e && e.stack || e);
  } finally {
    await context.close().catch(() => {});
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
}

// --new-nodes: adds one node of each type to an empty graph, as a user dragging it from the node
// library does, and reports each node's control_after_generate widgets.
async function newNodes(url, types) {
  const out = { ok: false, nodes: [], page_errors: [], console_errors: [], blocked: [], error: null };
  await withApp(url, out, async (page) => {
    out.nodes = await page.evaluate((types) => {
    const app = window.app;
    app.graph.clear();
    return types.map((type) => {
      const node = window.LiteGraph.createNode(type);
      if (!node) return { type, created: false, controls: [] };
      app.graph.add(node);
      return { type, created: true, controls: (node.widgets || [])
        .filter((w) => w.name === 'control_after_generate').map((w) => w.value) };
    });
    }, types);
    out.ok = out.nodes.length > 0 && out.nodes.every((n) => n.created);
  });
  process.stdout.write(JSON.stringify(out) + '\n');
  process.exit(out.ok ? 0 : 1);
}

// --cancel: loads and queues WORKFLOW, and as soon as node NODE_ID reports a progress whose total is
// not TRAIN_STEPS (its first phase, drawing the training targets) sends what the Cancel button
// sends (POST /interrupt); reports the progress seen and the milliseconds until the frontend is told
// the run was interrupted (or that it ended otherwise).
async function cancelDuringFirstPhase(url, workflowPath, nodeId, trainSteps) {
  const out = { ok: false, progress_before: [], interrupted_after_ms: null, ended_by: null, prompt_id: null,
    page_errors: [], console_errors: [], blocked: [], error: null };
  const workflow = JSON.parse(fs.readFileSync(workflowPath, 'utf8'));
  await withApp(url, out, async (page) => {
    const res = await page.evaluate(async ({ wf, nodeId, trainSteps }) => {
    const app = window.app;
    await app.loadGraphData(wf, true, true, 'svare-cancel-test');
    const p = await app.graphToPrompt();
    const seen = [];
    let sentAt = null;
    const ended = new Promise((resolve) => {
      app.api.addEventListener('progress', async (e) => {
        const d = e.detail;
        if (String(d.node) !== String(nodeId) || sentAt !== null) return;
        seen.push({ value: d.value, max: d.max });
        if (d.max !== trainSteps) {
          sentAt = performance.now();
          await fetch('/interrupt', { method: 'POST' });
        }
      });
      for (const kind of ['execution_interrupted', 'execution_error', 'execution_success']) {
        app.api.addEventListener(kind, () => resolve({ kind, at: performance.now() }));
      }
    });
    const resp = await fetch('/prompt', {
      method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ prompt: p.output, client_id: app.api.clientId ?? app.api.initialClientId }),
    });
    const body = await resp.json();
    const timeout = new Promise((resolve) => setTimeout(() => resolve({ kind: 'timeout', at: null }), 600000));
    const end = await Promise.race([ended, timeout]);
    return { prompt_id: body.prompt_id ?? null, seen, ended_by: end.kind,
      interrupted_after_ms: sentAt !== null && end.at !== null ? end.at - sentAt : null };
    }, { wf: workflow, nodeId, trainSteps });
    Object.assign(out, { prompt_id: res.prompt_id, progress_before: res.seen, ended_by: res.ended_by,
    interrupted_after_ms: res.interrupted_after_ms });
    out.ok = res.ended_by === 'execution_interrupted' && res.interrupted_after_ms !== null;
  });
  process.stdout.write(JSON.stringify(out) + '\n');
  process.exit(out.ok ? 0 : 1);
}

async function templates(url, module, screenshot) {
  const out = { ok: false, cards: [], thumbnail_responses: [], page_errors: [], console_errors: [], blocked: [],
    screenshots: [], error: null };
  const before = (page) => page.on('response', (r) => {
    if (r.url().includes(`/workflow_templates/${encodeURIComponent(module)}/`)) {
      out.thumbnail_responses.push({ url: r.url(), status: r.status(), type: r.headers()['content-type'] || '' });
    }
  });
  await withApp(url, out, async (page) => {
    await sleep(500);
    await page.evaluate(() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates'));
    await page.waitForSelector('[data-testid="template-workflows-content"]', { timeout: 60000 });
    await page.getByRole('option', { name: module, exact: true }).click({ timeout: 60000 });
    await page.waitForSelector('[data-testid^="template-workflow-"]', { timeout: 60000 });
    const cards = async () => page.evaluate(() => [...document.querySelectorAll('[data-testid^="template-workflow-"]')]
      .map((c) => {
        const img = c.querySelector('img');
        return { name: c.dataset.testid.replace(/^template-workflow-/, ''),
          title: (c.querySelector('h3')?.textContent || '').trim(),
          loaded: !!(img && img.complete && img.naturalWidth > 0 && getComputedStyle(img).display !== 'none'),
          width: img ? img.naturalWidth : 0, height: img ? img.naturalHeight : 0,
          error_icon: !!c.querySelector('.pi-image') };
      }));
    const deadline = Date.now() + 30000;
    while (Date.now() < deadline) {
      out.cards = await cards();
      if (out.cards.length && out.cards.every((c) => c.loaded || c.error_icon)) break;
      await sleep(500);
    }
    await sleep(1500); // let the cards finish their transitions before the picture
    out.cards = await cards();
    if (screenshot) {
      await page.screenshot({ path: screenshot });
      out.screenshots.push(screenshot);
    }
    out.ok = out.cards.length > 0 && out.cards.every((c) => c.loaded);
  }, { ready: () => window.app && window.app.graph && window.app.extensionManager, before });
  process.stdout.write(JSON.stringify(out) + '\n');
  process.exit(out.ok ? 0 : 1);
}

async function main() {
  if (process.argv[2] === '--check') return check();
  if (process.argv[3] === '--templates') return templates(process.argv[2], process.argv[4], process.argv[5] || '');
  if (process.argv[3] === '--new-nodes') return newNodes(process.argv[2], process.argv[4].split(','));
  if (process.argv[3] === '--cancel') {
    return cancelDuringFirstPhase(process.argv[2], process.argv[4], process.argv[5], Number(process.argv[6]));
  }
  const args = parseArgs(process.argv.slice(2));
  const out = { ok: false, prompt_id: null, status: null, response: null, missing_node_types: [],
    api_prompt: null, history_status: null, page_errors: [], console_errors: [], screenshots: [],
    blocked: [], error: null };
  const workflow = JSON.parse(fs.readFileSync(args.workflowPath, 'utf8'));
  await withApp(args.url, out, async (page) => {
    const res = await page.evaluate(async ({ wf, queue }) => {
      const app = window.app;
      const known = window.LiteGraph.registered_node_types;
      const missing = [...new Set((wf.nodes || []).map((n) => n.type).filter((t) => !(t in known)))];
      await app.loadGraphData(wf, true, true, 'svare-test');
      const nodes = app.graph.nodes ?? app.graph._nodes;
      const controls = nodes.flatMap((n) => (n.widgets || [])
        .filter((w) => w.name === 'control_after_generate')
        .map((w) => ({ node: n.id, type: n.type, value: w.value })));
      const widgets_values = Object.fromEntries(
        app.graph.serialize().nodes.map((n) => [String(n.id), n.widgets_values ?? null]));
      const p = await app.graphToPrompt();
      const r = { missing, api_prompt: p.output, status: null, response: null, controls, widgets_values };
      if (queue && missing.length === 0) {
        const resp = await fetch('/prompt', {
          method: 'POST', headers: { 'Content-Type': 'application/json' },
          body: JSON.stringify({ prompt: p.output, client_id: app.api.clientId ?? app.api.initialClientId,
            extra_data: { extra_pnginfo: { workflow: p.workflow } } }),
        });
        r.status = resp.status;
        const text = await resp.text();
        try { r.response = JSON.parse(text); } catch { r.response = text; }
      }
      return r;
    }, { wf: workflow, queue: args.queue });
    out.missing_node_types = res.missing;
    out.controls = res.controls;            // control_after_generate widgets after loading
    out.widgets_values = res.widgets_values; // node id -> widgets_values re-serialized by the UI
    out.api_prompt = res.api_prompt;
    out.status = res.status;
    out.response = res.response;
    out.prompt_id = (res.response && res.response.prompt_id) || null;
    await page.keyboard.press('Escape').catch(() => {});
    await sleep(500);
    if (args.screenshot) {
      await page.screenshot({ path: args.screenshot });
      out.screenshots.push(args.screenshot);
    }
    if (out.prompt_id && args.wait > 0) {
      const deadline = Date.now() + args.wait * 1000;
      while (Date.now() < deadline) {
        const h = await page.evaluate(async (id) => (await fetch(`/history/${id}`)).json(), out.prompt_id);
        if (h[out.prompt_id] && h[out.prompt_id].status && h[out.prompt_id].status.completed !== undefined
            && (h[out.prompt_id].status.status_str === 'success' || h[out.prompt_id].status.status_str === 'error')) {
          out.history_status = h[out.prompt_id].status;
          break;
        }
        await sleep(1000);
      }
      await sleep(1000); // let the UI draw the preview images
      if (args.screenshot) {
        const done = args.screenshot.replace(/(\.png)?$/, '.done.png');
        await page.screenshot({ path: done });
        out.screenshots.push(done);
      }
    }
    out.ok = out.missing_node_types.length === 0 &&
      (!args.queue || (out.status === 200 && !!out.prompt_id)) &&
      (!(args.wait > 0 && out.prompt_id) || (out.history_status && out.history_status.status_str === 'success'));
  });
  process.stdout.write(JSON.stringify(out) + '\n');
  process.exit(out.ok ? 0 : 1);
}

main().catch((e) => {
  process.stdout.write(JSON.stringify({ ok: false, error: String(e && e.stack || e) }) + '\n');
  process.exit(1);
});
