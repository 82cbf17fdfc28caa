#!/usr/bin/env node
// corral-playwright: runs one Playwright script against a profile's persistent Chromium context.
//
//   corral-playwright --profile DIR [--proxy URL] [--headless|--headed] [--user-agent UA]
//                     [--locale L] [--timezone TZ] [--viewport WxH] [--chromium PATH]
//                     -- SCRIPT [ARGS...]
//
// SCRIPT is an ES module whose default export is called with
// {page, context, env, emit, reportUsage, args}; emit(type, data) prints `::corral::{"type":...}`
// on stdout; reportUsage(service, response) emits a response's rate-limit headers (usage.mjs).
//
// Exit codes: 0 done, 1 the script failed, 2 usage (bad flags, missing script),
// 3 the browser could not be launched (first stderr line: the cause; see README.md),
// 128+N stopped by signal N (SIGINT 130, SIGTERM 143, SIGHUP 129).

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

import { makeReportUsage } from './usage.mjs';

const PROG = 'corral-playwright';
const EXIT_OK = 0;
const EXIT_SCRIPT = 1;
const EXIT_USAGE = 2;
const EXIT_LAUNCH = 3;
const SIGNAL_EXIT = { SIGHUP: 129, SIGINT: 130, SIGTERM: 143 };
const STOP_DEADLINE_MS = 10_000;
const LAUNCH_TIMEOUT_MS = 60_000;
const DEFAULT_CHROMIUM = '/usr/bin/chromium';
// Debian's /usr/bin/chromium is a shell launcher that exports Google API keys and adds
// extension flags before exec'ing this binary; going straight to it is cleaner and faster.
const DEBIAN_CHROMIUM_BINARY = '/usr/lib/chromium/chromium';
const EVENT_PREFIX = '::corral::';
const LOCK_FILES = ['SingletonLock', 'SingletonSocket', 'SingletonCookie'];

// Flags for a closed network, appended after Playwright's own switches.
const BASE_ARGS = [
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
  '--no-default-browser-check',
  '--hide-crash-restore-bubble',
  // WebRTC may only use UDP through the proxy: no STUN over the real interface (IP leak).
  '--force-webrtc-ip-handling-policy=disable_non_proxied_udp',
];

// One run per process: what the signal handlers need to reach.
const state = { context: null, launching: null, stopping: null, closed: null, browserGone: false };

class UsageError extends Error {}
class LaunchError extends Error {}

function say(line) {
  process.stderr.write(`${PROG}: ${line}\n`);
}

const USAGE =
  `usage: ${PROG} --profile DIR [--proxy URL] [--headless|--headed] [--user-agent UA] ` +
  '[--locale L] [--timezone TZ] [--viewport WxH] [--chromium PATH] -- SCRIPT [ARGS...]';

// ---------------------------------------------------------------- arguments and settings

const VALUE_FLAGS = {
  '--profile': 'profile',
  '--proxy': 'proxy',
  '--user-agent': 'userAgent',
  '--locale': 'locale',
  '--timezone': 'timezone',
  '--viewport': 'viewport',
  '--chromium': 'chromium',
};

export function parseArgs(argv) {
  const opts = {};
  let i = 0;
  for (; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--') {
      i++;
      break;
    }
    if (arg === '-h' || arg === '--help') {
      opts.help = true;
      continue;
    }
    if (arg === '--headless' || arg === '--headed') {
      opts.headless = arg === '--headless';
      continue;
    }
    const eq = arg.indexOf('=');
    const name = eq > 0 ? arg.slice(0, eq) : arg;
    if (name in VALUE_FLAGS) {
      let value;
      if (eq > 0) value = arg.slice(eq + 1);
      else if (i + 1 < argv.length) value = argv[++i];
      else throw new UsageError(`${name} needs a value`);
      opts[VALUE_FLAGS[name]] = value;
      continue;
    }
    if (arg.startsWith('-')) throw new UsageError(`unknown option ${arg}`);
    break; // SCRIPT without a `--` before it
  }
  if (opts.help) return opts;
  if (i >= argv.length) throw new UsageError('no SCRIPT given');
  opts.script = argv[i];
  opts.args = argv.slice(i + 1);
  if (!opts.profile) throw new UsageError('--profile DIR is required');
  if (opts.viewport !== undefined) opts.viewport = parseViewport(opts.viewport, '--viewport');
  return opts;
}

