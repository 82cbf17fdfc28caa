// Opens args[0] (or env URL), saves a full-page PNG into the working directory and reports it.
//   corral-playwright --profile DIR -- examples/screenshot.mjs https://example.org [name.png]
import fs from 'node:fs';
import path from 'node:path';

export default async function ({ page, env, emit, args }) {
  const url = args[0] ?? env.URL;
  if (!url) throw new Error('no URL: pass it as the first argument or in env URL');
  const file = path.resolve(args[1] ?? 'screenshot.png');

  emit('progress', { step: 'open', url });
  const response = await page.goto(url, { waitUntil: 'load' });
  emit('progress', { step: 'loaded', url: page.url(), status: response?.status() ?? null, title: await page.title() });

  await page.screenshot({ path: file, fullPage: true });
  const { size } = fs.statSync(file);
  // Relative to the working directory when inside it (Corral gives each command its own).
  const rel = path.relative(process.cwd(), file);
  const shown = rel && !rel.startsWith('..') && !path.isAbsolute(rel) ? rel : file;
  emit('artifact', { path: shown, bytes: size, contentType: 'image/png' });
  console.log(`saved ${file} (${size} bytes)`);
}
