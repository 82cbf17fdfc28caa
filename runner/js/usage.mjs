// Rate-limit headers of an HTTP response as a Corral usage event.
//
//   reportUsage('github', response)            // in a corral-playwright script
//   -> ::corral::{"type":"usage","service":"github","units":1,"remaining":4999,
//                 "limit":5000,"resetAt":"2026-12-02T14:32:00.000Z","status":200}
//
// `response` is a fetch() Response, a Playwright APIResponse (page.request.get(...)) or
// a Playwright Response (page.goto(...)). Headers read, first found wins:
//   remaining  x-ratelimit-remaining (GitHub), x-ratelimit-remaining-requests (OpenAI)
//   limit      x-ratelimit-limit,              x-ratelimit-limit-requests
//   reset      x-ratelimit-reset (Unix seconds), x-ratelimit-reset-requests (`6m0s`, `1.5s`),
//              else retry-after (seconds or an HTTP date) on a 429 or 403
// A 429 with no remaining header reports status 429: Corral records none left.

const DURATION_PART = /(\d+(?:\.\d+)?)(ms|h|m|s)/g;
const UNIT_MS = { h: 3_600_000, m: 60_000, s: 1000, ms: 1 };

/** A function that reads one header (lower-case name) of any of the response kinds. */
export function headerReader(response) {
  const headers = response?.headers;
  if (headers && typeof headers.get === 'function') return (name) => headers.get(name); // fetch
  const all = typeof headers === 'function' ? headers.call(response) : headers ?? {};
  const lower = Object.fromEntries(Object.entries(all).map(([k, v]) => [k.toLowerCase(), v]));
  return (name) => lower[name] ?? null;
}

function statusOf(response) {
  const status = typeof response?.status === 'function' ? response.status() : response?.status;
  return Number.isInteger(status) && status >= 100 && status <= 599 ? status : null;
}

function count(value) {
  const text = String(value ?? '').trim();
  return /^\d{1,15}$/.test(text) ? Number(text) : null;
}

/** `6m0s`, `1.5s`, `20ms`, `1h2m3s` in milliseconds; null when it is none of those. */
export function durationMs(text) {
  const value = String(text ?? '').trim();
  const parts = [...value.matchAll(DURATION_PART)];
  if (!parts.length || parts.map((p) => p[0]).join('') !== value) return null;
  return parts.reduce((sum, [, n, unit]) => sum + Number(n) * UNIT_MS[unit], 0);
}

function resetAt(get, status, now) {
  const epoch = count(get('x-ratelimit-reset'));
  if (epoch !== null) return new Date(epoch * 1000);
  const duration = durationMs(get('x-ratelimit-reset-requests'));
  if (duration !== null) return new Date(now + duration);
  if (status !== 429 && status !== 403) return null;
  const retry = String(get('retry-after') ?? '').trim();
  if (!retry) return null;
  if (/^\d+$/.test(retry)) return new Date(now + Number(retry) * 1000);
  const date = new Date(retry);
  return Number.isNaN(date.getTime()) ? null : date;
}

/** The usage event's fields (without `type`) for `service` from `response`'s headers. */
export function usageFromResponse(service, response, { units = 1, now = Date.now() } = {}) {
  if (typeof service !== 'string' || !service) throw new TypeError('usageFromResponse(service, response): service must be its name or kind');
  const get = headerReader(response);
  const status = statusOf(response);
  const data = { service };
  if (units !== null && units !== undefined) data.units = units;
  const remaining = count(get('x-ratelimit-remaining') ?? get('x-ratelimit-remaining-requests'));
  const limit = count(get('x-ratelimit-limit') ?? get('x-ratelimit-limit-requests'));
  if (remaining !== null) data.remaining = remaining;
  if (limit !== null) data.limit = limit;
  const reset = resetAt(get, status, now);
  if (reset && !Number.isNaN(reset.getTime())) data.resetAt = reset.toISOString();
  if (status !== null) data.status = status;
  return data;
}

/** `reportUsage(service, response, {units})`: print the response's usage event via `emit`. */
export function makeReportUsage(emit) {
  return function reportUsage(service, response, options = {}) {
    const data = usageFromResponse(service, response, options);
    emit('usage', data);
    return data;
  };
}