function parseViewport(text, where) {
  const match = /^(\d+)x(\d+)$/i.exec(String(text).trim());
  if (!match) throw new UsageError(`${where}: expected WIDTHxHEIGHT, got ${JSON.stringify(text)}`);
  const viewport = { width: Number(match[1]), height: Number(match[2]) };
  if (viewport.width < 1 || viewport.height < 1) throw new UsageError(`${where}: must be positive`);
  return viewport;
}

function envSettings(env) {
  const raw = env.CORRAL_BROWSER_SETTINGS;
  if (!raw || !raw.trim()) return {};
  let data;
  try {
    data = JSON.parse(raw);
  } catch (err) {
    throw new UsageError(`CORRAL_BROWSER_SETTINGS is not valid JSON: ${err.message}`);
  }
  if (data === null) return {};
  if (typeof data !== 'object' || Array.isArray(data))
    throw new UsageError('CORRAL_BROWSER_SETTINGS must be a JSON object');
  const out = {};
  const str = (key) => {
    const value = data[key];
    if (value === null || value === undefined || value === '') return undefined;
    if (typeof value !== 'string')
      throw new UsageError(`CORRAL_BROWSER_SETTINGS.${key} must be a string or null`);
    return value;
  };
  out.userAgent = str('userAgent');
  out.locale = str('locale');
  out.timezone = str('timezone');
  const vp = data.viewport;
  if (vp !== null && vp !== undefined) {
    if (typeof vp !== 'object') throw new UsageError('CORRAL_BROWSER_SETTINGS.viewport must be an object');
    const { width, height } = vp;
    if (width != null && height != null) {
      if (!Number.isInteger(width) || !Number.isInteger(height) || width < 1 || height < 1)
        throw new UsageError('CORRAL_BROWSER_SETTINGS.viewport needs positive integer width/height');
      out.viewport = { width, height };
    }
  }
  if (data.headless !== null && data.headless !== undefined) {
    if (typeof data.headless !== 'boolean')
      throw new UsageError('CORRAL_BROWSER_SETTINGS.headless must be true, false or null');
    out.headless = data.headless;
  }
  return out;
}

function resolveChromium(opts, env) {
  const chosen = opts.chromium || env.CORRAL_CHROMIUM_PATH || DEFAULT_CHROMIUM;
  // Debian's launcher script, however it was named (Corral passes its default setting),
  // is skipped: the same browser, ~20 ms faster, without Debian's extra flags and keys.
  if (chosen === DEFAULT_CHROMIUM && isShellScript(chosen) && isExecutable(DEBIAN_CHROMIUM_BINARY)) {
    return DEBIAN_CHROMIUM_BINARY;
  }
  return chosen;
}

