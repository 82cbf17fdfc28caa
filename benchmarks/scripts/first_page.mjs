// Benchmark material (benchmarks/browser_run.py): open args[0] and report when the first page
// has loaded, as a `first_page` event with epoch-millisecond timestamps.
//
// Through Corral:  corral-playwright --profile DIR --proxy URL -- first_page.mjs URL [HOLD_MS]
// Bare:            node first_page.mjs --bare --profile DIR [--proxy URL] [--chromium PATH]
//                       -- URL [HOLD_MS]
//
// Bare mode launches the same persistent context with playwright-core directly (from
// runner/js/node_modules, the host's flags and launch options, no signal handling, no lock
// checks) and calls the same function: the same script, without Corral.
// HOLD_MS keeps the page open after it loaded (memory sampling).

import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const moduleAt = Date.now();

export default async function firstPage({ page, args, emit }) {
  const calledAt = Date.now();
  const response = await page.goto(args[0]);
  const at = Date.now();
  emit('first_page', {
    at,
    called_at: calledAt,
    module_at: moduleAt,
    node_start: performance.timeOrigin,
    status: response ? response.status() : null,
    pid: process.pid,
  });
  const hold = Number(args[1] ?? 0);
  if (hold > 0) await new Promise((resolve) => setTimeout(resolve, hold));
}

// The same switches runner/js/corral-playwright.mjs appends (BASE_ARGS).
const HOST_ARGS = [
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
  '--no-default-browser-check',
  '--hide-crash-restore-bubble',
  '--force-webrtc-ip-handling-policy=disable_non_proxied_udp',
];

async function bare(argv) {
  const here = path.dirname(fileURLToPath(import.meta.url));
  const jsDir = path.resolve(here, '..', '..', 'runner', 'js');
  // The ESM entry the host's `import('playwright-core')` loads (package.json "exports").
  const entry = path.join(jsDir, 'node_modules', 'playwright-core', 'index.mjs');
  const loading = import(pathToFileURL(entry).href);
  const opts = { chromium: '/usr/lib/chromium/chromium' };
  let i = 0;
  for (; i < argv.length && argv[i] !== '--'; i++) {
    const name = argv[i].replace(/^--/, '');
    if (name === 'bare') continue;
    opts[name] = argv[++i];
  }
  const args = argv.slice(i + 1);
  const launchArgs = [...HOST_ARGS];
  if (typeof process.getuid === 'function' && process.getuid() === 0) launchArgs.push('--no-sandbox');
  const options = {
    executablePath: opts.chromium,
    headless: true,
    args: launchArgs,
    timeout: 60_000,
    handleSIGINT: false,
    handleSIGTERM: false,
    handleSIGHUP: false,
  };
  if (opts.proxy) options.proxy = { server: opts.proxy };
  const { chromium } = await loading;
  const context = await chromium.launchPersistentContext(path.resolve(opts.profile), options);
  const page = context.pages()[0] ?? (await context.newPage());
  const emit = (type, data) => process.stdout.write(`::corral::${JSON.stringify({ type, ...data })}\n`);
  try {
    await firstPage({ page, context, env: process.env, emit, args });
  } finally {
    await context.close();
  }
}

if (process.argv[2] === '--bare') {
  bare(process.argv.slice(2)).then(
    () => process.exit(0),
    (err) => {
      process.stderr.write(`first_page --bare: ${err?.stack ?? err}\n`);
      process.exit(1);
    },
  );
}
