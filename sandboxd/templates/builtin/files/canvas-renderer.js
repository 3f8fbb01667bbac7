#!/usr/bin/env node
// The canvas template's renderer: renders HTML (through the sandbox's one Chromium, over CDP)
// or a JS canvas script (through @napi-rs/canvas) to PNG/JPEG, saves the image in the sandbox
// and answers it. The control plane calls it on port 49982 (sandboxd/controlplane/canvas.py
// validates the request first); nothing else needs it.
//
//   GET  /health         200 once the script runner is warm and Chromium's CDP is connected, else 503
//   POST /render         {kind: "html"|"script", source, width, height, scale, format, quality,
//                         timeout_ms, path} -> the image, with x-render-* headers
//   GET  /page/<id>      the HTML of a render in progress (what Chromium loads)
//   GET  /blank          an empty page, where the warm tab waits between renders
//
// Errors are {"error": {"code", "message", "field"?}}: 400 bad input, 422 script error,
// 504 render_timeout, 503 renderer_unavailable.
//
// Scripts run in a warm child process (`--script-runner`): an infinite loop is ended by
// SIGKILL at the timeout and a fresh runner takes its place, so the renderer stays usable.
'use strict';

const childProcess = require('child_process');
const crypto = require('crypto');
const fs = require('fs');
const http = require('http');
const path = require('path');

const PORT = Number(process.env.CANVAS_RENDERER_PORT || 49982);
const CDP_VERSION_URL = process.env.CANVAS_CDP_URL || 'http://127.0.0.1:9222/json/version';
const WORKDIR = '/workspace';  // relative output paths resolve here, as in the files API
const DEFAULT_DIR = '/tmp/renders';
const MAX_BODY_BYTES = 8 * 1024 * 1024;
const MIME = { png: 'image/png', jpeg: 'image/jpeg' };

class RenderError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field;
  }
}

// --- the script runner (child process) ---------------------------------------------------

function runScripts() {
  const lib = require('@napi-rs/canvas');
  const AsyncFunction = (async () => {}).constructor;
  const NAMES = ['canvas', 'ctx', 'width', 'height', 'deviceScaleFactor', 'createCanvas', 'loadImage', 'Image',
    'Path2D', 'ImageData', 'DOMMatrix', 'GlobalFonts'];
  const BODY_LINE_OFFSET = 2;  // the lines AsyncFunction puts before the body

  process.on('message', async (job) => {
    try {
      let draw;
      try {
        draw = new AsyncFunction(...NAMES, job.source);
      } catch (e) {
        throw Object.assign(e, { compile: true });
      }
      const canvas = lib.createCanvas(job.pixelWidth, job.pixelHeight);
      const ctx = canvas.getContext('2d');
      ctx.scale(job.scale, job.scale);  // the script draws in CSS pixels, like a page would
      await draw(canvas, ctx, job.width, job.height, job.scale, lib.createCanvas, lib.loadImage, lib.Image,
        lib.Path2D, lib.ImageData, lib.DOMMatrix, lib.GlobalFonts);
      const data = job.format === 'jpeg' ? await canvas.encode('jpeg', job.quality) : await canvas.encode('png');
      process.send({ ok: true, data });
    } catch (e) {
      process.send({ ok: false, message: describe(e, BODY_LINE_OFFSET) });
    }
  });
  process.send({ ready: true });
}

function describe(error, lineOffset) {
  if (!(error instanceof Error)) return `thrown: ${String(error)}`;
  let text = `${error.name}: ${error.message}`;
  const where = /<anonymous>:(\d+):(\d+)/.exec(error.stack || '');
  if (where && !error.compile) text += ` (line ${Number(where[1]) - lineOffset}, column ${where[2]})`;
  return text;
}

class ScriptRunner {
  constructor() {
    this.queue = Promise.resolve();
    this.spawn(0);
  }

  // `ready` resolves to the warm child; an unexpected exit spawns the next one after a pause
  // (a runner that cannot even start must not spin).
  spawn(delayMs) {
    this.isReady = false;
    this.ready = new Promise((resolve) => setTimeout(() => {
      const child = childProcess.fork(__filename, ['--script-runner'], { serialization: 'advanced', stdio: 'inherit' });
      this.child = child;
      child.once('message', (m) => {
        this.isReady = Boolean(m && m.ready);
        resolve(child);
      });
      child.once('exit', (code, signal) => {
        resolve(null);
        if (this.child === child) {
          console.error(`canvas-renderer: script runner ended (${signal || code}); starting another`);
          this.spawn(500);
        }
      });
    }, delayMs));
  }

  // One script at a time: the runner is one process; the deadline counts the wait too.
  run(job, deadline) {
    const result = this.queue.then(() => this.runNow(job, deadline));
    this.queue = result.catch(() => {});
    return result;
  }

