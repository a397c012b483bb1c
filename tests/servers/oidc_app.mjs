// The third test server: oidc-provider (panva, npm, pinned in package.json) with a protected memo API.
//
//   node oidc_app.mjs CONFIG.json
//
// CONFIG.json is written by tests/servers/oidc.py (read its OidcServer docstring for the switches):
//   state_dir             folder for access.log (required)
//   port                  0 (default) for any free loopback port
//   keep_alive_timeout    seconds an idle keep-alive connection stays open (default Node's, 5)
//   access_token_ttl      seconds (default 3600)
//   clients               oidc-provider client metadata, one object per client
//   require_par           PAR required for every authorization request (RFC 9126 §5)
//   token_nonce           DPoP nonces required at the token and PAR endpoints (RFC 9449 §8)
//   api_nonce_ttl         > 0: the API demands its own DPoP nonces, each living this many seconds (RFC 9449 §9)
//   dpop_off              DPoP turned off: proofs are ignored and every token is a Bearer token (a server that
//                         does not bind tokens, RFC 9449 §5)
//   resource_metadata     the API publishes RFC 9728 metadata and names it in its 401 challenge
//   challenge_metadata_url the resource_metadata the challenge names instead of the API's own (a mix-up test)
//   resource_metadata_resource  the `resource` the document names instead of the API's URL (RFC 9728 §3.3 test)
//   resource_metadata_servers   the `authorization_servers` the document names instead of this issuer (a mix-up
//                               test: a server whose metadata names another issuer)
//   api_requires_dpop     the API refuses tokens that are not DPoP-bound, and its resource metadata says
//                         dpop_bound_access_tokens_required: true (RFC 9728 §2)
//   registration          "off" | "open" | "token" (RFC 7591; "token": an initial access token is needed)
//   initial_access_token  the value that "token" registration accepts
//   step_up_acr           the API answers insufficient_user_authentication (RFC 9470) unless the token's
//   step_up_max_age       login used this acr / is at most this many seconds old
//
// Prints "READY http://127.0.0.1:PORT" on stdout once it listens. The issuer is that URL; the API is
// ISSUER/api/memos/, the one resource (RFC 8707) the server issues access tokens for, with scope "read".
//
// Access log: $state_dir/access.log, one JSON object per request, written before the answer goes out.
// Names of parameters only for anything secret (tokens, codes, secrets, assertions, proofs, request_uri).
//
// Test-only endpoints under /__test__/: POST age_tokens?seconds=N (access tokens expire N s earlier),
// POST expire_requests (every pushed authorization request expires now),
// POST api_unavailable?count=N (the API answers 503 to the next N requests it has checked, DPoP proof included:
// a resource server that fails after it has seen the proof's jti), POST reset (forget grants, tokens and sessions), GET tokens (summaries, no token values),
// GET secrets (every secret the server holds, so a test can check none was printed).

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';

import { calculateJwkThumbprint, decodeJwt, decodeProtectedHeader, EmbeddedJWK, jwtVerify } from 'jose';
import Provider, { errors, interactionPolicy } from 'oidc-provider';

const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const ACCESS_LOG = path.join(config.state_dir, 'access.log');
const ACCESS_TOKEN_TTL = config.access_token_ttl ?? 3600;
const MEMO = JSON.stringify({ message: 'ふじ' });
const DPOP_ALGS = ['ES256', 'Ed25519', 'EdDSA']; // what the provider accepts at its endpoints (its default)
const PROOF_WINDOW = 60; // seconds either side of now that the API accepts a proof's iat without a nonce

// -- storage: oidc-provider's adapter interface over one Map, so tests can age and list tokens ------------
const store = new Map(); // "Model:id" -> { payload, expiresAt (ms or Infinity) }

class MemoryAdapter {
  constructor(model) { this.model = model; }

  key(id) { return `${this.model}:${id}`; }

  async upsert(id, payload, expiresIn) {
    store.set(this.key(id), { payload, expiresAt: expiresIn ? Date.now() + expiresIn * 1000 : Infinity });
  }

  async find(id) {
    const entry = store.get(this.key(id));
    if (!entry) return undefined;
    if (entry.expiresAt <= Date.now()) {
      store.delete(this.key(id));
      return undefined;
    }
    return entry.payload;
  }

  async findBy(field, value) {
    for (const [key, entry] of store) {
      if (key.startsWith(`${this.model}:`) && entry.payload[field] === value) return this.find(key.slice(this.model.length + 1));
    }
    return undefined;
  }

