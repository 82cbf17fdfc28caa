// Fills a username/password form at args[0] (or env URL) with env LOGIN_USER / LOGIN_PASSWORD,
// submits it and reports the title of the page it lands on.
//   LOGIN_USER=me LOGIN_PASSWORD=... corral-playwright --profile DIR -- examples/login.mjs URL
// Optional selectors: env LOGIN_USER_SELECTOR, LOGIN_PASSWORD_SELECTOR, LOGIN_SUBMIT_SELECTOR.

export default async function ({ page, env, emit, args }) {
  const url = args[0] ?? env.URL;
  if (!url) throw new Error('no URL: pass it as the first argument or in env URL');
  const user = env.LOGIN_USER;
  const password = env.LOGIN_PASSWORD;
  if (!user || !password) throw new Error('set LOGIN_USER and LOGIN_PASSWORD');

  const userField = env.LOGIN_USER_SELECTOR ??
    'input[autocomplete="username"], input[name="username"], input[name="user"], input[name="login"], input[type="email"]';
  const passwordField = env.LOGIN_PASSWORD_SELECTOR ?? 'input[type="password"]';
  const submit = env.LOGIN_SUBMIT_SELECTOR ?? 'button[type="submit"], input[type="submit"]';

  await page.goto(url);
  emit('progress', { step: 'form', url: page.url() });
  await page.locator(userField).first().fill(user);
  await page.locator(passwordField).first().fill(password);
  // Submitting navigates: wait for that navigation, not just for the click.
  await Promise.all([page.waitForNavigation(), page.locator(submit).first().click()]);
  const title = await page.title();
  emit('progress', { step: 'submitted', url: page.url(), title });
  console.log(`logged in: ${title}`);
}
