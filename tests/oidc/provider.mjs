// A real OpenID provider (panva/oidc-provider) on 127.0.0.1 for fhirgate's tests.
//   PORT=...  GW_JWKS=/path/to/public-jwks.json  node provider.mjs
// Clients:
//   bars-sender / bars-reader / bars-short : BaRS senders using client credentials
//     (bars-short's tokens live 2 s, to test expiry);
//   fhirgate-gw     : the gateway, introspecting with client_secret_basic;
//   fhirgate-gw-jwt : the gateway, introspecting with private_key_jwt (GW_JWKS).
// A token requested with `resource=<any URL>` is an RFC 9068 JWT access token (typ at+jwt)
// for that audience, signed with the provider's development key; without, it is opaque.
// GET /test/introspections returns how many introspection requests it has served.
// Development and test use only: secrets here are fixed test values.
import fs from 'node:fs';
import Provider from 'oidc-provider';

const port = Number(process.env.PORT);
const issuer = `http://127.0.0.1:${port}`;
const readJwks = (v) => (process.env[v] ? JSON.parse(fs.readFileSync(process.env[v], 'utf8')) : { keys: [] });
const gwJwks = readJwks('GW_JWKS');
const senderJwks = readJwks('SENDER_JWKS');

const sender = (id, secret, scope) => ({
  client_id: id,
  client_secret: secret,
  grant_types: ['client_credentials'],
  redirect_uris: [],
  response_types: [],
  token_endpoint_auth_method: 'client_secret_basic',
  scope,
});

const provider = new Provider(issuer, {
  clients: [
    sender('bars-sender', 'sender-secret', 'system/*.* system/Patient.read'),
    sender('bars-reader', 'reader-secret', 'system/Patient.read'),
    sender('bars-short', 'short-secret', 'system/*.*'),
    // A BaRS sender authenticating with a signed JWT client assertion (fhirgate client).
    { client_id: 'bars-sender-jwt', grant_types: ['client_credentials'], redirect_uris: [], response_types: [],
      token_endpoint_auth_method: 'private_key_jwt', token_endpoint_auth_signing_alg: 'ES256', jwks: senderJwks,
      scope: 'system/*.*' },
    { client_id: 'fhirgate-gw', client_secret: 'gw-secret', grant_types: [], redirect_uris: [], response_types: [],
      token_endpoint_auth_method: 'client_secret_basic' },
    { client_id: 'fhirgate-gw-jwt', grant_types: [], redirect_uris: [], response_types: [],
      token_endpoint_auth_method: 'private_key_jwt', token_endpoint_auth_signing_alg: 'ES256', jwks: gwJwks },
  ],
  scopes: ['openid', 'system/*.*', 'system/Patient.read'],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      getResourceServerInfo: (ctx, resourceIndicator) => ({
        scope: 'system/*.* system/Patient.read',
        audience: resourceIndicator,
        accessTokenFormat: 'jwt',
      }),
    },
  },
  ttl: {
    ClientCredentials: (ctx, token, client) => (client && client.clientId === 'bars-short' ? 2 : 600),
  },
  enabledJWA: { clientAuthSigningAlgValues: ['ES256', 'RS256', 'PS256'] },
});

let introspections = 0;
provider.use(async (ctx, next) => {
  if (ctx.path === '/test/introspections') {
    ctx.body = { count: introspections };
    return;
  }
  if (ctx.path === '/token/introspection') {
    introspections += 1;
  }
  await next();
});

provider.listen(port, '127.0.0.1', () => {
  console.log(`oidc-provider listening on ${issuer}`);
});