  findByUid(uid) { return this.findBy('uid', uid); }

  findByUserCode(userCode) { return this.findBy('userCode', userCode); }

  async consume(id) {
    const entry = store.get(this.key(id));
    if (entry) entry.payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) { store.delete(this.key(id)); }

  async revokeByGrantId(grantId) {
    for (const [key, entry] of store) {
      if (entry.payload.grantId === grantId) store.delete(key);
    }
  }
}

// -- the protected API's own DPoP nonces: a current and a previous one, rotated every api_nonce_ttl s ------
const apiNonces = { current: null, previous: null, since: 0 };

function apiNonce() {
  const now = Date.now();
  if (!apiNonces.current || now - apiNonces.since >= config.api_nonce_ttl * 1000) {
    apiNonces.previous = apiNonces.current;
    apiNonces.current = crypto.randomBytes(16).toString('base64url');
    apiNonces.since = now;
  }
  return apiNonces.current;
}

const seenProofs = new Map(); // jti -> expiry (ms): the API refuses a replayed proof (RFC 9449 §11.1)
let apiUnavailable = 0; // the API's next this many checked requests get 503 (POST /__test__/api_unavailable)

// acr_values are voluntary (OIDC Core §3.1.2.1): oidc-provider logs nobody in again for them. For the
// step-up switch a login whose acr is not the one asked for is redone, as a server demanding it would.
function interactionsPolicy() {
  const policy = interactionPolicy.base();
  policy.get('login').checks.add(new interactionPolicy.Check(
    'step_up_acr',
    'the acr asked for needs a new login',
    'login_required',
    ({ oidc }) => {
      const asked = String(oidc.params.acr_values ?? '').split(' ');
      return !!config.step_up_acr && asked.includes(config.step_up_acr) && oidc.acr !== config.step_up_acr;
    },
  ));
  return policy;
}

// -- the provider -----------------------------------------------------------------------------------------
function providerConfig(issuer) {
  const apiUrl = `${issuer}/api/memos/`;
  const resourceServer = { scope: 'read', audience: apiUrl, accessTokenTTL: ACCESS_TOKEN_TTL, accessTokenFormat: 'opaque' };
  const registration = config.registration ?? 'off';
  return {
    adapter: MemoryAdapter,
    clients: config.clients ?? [],
    cookies: { keys: ['fetch-memos-test-cookie-key'] },
    pkce: { required: () => true }, // S256 only (the library's one method); every client here uses it
    ttl: { AccessToken: ACCESS_TOKEN_TTL },
    // A refresh token for every grant that allows refresh_token, not only offline_access + consent (OIDC §11).
    issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
    rotateRefreshToken: () => true,
    expiresWithSession: async () => false,
    // The login's acr and time ride on the access token (in `extra`), so the API can demand a step-up.
    extraTokenClaims: async (ctx) => {
      const { AuthorizationCode, RefreshToken, DeviceCode } = ctx.oidc.entities;
      const source = AuthorizationCode ?? RefreshToken ?? DeviceCode;
      return source ? { acr: source.acr, auth_time: source.authTime } : undefined;
    },
    acrValues: ['urn:fetch-memos:password', 'urn:fetch-memos:mfa'],
    interactions: { policy: interactionsPolicy() },
    features: {
      devInteractions: { enabled: true },
      deviceFlow: { enabled: true },
      revocation: { enabled: true },
      introspection: { enabled: true },
      pushedAuthorizationRequests: { enabled: true, requirePushedAuthorizationRequests: !!config.require_par },
      dPoP: {
        enabled: !config.dpop_off,
        nonceSecret: crypto.randomBytes(32),
        requireNonce: () => !!config.token_nonce,
      },
      registration: {
        enabled: registration !== 'off',
        initialAccessToken: registration === 'token' ? config.initial_access_token : false,
      },
      resourceIndicators: {
        enabled: true,
        defaultResource: async () => apiUrl,
        useGrantedResource: async () => true,
        getResourceServerInfo: async (ctx, indicator) => {
          if (indicator !== apiUrl) throw new errors.InvalidTarget();
          return resourceServer;
        },
      },
    },
  };
}