function isShellScript(file) {
  try {
    const fd = fs.openSync(file, 'r');
    try {
      const buf = Buffer.alloc(2);
      fs.readSync(fd, buf, 0, 2, 0);
      return buf.toString() === '#!';
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    return false;
  }
}

function isExecutable(file) {
  try {
    fs.accessSync(file, fs.constants.X_OK);
    return fs.statSync(file).isFile();
  } catch {
    return false;
  }
}

function resolveScript(script, env) {
  const candidates = [path.resolve(process.cwd(), script)];
  if (env.CORRAL_SCRIPTS_DIR && !path.isAbsolute(script))
    candidates.push(path.resolve(env.CORRAL_SCRIPTS_DIR, script));
  for (const candidate of candidates) {
    try {
      if (fs.statSync(candidate).isFile()) return candidate;
    } catch {
      // try the next one
    }
  }
  const where = env.CORRAL_SCRIPTS_DIR && !path.isAbsolute(script)
    ? ` (looked in ${process.cwd()} and CORRAL_SCRIPTS_DIR=${env.CORRAL_SCRIPTS_DIR})`
    : path.isAbsolute(script) ? '' : ` (looked in ${process.cwd()}; CORRAL_SCRIPTS_DIR is not set)`;
  throw new UsageError(`script not found: ${script}${where}`);
}

function proxyOption(url) {
  let parsed;
  try {
    parsed = new URL(url);
  } catch {
    throw new UsageError(`proxy is not a URL: ${JSON.stringify(url)}`);
  }
  const scheme = parsed.protocol.replace(/:$/, '');
  if (!['socks5', 'socks4', 'http', 'https'].includes(scheme))
    throw new UsageError(`unsupported proxy scheme ${scheme}: (socks5, socks4, http, https)`);
  if (!parsed.hostname || !parsed.port)
    throw new UsageError(`proxy URL needs a host and a port: ${JSON.stringify(url)}`);
  const proxy = { server: `${scheme}://${parsed.host}` };
  if (parsed.username) proxy.username = decodeURIComponent(parsed.username);
  if (parsed.password) proxy.password = decodeURIComponent(parsed.password);
  return proxy;
}

// ---------------------------------------------------------------- SingletonLock

function lockTarget(profileDir) {
  try {
    return fs.readlinkSync(path.join(profileDir, 'SingletonLock'));
  } catch (err) {
    if (err.code === 'ENOENT') return null;
    if (err.code === 'EINVAL') return ''; // not a symlink: not Chromium's; leave it to Chromium
    throw err;
  }
}

function pidAlive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return err.code === 'EPERM';
  }
}

function isChromiumProcess(pid) {
  try {
    return /chrom/i.test(path.basename(fs.readlinkSync(`/proc/${pid}/exe`)));
  } catch {
    return true; // cannot tell: assume it is (never steal a lock that may be live)
  }
}

/**
 * Clears a stale lock (this host, dead PID). Throws LaunchError when a live browser holds it.
 * A lock whose PID is alive but is not a Chromium (PID reuse) is left to Chromium, which
 * takes it over itself.
 */
export function checkProfileLock(profileDir) {
  const target = lockTarget(profileDir);
  if (!target) return 'free';
  const dash = target.lastIndexOf('-');
  const host = dash > 0 ? target.slice(0, dash) : '';
  const pid = dash > 0 ? Number(target.slice(dash + 1)) : NaN;
  if (!host || !Number.isInteger(pid) || pid <= 0) return 'unknown';
  if (host !== os.hostname())
    throw new LaunchError(
      `profile ${profileDir} is in use by a browser on another host (SingletonLock -> ${target}); ` +
        `if that host is gone, delete ${path.join(profileDir, 'SingletonLock')}`,
    );
  if (!pidAlive(pid)) {
    removeStaleSocketDir(profileDir);
    for (const name of LOCK_FILES) {
      try {
        fs.unlinkSync(path.join(profileDir, name));
      } catch (err) {
        if (err.code !== 'ENOENT') throw err;
      }
    }
    return 'cleared';
  }
  if (isChromiumProcess(pid)) throw new LaunchError(profileInUse(profileDir));
  return 'reused-pid';
}

// A dead Chromium also leaves its socket dir (/tmp/org.chromium.Chromium.XXXXXX) behind.
function removeStaleSocketDir(profileDir) {
  let dir;
  try {
    dir = path.dirname(fs.readlinkSync(path.join(profileDir, 'SingletonSocket')));
  } catch {
    return;
  }
  if (!/^org\.chromium\.Chromium\.\w+$/.test(path.basename(dir))) return;
  if (![os.tmpdir(), '/tmp'].includes(path.dirname(dir))) return;
  fs.rmSync(dir, { recursive: true, force: true });
}

function profileInUse(profileDir) {
  return `profile ${profileDir} is in use by another browser (SingletonLock)`;
}

// Chromium's stderr lines that say nothing about why a launch failed: a host without a
// system D-Bus, GPU, audio or fonts prints them on every start, including successful ones.
// (Their "No such file or directory" once passed for a missing executable: issue 12.)
const HARMLESS_CHROMIUM_LINE =
  /dbus|D-Bus|UPower|object_proxy|\bgpu|viz_main|angle|vaapi|libva|vulkan|\bEGL|GLES|Fontconfig|ALSA|pulse|zygote|sandbox_linux|ozone|DevTools listening|google_apis|gcm\/|registration_request|:(?:INFO|WARNING|VERBOSE\d*):/i;