  async runNow(job, deadline) {
    let child = await withDeadline(this.ready, deadline);
    while (!child || !child.connected) {
      await withDeadline(sleep(50), deadline);
      child = await withDeadline(this.ready, deadline);
    }
    return new Promise((resolve, reject) => {
      const finish = (fn, value) => {
        clearTimeout(timer);
        child.removeListener('message', onMessage);
        child.removeListener('exit', onExit);
        fn(value);
      };
      const onMessage = (m) => {
        if (m.ok) finish(resolve, Buffer.from(m.data.buffer, m.data.byteOffset, m.data.byteLength));
        else finish(reject, new RenderError(422, 'script_error', `script: ${m.message}`, 'script'));
      };
      const onExit = (code, signal) => finish(reject, new RenderError(422, 'script_error',
        `script: it ended its process (${signal || 'exit code ' + code})`, 'script'));
      const timer = setTimeout(() => {
        this.child = null;  // this exit is ours: replace the runner at once
        child.kill('SIGKILL');
        this.spawn(0);
        finish(reject, timeoutError());
      }, Math.max(0, deadline - Date.now()));
      child.on('message', onMessage);
      child.on('exit', onExit);
      child.send(job);
    });
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function timeoutError() {
  return new RenderError(504, 'render_timeout', 'the render did not finish within timeout_seconds', 'timeout_seconds');
}

function withDeadline(promise, deadline) {
  let timer;
  const expired = new Promise((_, reject) => {
    timer = setTimeout(() => reject(timeoutError()), Math.max(0, deadline - Date.now()));
  });
  return Promise.race([promise, expired]).finally(() => clearTimeout(timer));
}

// --- Chromium over CDP -------------------------------------------------------------------

class Cdp {
  constructor(socket) {
    this.socket = socket;
    this.nextId = 1;
    this.pending = new Map();
    this.waiters = new Set();
    this.closed = false;
    socket.on('message', (raw) => this.receive(JSON.parse(raw.toString())));
    socket.on('close', () => {
      this.closed = true;
      for (const { reject } of this.pending.values()) reject(new Error('Chromium closed the CDP connection'));
      this.pending.clear();
    });
    socket.on('error', () => {});  // 'close' follows
  }

  static async connect() {
    const WebSocket = require('ws');
    const version = await (await fetch(CDP_VERSION_URL)).json();
    const socket = new WebSocket(version.webSocketDebuggerUrl, { perMessageDeflate: false, maxPayload: 1 << 30 });
    await new Promise((resolve, reject) => {
      socket.once('open', resolve);
      socket.once('error', reject);
    });
    return new Cdp(socket);
  }

  receive(message) {
    if (message.id !== undefined) {
      const call = this.pending.get(message.id);
      if (!call) return;
      this.pending.delete(message.id);
      if (message.error) call.reject(new Error(`${call.method}: ${message.error.message}`));
      else call.resolve(message.result);
      return;
    }
    for (const waiter of this.waiters) waiter(message);
  }

  send(method, params = {}, sessionId = undefined) {
    if (this.closed) return Promise.reject(new Error('Chromium closed the CDP connection'));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, method });
      this.socket.send(JSON.stringify({ id, method, params, sessionId }));
    });
  }

  listen(callback) {
    this.waiters.add(callback);
    return () => this.waiters.delete(callback);
  }
}

let cdp = null;
let connecting = null;

async function browser() {
  if (cdp && !cdp.closed) return cdp;
  connecting = connecting || Cdp.connect().finally(() => { connecting = null; });
  cdp = await connecting;
  return cdp;
}

// Fonts loaded and two frames painted: what a person would see once the page settles.
const SETTLE = `new Promise((resolve) => {
  const painted = () => requestAnimationFrame(() => requestAnimationFrame(() => resolve(true)));
  (document.fonts ? document.fonts.ready : Promise.resolve()).then(painted, painted);
})`;
const pages = new Map();
// One warm tab (a promise of it) serves renders one after another: no renderer process to start per render. A
// render that finds it taken opens a tab of its own, closed afterwards.
let warmTab = null;

async function openTab(browserCdp) {
  // a window of its own: a background tab of a shared window would never paint a frame
  const { targetId } = await browserCdp.send('Target.createTarget', { url: 'about:blank', newWindow: true });
  const { sessionId } = await browserCdp.send('Target.attachToTarget', { targetId, flatten: true });
  await browserCdp.send('Page.enable', {}, sessionId);
  await browserCdp.send('Page.setLifecycleEventsEnabled', { enabled: true }, sessionId);
  return { cdp: browserCdp, targetId, sessionId };
}