// -- the memo API -----------------------------------------------------------------------------------------
function challenge(ctx, scheme, error, description, extra = {}) {
  const params = { error, error_description: description, ...extra };
  if (scheme === 'DPoP') params.algs = DPOP_ALGS.join(' ');
  if (config.resource_metadata) {
    params.resource_metadata = config.challenge_metadata_url ?? resourceMetadataUrl(ctx.state.issuer);
  }
  const rendered = Object.entries(params).map(([k, v]) => `${k}="${v}"`).join(', ');
  ctx.status = 401;
  ctx.set('WWW-Authenticate', `${scheme} ${rendered}`);
  ctx.type = 'application/json';
  ctx.body = JSON.stringify({ error, error_description: description });
}

async function checkProof(ctx, proof, accessToken, jkt) {
  let header;
  let payload;
  try {
    ({ payload, protectedHeader: header } = await jwtVerify(proof, EmbeddedJWK, { typ: 'dpop+jwt', algorithms: DPOP_ALGS }));
  } catch (err) {
    return `DPoP proof invalid: ${err.code ?? err.message}`;
  }
  const now = Date.now() / 1000;
  if (payload.htm !== ctx.method) return 'DPoP proof htm mismatch';
  if (payload.htu !== `${ctx.state.issuer}${ctx.path}`) return 'DPoP proof htu mismatch';
  if (typeof payload.jti !== 'string' || !payload.jti) return 'DPoP proof has no jti';
  if (typeof payload.iat !== 'number' || Math.abs(now - payload.iat) > PROOF_WINDOW) return 'DPoP proof iat is not recent';
  if (payload.ath !== crypto.createHash('sha256').update(accessToken).digest('base64url')) return 'DPoP proof ath mismatch';
  if (await calculateJwkThumbprint(header.jwk) !== jkt) return 'DPoP proof key does not match the token (cnf.jkt)';
  for (const [jti, until] of seenProofs) if (until < Date.now()) seenProofs.delete(jti);
  if (seenProofs.has(payload.jti)) return 'DPoP proof replayed (jti seen before)';
  seenProofs.set(payload.jti, Date.now() + 2 * PROOF_WINDOW * 1000);
  if (config.api_nonce_ttl > 0) {
    const current = apiNonce();
    if (!payload.nonce || ![current, apiNonces.previous].includes(payload.nonce)) return 'use_dpop_nonce';
  }
  return null;
}

async function memos(ctx, provider) {
  const [scheme, value] = (ctx.get('authorization') || '').split(/\s+/, 2);
  const kind = scheme?.toLowerCase();
  const used = kind === 'dpop' ? 'DPoP' : 'Bearer';
  if (config.api_nonce_ttl > 0) ctx.set('DPoP-Nonce', apiNonce());
  if (!value || (kind !== 'bearer' && kind !== 'dpop')) {
    return challenge(ctx, used, 'invalid_token', 'no access token');
  }
  const token = await provider.AccessToken.find(value);
  if (!token || !token.isValid) return challenge(ctx, used, 'invalid_token', 'the access token is unknown, revoked or expired');
  if (token.aud !== ctx.state.apiUrl && !(Array.isArray(token.aud) && token.aud.includes(ctx.state.apiUrl))) {
    return challenge(ctx, used, 'invalid_token', 'the access token is for another resource');
  }
  if (token.jkt) {
    if (kind !== 'dpop') return challenge(ctx, 'DPoP', 'invalid_token', 'DPoP-bound token sent as a Bearer token');
    const proof = ctx.get('dpop');
    if (!proof) return challenge(ctx, 'DPoP', 'invalid_dpop_proof', 'no DPoP proof');
    const problem = await checkProof(ctx, proof, value, token.jkt);
    if (problem === 'use_dpop_nonce') return challenge(ctx, 'DPoP', 'use_dpop_nonce', 'Resource server requires nonce in DPoP proof');
    if (problem) return challenge(ctx, 'DPoP', 'invalid_dpop_proof', problem);
  } else if (kind === 'dpop') {
    return challenge(ctx, 'DPoP', 'invalid_token', 'the access token is not DPoP-bound');
  } else if (config.api_requires_dpop) {
    return challenge(ctx, 'DPoP', 'invalid_token', 'this API accepts DPoP-bound access tokens only');
  }
  if (apiUnavailable > 0) {
    apiUnavailable -= 1;
    ctx.status = 503;
    ctx.body = { error: 'temporarily_unavailable' };
    return;
  }
  if (!String(token.scope ?? '').split(' ').includes('read')) {
    ctx.status = 403;
    ctx.set('WWW-Authenticate', `${used} error="insufficient_scope", scope="read"`);
    return;
  }
  const step = stepUpNeeded(token.extra ?? {});
  if (step) return challenge(ctx, used, 'insufficient_user_authentication', step.description, step.params);
  ctx.type = 'application/json; charset=utf-8';
  ctx.body = MEMO;
}