const CHROMIUM_LOG_PREFIX = /^\[\d+:\d+:[\d/.]+:(\w+):([^\]]+)\]\s*/;
const MAX_STDERR_LINES = 5;

/** Chromium's own stderr lines from Playwright's call log, noise dropped, the last few kept. */
export function relevantChromiumLines(message) {
  const lines = [];
  for (const raw of message.split('\n')) {
    const match = /^\s*(?:- )?\[pid=\d+\]\[err\] (.*)$/.exec(raw);
    if (!match) continue;
    const text = match[1].trim();
    if (!text || HARMLESS_CHROMIUM_LINE.test(text)) continue;
    const log = CHROMIUM_LOG_PREFIX.exec(text);
    const line = log ? `${log[1]} ${log[2]}: ${text.slice(log[0].length)}` : text;
    if (!lines.includes(line)) lines.push(line);
  }
  return lines.slice(-MAX_STDERR_LINES);
}

/** How Chromium's process ended during the launch, from Playwright's call log; null if it did not. */
function chromiumExit(message) {
  const match = /<process did exit: exitCode=(\S+), signal=(\S+)>/.exec(message);
  if (!match) return null;
  return { code: match[1] === 'null' ? null : Number(match[1]), signal: match[2] === 'null' ? null : match[2] };
}

/**
 * The cause of a failed launch, as lines for stderr: the first names the cause, the rest are
 * Chromium's relevant stderr lines. Classified from what Playwright and Chromium said.
 */