function closeTab(tab) {
  // a page stuck in a loop must not keep its renderer process busy
  tab.cdp.send('Runtime.terminateExecution', {}, tab.sessionId).catch(() => {});
  tab.cdp.send('Target.closeTarget', { targetId: tab.targetId }).catch(() => {});
}

// Navigates and waits for the load of this very navigation (matched by its loaderId, so the
// load of an earlier one, such as the empty page a tab is parked on, never counts).
async function navigate(tab, url) {
  const loads = [];  // lifecycle events may come before Page.navigate's answer
  let wanted = null;
  let loaded;
  const done = new Promise((resolve) => { loaded = resolve; });
  const stop = tab.cdp.listen((m) => {
    if (m.method !== 'Page.lifecycleEvent' || m.sessionId !== tab.sessionId || m.params.name !== 'load') return;
    if (wanted === null) loads.push(m.params.loaderId);
    else if (m.params.loaderId === wanted) loaded();
  });
  try {
    const answer = await tab.cdp.send('Page.navigate', { url }, tab.sessionId);
    if (answer.errorText) throw new Error(`${url}: ${answer.errorText}`);
    wanted = answer.loaderId;
    if (loads.includes(wanted)) loaded();
    await done;
  } finally {
    stop();
  }
}

async function renderHtml(job, deadline) {
  let browserCdp;
  try {
    browserCdp = await withDeadline(browser(), deadline);
  } catch (e) {
    if (e instanceof RenderError) throw e;
    throw new RenderError(503, 'renderer_unavailable', `Chromium is not reachable: ${e.message}`);
  }
  const pageId = crypto.randomUUID();
  const reusable = warmTab;
  warmTab = null;
  let tab = null;
  const work = (async () => {
    const reused = reusable ? await reusable : null;
    if (reused && reused.cdp !== browserCdp) closeTab(reused);  // of a Chromium that has since restarted
    tab = reused && reused.cdp === browserCdp ? reused : await openTab(browserCdp);
    const page = (method, params) => browserCdp.send(method, params, tab.sessionId);
    await page('Emulation.setDeviceMetricsOverride', {
      width: job.width, height: job.height, deviceScaleFactor: job.scale, mobile: false,
    });
    pages.set(pageId, job.source);
    await navigate(tab, `http://127.0.0.1:${PORT}/page/${pageId}`);
    await page('Runtime.evaluate', { expression: SETTLE, awaitPromise: true });
    const shot = { format: job.format, captureBeyondViewport: false, fromSurface: true };
    if (job.format === 'jpeg') shot.quality = job.quality;
    const { data } = await page('Page.captureScreenshot', shot);
    return Buffer.from(data, 'base64');
  })();
  let finished = false;
  try {
    const image = await withDeadline(work, deadline);
    finished = true;
    return image;
  } catch (e) {
    if (e instanceof RenderError) throw e;
    throw new RenderError(502, 'render_failed', `Chromium: ${e.message}`);
  } finally {
    pages.delete(pageId);
    work.catch(() => {});
    if (finished && warmTab === null) {
      // parked on an empty page of the same origin (same renderer process, unlike about:blank):
      // the page's timers and frames stop until the next render
      tab.cdp.send('Page.navigate', { url: `http://127.0.0.1:${PORT}/blank` }, tab.sessionId).catch(() => {});
      warmTab = Promise.resolve(tab);
    } else if (tab) {
      closeTab(tab);
    }
    else work.then(() => tab && closeTab(tab), () => tab && closeTab(tab));  // timed out while opening it
  }
}

// --- HTTP ------------------------------------------------------------------------------

let runner = null;  // the parent's ScriptRunner (main() makes it; a runner child has none)

function outputPath(job, renderId) {
  if (!job.path) return path.join(DEFAULT_DIR, `${renderId}.${job.format === 'jpeg' ? 'jpg' : 'png'}`);
  return path.resolve(WORKDIR, job.path);
}

// mkdir -p one level at a time: Node's recursive mkdirSync spins forever under /proc
function makeParents(directory) {
  let current = '/';
  for (const part of directory.split('/').filter(Boolean)) {
    current = path.join(current, part);
    try {
      fs.mkdirSync(current);
    } catch (e) {
      if (e.code !== 'EEXIST') throw e;
    }
  }
}

function save(file, data) {
  try {
    makeParents(path.dirname(file));
    const temporary = `${file}.${process.pid}.tmp`;
    fs.writeFileSync(temporary, data);
    fs.renameSync(temporary, file);
  } catch (e) {
    throw new RenderError(400, 'invalid_path', `path: cannot write ${file}: ${e.code || e.message}`, 'path');
  }
}