function stepUpNeeded({ acr, auth_time: authTime }) {
  if (config.step_up_acr && acr !== config.step_up_acr) {
    return { description: 'a stronger login is required', params: { acr_values: config.step_up_acr } };
  }
  const maxAge = config.step_up_max_age;
  if (maxAge != null && !(authTime && Date.now() / 1000 - authTime <= maxAge)) {
    return { description: 'a more recent login is required', params: { max_age: String(maxAge) } };
  }
  return null;
}

function resourceMetadataUrl(origin) {
  return `${origin}/.well-known/oauth-protected-resource/api/memos/`;
}

// -- the scripted person's login: devInteractions' form, plus the acr asked for (RFC 9470 step-up) ---------
async function login(ctx, provider) {
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  const asked = String(details.params.acr_values ?? '').split(' ').filter(Boolean);
  const acr = asked.find((value) => value === config.step_up_acr) ?? 'urn:fetch-memos:password';
  await provider.interactionFinished(ctx.req, ctx.res, {
    login: { accountId: ctx.state.form.login || 'demo', acr, amr: ['pwd'] },
  }, { mergeWithLastSubmission: false });
}

// -- test-only endpoints -------------------------------------------------------------------------------------
function admin(ctx) {
  const name = ctx.path.slice('/__test__/'.length);
  const entries = [...store].map(([key, entry]) => ({ model: key.split(':')[0], key, entry }));
  ctx.type = 'application/json';
  if (name === 'age_tokens' && ctx.method === 'POST') {
    const seconds = Number(ctx.query.seconds ?? 0);
    let aged = 0;
    for (const { model, entry } of entries) {
      if (model !== 'AccessToken') continue;
      entry.payload.iat -= seconds;
      entry.payload.exp -= seconds;
      entry.expiresAt -= seconds * 1000;
      aged += 1;
    }
    ctx.body = { aged, seconds };
  } else if (name === 'expire_requests' && ctx.method === 'POST') {
    // what 60 s would do to every pushed authorization request (RFC 9126), without waiting for them
    const pushed = entries.filter(({ model }) => model === 'PushedAuthorizationRequest');
    for (const { entry } of pushed) entry.expiresAt = 0;
    ctx.body = { expired: pushed.length };
  } else if (name === 'api_unavailable' && ctx.method === 'POST') {
    apiUnavailable = Number(ctx.query.count ?? 1);
    ctx.body = { count: apiUnavailable };
  } else if (name === 'reset' && ctx.method === 'POST') {
    const gone = entries.filter(({ model }) => model !== 'Client');
    for (const { key } of gone) store.delete(key);
    ctx.body = { deleted: gone.length };
  } else if (name === 'tokens' && ctx.method === 'GET') {
    ctx.body = {
      tokens: entries.filter(({ model }) => ['AccessToken', 'RefreshToken', 'AuthorizationCode', 'DeviceCode'].includes(model))
        .map(({ model, entry: { payload: p } }) => ({
          kind: model, client_id: p.clientId, scope: p.scope, exp: p.exp, iat: p.iat, grant_id: p.grantId,
          consumed: !!p.consumed, dpop_bound: !!p.jkt, jkt: p.jkt, acr: p.acr ?? p.extra?.acr,
        })),
    };
  } else if (name === 'secrets' && ctx.method === 'GET') {
    const secrets = [config.initial_access_token];
    for (const client of config.clients ?? []) secrets.push(client.client_secret);
    for (const { model, key, entry: { payload: p } } of entries) {
      if (model === 'Client') secrets.push(p.client_secret, p.registration_access_token);
      else if (['AccessToken', 'RefreshToken', 'AuthorizationCode', 'DeviceCode', 'RegistrationAccessToken',
        'InitialAccessToken', 'PushedAuthorizationRequest'].includes(model)) secrets.push(key.slice(model.length + 1));
      if (p.userCode) secrets.push(p.userCode);
    }
    ctx.body = { secrets: secrets.filter(Boolean) };
  } else {
    ctx.status = 404;
    ctx.body = { error: 'no such test endpoint' };
  }
}