export function launchFailure(err, { profileDir, executablePath, headless, settings = {} }) {
  // Playwright colours its call log; the escapes would only get in the way of the matching.
  const message = String(err?.message ?? err).replace(/\x1b\[[0-9;]*m/g, '');
  const headline = (message.split('\n').find((line) => line.trim() && !/^=+/.test(line.trim())) ?? '')
    .replace(/^\S+\.launchPersistentContext: /, '')
    .trim();
  const stderr = relevantChromiumLines(message);
  const exit = chromiumExit(message);
  const withStderr = (cause) => [cause, ...stderr.map((line) => `  chromium: ${line}`)];

  if (/ProcessSingleton|SingletonLock|profile appears to be in use/i.test(message) || exit?.code === 21)
    return [profileInUse(profileDir)];
  if (/Invalid timezone ID/i.test(headline))
    return withStderr(
      `cannot launch Chromium: invalid timezone ${JSON.stringify(settings.timezone ?? headline.split(': ').pop())} ` +
        '(browser setting "timezone" or --timezone; use an IANA name such as Europe/Berlin)',
    );
  if (/setLocaleOverride|Invalid locale/i.test(headline))
    return withStderr(
      `cannot launch Chromium: invalid locale ${JSON.stringify(settings.locale ?? '')} ` +
        '(browser setting "locale" or --locale; use a BCP 47 tag such as en-US)',
    );
  if (/setUserAgentOverride/i.test(headline))
    return withStderr(`cannot launch Chromium: the user agent was refused (${headline})`);
  if (/Missing X server|XServer|\$DISPLAY/i.test(message) && !headless)
    return ['cannot launch a headed browser: no X server ($DISPLAY); use --headless or run under xvfb-run'];
  // Only the headline may say the executable is missing: Chromium's own "No such file" lines
  // (D-Bus sockets and the like) are about other files. Believe it only if the file is gone.
  if (/ENOENT|doesn't exist|no such file/i.test(headline) && !fs.existsSync(executablePath))
    return [`cannot launch Chromium: ${executablePath} not found`];
  if (exit && (exit.signal || (exit.code !== null && exit.code !== 0)))
    return withStderr(
      exit.signal
        ? `cannot launch Chromium: it crashed during start (signal ${exit.signal})`
        : `cannot launch Chromium: it exited during start with code ${exit.code}`,
    );
  if (/Timeout \d+ms exceeded/i.test(headline))
    return withStderr(`cannot launch Chromium: it did not start within ${LAUNCH_TIMEOUT_MS / 1000} s`);
  return withStderr(`cannot launch Chromium: ${headline || 'unknown error'}`);
}

// ---------------------------------------------------------------- events

export function makeEmit(stream = process.stdout) {
  return function emit(type, data = {}) {
    if (typeof type !== 'string' || !type) throw new TypeError('emit(type, data): type must be a non-empty string');
    const { type: _ignored, ...rest } = data && typeof data === 'object' ? data : { value: data };
    stream.write(`${EVENT_PREFIX}${JSON.stringify({ type, ...rest })}\n`);
  };
}

// ---------------------------------------------------------------- main

async function main() {
  // Loading playwright-core takes ~0.3 s: start it now, alongside argument and script checks.
  const playwright = import('playwright-core').then(
    (mod) => ({ mod }),
    (error) => ({ error }),
  );
  let opts;
  let script;
  let settings;
  const env = process.env;
  try {
    opts = parseArgs(process.argv.slice(2));
    if (opts.help) {
      process.stdout.write(`${USAGE}\n`);
      return EXIT_OK;
    }
    settings = { ...envSettings(env) };
    for (const key of ['userAgent', 'locale', 'timezone', 'viewport', 'headless'])
      if (opts[key] !== undefined) settings[key] = opts[key];
    script = resolveScript(opts.script, env);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    say(err.message);
    return EXIT_USAGE;
  }

  const proxyUrl = opts.proxy ?? env.CORRAL_PROXY_URL ?? '';
  let proxy;
  try {
    proxy = proxyUrl ? proxyOption(proxyUrl) : undefined;
  } catch (err) {
    say(err.message);
    return EXIT_USAGE;
  }

  // Load the script before launching anything: a broken module costs no browser start.
  let run;
  try {
    const mod = await import(pathToFileURL(script).href);
    run = mod.default;
  } catch (err) {
    say(`cannot load ${opts.script}: ${err?.stack ?? err}`);
    return EXIT_SCRIPT;
  }
  if (typeof run !== 'function') {
    say(`${opts.script} has no default export function (export default async function ({page}) {...})`);
    return EXIT_USAGE;
  }

  const profileDir = path.resolve(opts.profile);
  const executablePath = resolveChromium(opts, env);
  const headless = settings.headless ?? true;

  installSignalHandlers();

  try {
    fs.mkdirSync(profileDir, { recursive: true });
    checkProfileLock(profileDir);
    if (!isExecutable(executablePath))
      throw new LaunchError(
        `cannot launch Chromium: ${executablePath} ${fs.existsSync(executablePath) ? 'is not an executable file' : 'not found'} ` +
          '(use --chromium or CORRAL_CHROMIUM_PATH)',
      );
  } catch (err) {
    say(err instanceof LaunchError ? err.message : `cannot prepare profile ${profileDir}: ${err.message}`);
    return EXIT_LAUNCH;
  }

  const args = [...BASE_ARGS];
  if (typeof process.getuid === 'function' && process.getuid() === 0) args.push('--no-sandbox');
  if (proxy) {
    // Playwright adds --proxy-bypass-list=<-loopback> (loopback goes through the proxy too)
    // and, for socks5, maps every hostname to NOTFOUND locally (DNS through the proxy).
    // This variable would turn the loopback part off: nothing may bypass the proxy.
    delete process.env.PLAYWRIGHT_DISABLE_FORCED_CHROMIUM_PROXIED_LOOPBACK;
  }

  const launchOptions = {
    executablePath,
    headless,
    args,
    timeout: LAUNCH_TIMEOUT_MS,
    handleSIGINT: false,
    handleSIGTERM: false,
    handleSIGHUP: false,
  };
  if (proxy) launchOptions.proxy = proxy;
  if (settings.userAgent) launchOptions.userAgent = settings.userAgent;
  if (settings.locale) launchOptions.locale = settings.locale;
  if (settings.timezone) launchOptions.timezoneId = settings.timezone;
  if (settings.viewport) launchOptions.viewport = settings.viewport;

  const loaded = await playwright;
  if (loaded.error) {
    say(`cannot load playwright-core (run npm ci in runner/js): ${loaded.error.message}`);
    return EXIT_LAUNCH;
  }
  const { chromium } = loaded.mod;

  if (state.stopping) return state.stopping;
  const launch = chromium.launchPersistentContext(profileDir, launchOptions);
  state.launching = launch;
  let context;
  try {
    context = await launch;
  } catch (err) {
    if (state.stopping) return state.stopping; // a signal arrived during launch
    for (const line of launchFailure(err, { profileDir, executablePath, headless, settings })) say(line);
    if (env.CORRAL_PLAYWRIGHT_DEBUG) process.stderr.write(`${err?.stack ?? err}\n`);
    return EXIT_LAUNCH;
  }
  state.context = context;
  context.on('close', () => {
    if (state.closed) return;
    // Not closed by us: Chromium crashed or was killed. A script still awaiting something
    // that never settles would otherwise let Node exit 0 once the pipe is gone.
    state.browserGone = true;
    say('the browser exited unexpectedly (crash or killed)');
    process.exitCode = EXIT_SCRIPT;
    setTimeout(() => process.exit(EXIT_SCRIPT), 1000).unref();
  });
  if (state.stopping) return await closeAndReturn(state.stopping);

  const page = context.pages()[0] ?? (await context.newPage());
  const emit = makeEmit();
  let code = EXIT_OK;
  try {
    const reportUsage = makeReportUsage(emit);
    await run({ page, context, env: process.env, emit, reportUsage, args: opts.args });
  } catch (err) {
    // When we are stopping, the close we started is what made the script fail: not its fault.
    if (state.stopping) return await closeAndReturn(state.stopping);
    say(`script ${opts.script} failed: ${err?.stack ?? err}`);
    code = EXIT_SCRIPT;
  }
  if (state.stopping) return await closeAndReturn(state.stopping);
  return await closeAndReturn(code);
}

/** Close the context (Chromium flushes cookies, removes SingletonLock); the result is `code`. */
async function closeAndReturn(code) {
  if (!state.closed) {
    setTimeout(() => {
      say(`browser did not close within ${STOP_DEADLINE_MS / 1000} s: exiting`);
      process.exit(code); // Playwright's exit hook SIGKILLs the browser's process group
    }, STOP_DEADLINE_MS).unref();
    state.closed = (async () => {
      try {
        await state.context?.close();
      } catch (err) {
        if (process.env.CORRAL_PLAYWRIGHT_DEBUG) say(`close: ${err?.message ?? err}`);
      }
      return code;
    })();
  }
  return await state.closed;
}

/** Close the browser cleanly, then exit with `code`; a deadline forces the exit. */
function stop(code) {
  if (state.stopping) return;
  state.stopping = code;
  setTimeout(() => {
    say(`browser did not close within ${STOP_DEADLINE_MS / 1000} s: exiting`);
    process.exit(code); // Playwright's exit hook SIGKILLs the browser's process group
  }, STOP_DEADLINE_MS).unref();
  (async () => {
    if (!state.context && state.launching) {
      try {
        state.context = await state.launching;
      } catch {
        process.exit(code);
      }
    }
    process.exit(await closeAndReturn(code));
  })();
}

function installSignalHandlers() {
  const onSignal = (signal) => {
    if (state.stopping) {
      say(`${signal} again: exiting now`);
      process.exit(state.stopping); // Playwright's exit hook SIGKILLs the browser
    }
    stop(SIGNAL_EXIT[signal]);
  };
  for (const signal of Object.keys(SIGNAL_EXIT)) process.on(signal, () => onSignal(signal));
}

/** An error nobody awaited (a stray promise of the script): report it, stop as a failure. */
function onStrayError(kind) {
  return (err) => {
    say(`${kind}: ${err?.stack ?? err}`);
    stop(EXIT_SCRIPT);
  };
}

const isMain = (() => {
  try {
    return fs.realpathSync(process.argv[1] ?? '') === fs.realpathSync(new URL(import.meta.url));
  } catch {
    return false;
  }
})();

if (isMain) {
  process.on('unhandledRejection', onStrayError('unhandled rejection'));
  process.on('uncaughtException', onStrayError('uncaught exception'));
  main().then(
    (code) => process.exit(code),
    (err) => {
      say(`internal error: ${err?.stack ?? err}`);
      process.exit(EXIT_SCRIPT);
    },
  );
}