async function render(job) {
  const started = Date.now();
  const deadline = started + job.timeout_ms;
  const renderId = crypto.randomBytes(8).toString('hex');
  const file = outputPath(job, renderId);
  const pixelWidth = Math.round(job.width * job.scale);
  const pixelHeight = Math.round(job.height * job.scale);
  const data = job.kind === 'html'
    ? await renderHtml(job, deadline)
    : await runner.run({ ...job, pixelWidth, pixelHeight }, deadline);
  save(file, data);
  return { data, renderId, file, pixelWidth, pixelHeight, ms: Date.now() - started };
}

function readJson(request) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    request.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(new RenderError(413, 'payload_too_large', `request body over ${MAX_BODY_BYTES} bytes`));
        request.destroy();
      } else {
        chunks.push(chunk);
      }
    });
    request.on('end', () => {
      try {
        resolve(JSON.parse(Buffer.concat(chunks).toString('utf8')));
      } catch (e) {
        reject(new RenderError(400, 'invalid_json', `request body is not valid JSON: ${e.message}`));
      }
    });
    request.on('error', reject);
  });
}

function checkJob(job) {
  const bad = (field, message) => new RenderError(400, 'invalid_value', `${field}: ${message}`, field);
  if (!job || typeof job !== 'object') throw bad('body', 'must be a JSON object');
  if (job.kind !== 'html' && job.kind !== 'script') throw bad('kind', 'must be "html" or "script"');
  if (typeof job.source !== 'string') throw bad('source', 'must be a string');
  for (const field of ['width', 'height', 'scale', 'timeout_ms']) {
    if (typeof job[field] !== 'number' || !(job[field] > 0)) throw bad(field, 'must be a positive number');
  }
  if (!(job.format in MIME)) throw bad('format', 'must be "png" or "jpeg"');
  if (job.path !== undefined && job.path !== null && typeof job.path !== 'string') throw bad('path', 'must be a string');
  return job;
}

function sendError(response, error) {
  const known = error instanceof RenderError;
  if (!known) console.error('canvas-renderer:', error);
  const body = { code: known ? error.code : 'render_failed', message: known ? error.message : String(error) };
  if (known && error.field) body.field = error.field;
  response.writeHead(known ? error.status : 500, { 'content-type': 'application/json' });
  response.end(JSON.stringify({ error: body }));
}

async function handle(request, response) {
  const url = new URL(request.url, 'http://renderer');
  if (request.method === 'GET' && url.pathname === '/health') {
    const ready = runner.isReady && cdp !== null && !cdp.closed;
    response.writeHead(ready ? 200 : 503, { 'content-type': 'application/json' });
    response.end(JSON.stringify({ ready: Boolean(ready) }));
    return;
  }
  if (request.method === 'GET' && url.pathname === '/blank') {
    response.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    response.end('<!doctype html><title>idle</title>');
    return;
  }
  if (request.method === 'GET' && url.pathname.startsWith('/page/')) {
    const html = pages.get(url.pathname.slice('/page/'.length));
    response.writeHead(html === undefined ? 404 : 200, { 'content-type': 'text/html; charset=utf-8' });
    response.end(html === undefined ? 'no such page' : html);
    return;
  }
  if (request.method === 'POST' && url.pathname === '/render') {
    const done = await render(checkJob(await readJson(request)));
    response.writeHead(200, {
      'content-type': MIME[done.data[0] === 0x89 ? 'png' : 'jpeg'],
      'content-length': done.data.length,
      'x-render-id': done.renderId,
      'x-render-path': done.file,
      'x-render-width': done.pixelWidth,
      'x-render-height': done.pixelHeight,
      'x-render-duration-ms': done.ms,
    });
    response.end(done.data);
    return;
  }
  throw new RenderError(404, 'not_found', `no route ${request.method} ${url.pathname}`);
}

async function connectChromiumUntilUp() {
  for (;;) {
    try {
      const browserCdp = await browser();
      warmTab = openTab(browserCdp).catch(() => null);  // the first render finds a tab ready
      return;
    } catch {
      await sleep(100);
    }
  }
}

function main() {
  runner = new ScriptRunner();
  const server = http.createServer((request, response) => {
    handle(request, response).catch((error) => sendError(response, error));
  });
  server.keepAliveTimeout = 5000;
  server.listen(PORT, '0.0.0.0', () => console.log(`canvas-renderer: listening on 0.0.0.0:${PORT}`));
  connectChromiumUntilUp();
  // Chromium restarts under its supervisor: reconnect as soon as the connection drops
  setInterval(() => {
    if (cdp && cdp.closed && !connecting) browser().catch(() => {});
  }, 500).unref();
}

if (process.argv[2] === '--script-runner') {
  runScripts();
} else {
  main();
}