// -- the access log ---------------------------------------------------------------------------------------
const SECRET_PARAMS = new Set([
  'code', 'code_verifier', 'code_challenge', 'client_secret', 'client_assertion', 'refresh_token', 'access_token',
  'token', 'device_code', 'user_code', 'password', 'login', 'request_uri', 'request', 'id_token_hint', 'nonce',
  'registration_access_token', 'jwks', 'xsrf',
]);
const LOGGED_PARAMS = new Set([
  'scope', 'resource', 'prompt', 'token_type_hint', 'iss', 'client_id', 'response_type', 'redirect_uri', 'state',
  'code_challenge_method', 'error', 'grant_type', 'client_assertion_type', 'acr_values', 'max_age', 'dpop_jkt',
  'client_name', 'application_type', 'token_endpoint_auth_method', 'grant_types', 'response_types', 'redirect_uris',
  'dpop_bound_access_tokens',
]);
const KINDS = [
  [/^\/auth(\/|$)/, 'authorization'], [/^\/request$/, 'par'], [/^\/token$/, 'token'],
  [/^\/token\/revocation$/, 'revocation'], [/^\/token\/introspection$/, 'introspection'],
  [/^\/device\/auth$/, 'device_authorization'], [/^\/device(\/|$)/, 'device'], [/^\/interaction\//, 'interaction'],
  [/^\/reg(\/|$)/, 'registration'], [/^\/\.well-known\/oauth-protected-resource/, 'resource_metadata'],
  [/^\/\.well-known\//, 'metadata'], [/^\/jwks$/, 'jwks'], [/^\/me$/, 'userinfo'], [/^\/api\//, 'api'],
  [/^\/__test__\//, 'admin'],
];
const CLIENT_AUTH_KINDS = new Set(['par', 'token', 'revocation', 'introspection', 'device_authorization']);

function named(params) {
  const shown = {};
  const has = [];
  for (const [name, value] of Object.entries(params)) {
    if (SECRET_PARAMS.has(name)) has.push(name);
    else if (LOGGED_PARAMS.has(name)) shown[name] = value;
  }
  return { shown, has };
}

function clientAuth(authorization, params) {
  if (/^basic\s/i.test(authorization)) return 'basic'; // the other servers' logs say basic / post / none
  if (params.client_assertion) {
    try {
      return decodeProtectedHeader(params.client_assertion).alg?.startsWith('HS') ? 'client_secret_jwt' : 'private_key_jwt';
    } catch {
      return 'malformed_assertion';
    }
  }
  return params.client_secret !== undefined ? 'post' : 'none';
}

// A proof's jti, htm, htu and key thumbprint (RFC 7638) are logged: none is a secret, and they show that no jti
// repeats and that every proof of a grant is made with one key.
function thumbprint(jwk) {
  if (!jwk || jwk.kty !== 'EC') return null;
  const members = JSON.stringify({ crv: jwk.crv, kty: jwk.kty, x: jwk.x, y: jwk.y });
  return crypto.createHash('sha256').update(members).digest('base64url');
}

function proofFacts(proof) {
  const facts = { dpop: !!proof, dpop_nonce: false, dpop_ath: false, dpop_malformed: false,
    dpop_jti: null, dpop_htm: null, dpop_htu: null, dpop_jkt: null };
  if (!proof) return facts;
  try {
    const claims = decodeJwt(proof);
    const header = decodeProtectedHeader(proof);
    return { ...facts, dpop_nonce: typeof claims.nonce === 'string', dpop_ath: typeof claims.ath === 'string',
      dpop_jti: claims.jti ?? null, dpop_htm: claims.htm ?? null, dpop_htu: claims.htu ?? null,
      dpop_jkt: thumbprint(header.jwk) };
  } catch {
    return { ...facts, dpop_malformed: true };
  }
}

function answerFacts(ctx) {
  const location = ctx.response.get('location');
  if (location) {
    const url = new URL(location, ctx.state.issuer);
    const keep = Object.fromEntries([...url.searchParams].filter(([k]) => ['iss', 'error', 'state'].includes(k)));
    return { location: `${url.origin}${url.pathname}`, ...keep, keys: [...url.searchParams.keys()].sort() };
  }
  let body = ctx.body;
  if (typeof body === 'string' && ctx.response.is('json')) {
    try { body = JSON.parse(body); } catch { body = undefined; }
  }
  if (!body || typeof body !== 'object' || Buffer.isBuffer(body) || typeof body.pipe === 'function') return {};
  const keep = ['error', 'error_description', 'scope', 'token_type', 'expires_in', 'interval', 'token_endpoint_auth_method'];
  return { ...Object.fromEntries(keep.filter((k) => k in body).map((k) => [k, body[k]])), keys: Object.keys(body).sort() };
}

async function readBody(ctx) {
  if (!ctx.is('application/x-www-form-urlencoded', 'application/json')) return { raw: undefined, form: {} };
  const chunks = [];
  for await (const chunk of ctx.req) chunks.push(chunk);
  const raw = Buffer.concat(chunks).toString('utf8');
  let form = {};
  try {
    form = ctx.is('application/json') ? JSON.parse(raw || '{}') : Object.fromEntries(new URLSearchParams(raw));
  } catch { /* the provider reports the bad body; the log shows no parameters */ }
  return { raw, form };
}

function logLine(ctx, started, form) {
  const kind = KINDS.find(([pattern]) => pattern.test(ctx.path))?.[1] ?? 'other';
  const query = Object.fromEntries(new URLSearchParams(ctx.querystring));
  const params = { ...query, ...(form && typeof form === 'object' ? form : {}) };
  const { shown, has } = named(params);
  const authorization = ctx.get('authorization');
  const answer = answerFacts(ctx);
  const line = {
    t: Date.now() / 1000,
    t_start: started,
    method: ctx.method,
    path: ctx.path,
    kind,
    status: ctx.status,
    remote_port: ctx.req.socket.remotePort,
    grant_type: kind === 'token' ? params.grant_type ?? null : null,
    auth: authorization ? authorization.split(/\s+/)[0].toLowerCase() : null,
    client_auth: CLIENT_AUTH_KINDS.has(kind) ? clientAuth(authorization, params) : null,
    body_keys: Object.keys(form ?? {}).sort(),
    query_keys: Object.keys(query).sort(),
    params: shown,
    has: has.sort(),
    ...proofFacts(ctx.get('dpop')),
    dpop_nonce_sent: !!ctx.response.get('dpop-nonce'),
    www_authenticate: ctx.response.get('www-authenticate') || null,
    error: answer.error ?? null,
    response: answer,
  };
  fs.appendFileSync(ACCESS_LOG, `${JSON.stringify(line)}\n`);
}

// -- start ----------------------------------------------------------------------------------------------
let handler = (req, res) => { res.statusCode = 503; res.end(); };
const server = http.createServer((req, res) => handler(req, res));
// Node's default (5 s) closes an idle keep-alive connection just as a client polling every 5-6 s reuses it
// (SERVER-FACTS); keep_alive_timeout lets a test choose, the default stays Node's own.
if (config.keep_alive_timeout != null) server.keepAliveTimeout = config.keep_alive_timeout * 1000;
server.listen(config.port ?? 0, '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, providerConfig(issuer));
  provider.use(async (ctx, next) => {
    const started = Date.now() / 1000;
    const { raw, form } = await readBody(ctx);
    ctx.state.form = form;
    ctx.state.issuer = issuer;
    ctx.state.apiUrl = `${issuer}/api/memos/`;
    if (raw !== undefined) ctx.req.body = raw; // the provider reads the body from here once we consumed it
    try {
      if (ctx.path === '/api/memos/' && ctx.method === 'GET') await memos(ctx, provider);
      else if (ctx.path === '/.well-known/oauth-protected-resource/api/memos/' && config.resource_metadata) {
        ctx.type = 'application/json';
        ctx.body = {
          resource: config.resource_metadata_resource ?? ctx.state.apiUrl,
          authorization_servers: config.resource_metadata_servers ?? [issuer],
          scopes_supported: ['read'],
          bearer_methods_supported: ['header'],
          dpop_signing_alg_values_supported: DPOP_ALGS,
          ...(config.api_requires_dpop ? { dpop_bound_access_tokens_required: true } : {}),
        };
      } else if (ctx.path.startsWith('/__test__/')) admin(ctx);
      else if (/^\/interaction\/[^/]+$/.test(ctx.path) && ctx.method === 'POST' && form.prompt === 'login') {
        await login(ctx, provider);
      } else await next();
    } finally {
      try {
        logLine(ctx, started, form);
      } catch (err) {
        console.error('access log:', err); // a broken log line must not turn the answer into a 500
      }
    }
  });
  handler = provider.callback();
  process.stdout.write(`READY ${issuer}\n`);
});

for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => { server.close(); process.exit(0); });
