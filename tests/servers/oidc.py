"""Start/stop the oidc-provider test server (oidc_app.mjs) and play its person, from Python tests.

The third test server: oidc-provider (npm, pinned in package.json, installed by `npm ci` in this folder)
has what Doorkeeper and django-oauth-toolkit lack: PAR, DPoP with nonces, JWT client authentication,
dynamic registration, and an API that publishes RFC 9728 metadata and can demand a step-up (RFC 9470).
Its state is in memory (a restart forgets every token and registration); the access log and the config
the wrapper writes are in ``state_dir``.

Also here, because tests of the server and of the client both need them without the ``cryptography``
package: a pure-Python P-256 key (ES256 signatures, JWK, thumbprint, PEM), DPoP proofs and client
assertions. Slow next to a C library (a few ms per signature), which a test never notices.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import KW_ONLY, dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import requests

from servers.doorkeeper import pkce_pair  # one RFC 7636 pair for every server's tests

if TYPE_CHECKING:  # typing.Self is 3.11+; annotations are lazy, so 3.10 never evaluates it
    from typing import Self

HERE = Path(__file__).parent
APP = HERE / "oidc_app.mjs"
LOOPBACK_REDIRECT_URI = "http://127.0.0.1/callback"  # any port matches for native clients (RFC 8252 §7.3)
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEFAULT_CLIENT_ID = "fetch-memos-test"
DEFAULT_CLIENT_SECRET = "fetch-memos-test-secret"
DEFAULT_PUBLIC_CLIENT_ID = "fetch-memos-public"
PRIVATE_KEY_JWT_CLIENT_ID = "fetch-memos-pkjwt"
CLIENT_SECRET_JWT_CLIENT_ID = "fetch-memos-csjwt"
CLIENT_SECRET_JWT_SECRET = "fetch-memos-csjwt-secret-of-at-least-32-bytes"  # HS256 wants >= 256 bits
DEFAULT_LOGIN = "demo"
DEFAULT_PASSWORD = "demo-password"  # devInteractions accepts any password
PASSWORD_ACR = "urn:fetch-memos:password"  # the acr of a login that asked for no other
MFA_ACR = "urn:fetch-memos:mfa"
MEMO_MESSAGE = "ふじ"


@functools.cache
def node_stack_available() -> tuple[bool, str]:
    """Whether node runs and oidc-provider is installed here (``npm ci`` in tests/servers), with why not."""
    node = shutil.which("node")
    if node is None:
        return False, "node is not installed (tests/setup.sh installs nodejs and npm)"
    package = HERE / "node_modules" / "oidc-provider" / "package.json"
    if not package.is_file():
        return False, f"oidc-provider is not installed: run `npm ci` in {HERE}"
    version = json.loads(package.read_text(encoding="utf-8"))["version"]
    pinned = json.loads((HERE / "package.json").read_text(encoding="utf-8"))["dependencies"]["oidc-provider"]
    if version != pinned:
        return False, f"oidc-provider {version} is installed, package.json pins {pinned}: run `npm ci` in {HERE}"
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"node does not run: {exc}"
    node_version = out.stdout.strip()
    major, minor = (int(n) for n in node_version.lstrip("v").split(".")[:2])
    if (major, minor) < (20, 18):
        # oidc-provider 9 calls URL.parse (Node 20.18, 22.1) and crypto.hash (20.12): Debian 12's nodejs 18 fails.
        return False, f"node {node_version} is too old for oidc-provider {version}: it needs Node 20.18 or later"
    return True, f"oidc-provider {version} on node {node_version}"


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_bytes()[-limit:].decode("utf-8", "replace")
    except OSError:
        return ""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# -- P-256 in pure Python (FIPS 186-4 ECDSA over SEC 2's secp256r1) ------------------------------------------
_P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_A = _P - 3
_G = (0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
      0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5)


def _add(p: tuple[int, int] | None, q: tuple[int, int] | None) -> tuple[int, int] | None:
    if p is None:
        return q
    if q is None:
        return p
    if p[0] == q[0] and (p[1] + q[1]) % _P == 0:
        return None
    slope = (3 * p[0] * p[0] + _A) * pow(2 * p[1], -1, _P) if p == q else (q[1] - p[1]) * pow(q[0] - p[0], -1, _P)
    x = (slope * slope - p[0] - q[0]) % _P
    return x, (slope * (p[0] - x) - p[1]) % _P


def _mul(k: int, point: tuple[int, int]) -> tuple[int, int]:
    result = None
    addend: tuple[int, int] | None = point
    while k:
        if k & 1:
            result = _add(result, addend)
        addend = _add(addend, addend)
        k >>= 1
    assert result is not None
    return result


@dataclass(frozen=True)
class EcKey:
    """A P-256 key pair that signs ES256 JWS (RFC 7518 §3.4): for DPoP proofs and private_key_jwt."""

    d: int
    point: tuple[int, int] = field(repr=False)

    @classmethod
    def generate(cls) -> EcKey:
        d = secrets.randbelow(_N - 1) + 1
        return cls(d, _mul(d, _G))

    def public_jwk(self, kid: str | None = None) -> dict[str, str]:
        jwk = {"kty": "EC", "crv": "P-256", "x": b64url(self.point[0].to_bytes(32, "big")),
               "y": b64url(self.point[1].to_bytes(32, "big"))}
        return {**jwk, "kid": kid} if kid else jwk

    def thumbprint(self) -> str:
        """RFC 7638 JWK thumbprint (what a DPoP-bound token's cnf.jkt holds)."""
        jwk = self.public_jwk()
        canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"))
        return b64url(hashlib.sha256(canonical.encode()).digest())

    def sign(self, data: bytes) -> bytes:
        z = int.from_bytes(hashlib.sha256(data).digest(), "big")
        while True:
            k = secrets.randbelow(_N - 1) + 1
            r = _mul(k, _G)[0] % _N
            s = pow(k, -1, _N) * (z + r * self.d) % _N
            if r and s:
                return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def pem(self) -> str:
        """The private key as SEC 1 PEM (``EC PRIVATE KEY``), for a client that reads a key file."""
        x, y = (c.to_bytes(32, "big") for c in self.point)
        der = (bytes.fromhex("30770201010420") + self.d.to_bytes(32, "big")
               + bytes.fromhex("a00a06082a8648ce3d030107a14403420004") + x + y)
        body = base64.encodebytes(der).decode("ascii")
        return f"-----BEGIN EC PRIVATE KEY-----\n{body}-----END EC PRIVATE KEY-----\n"


def jws(header: dict[str, Any], claims: dict[str, Any], *, key: EcKey | None = None, secret: str | None = None) -> str:
    """A compact JWS: ES256 with ``key``, or HS256 with ``secret``."""
    header = {**header, "alg": "ES256" if key is not None else "HS256"}
    signing_input = ".".join(b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims))
    if key is not None:
        signature = key.sign(signing_input.encode())
    else:
        assert secret is not None
        signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def dpop_proof(key: EcKey, method: str, url: str, *, access_token: str | None = None, nonce: str | None = None,
               iat: int | None = None, jti: str | None = None) -> str:
    """An RFC 9449 §4.2 proof: typ dpop+jwt, the public JWK in the header, htu without query and fragment."""
    parts = urlsplit(url)
    claims: dict[str, Any] = {"jti": jti or secrets.token_urlsafe(16), "htm": method.upper(),
                              "htu": f"{parts.scheme}://{parts.netloc}{parts.path}",
                              "iat": int(time.time()) if iat is None else iat}
    if access_token is not None:
        claims["ath"] = b64url(hashlib.sha256(access_token.encode("ascii")).digest())
    if nonce is not None:
        claims["nonce"] = nonce
    return jws({"typ": "dpop+jwt", "jwk": key.public_jwk()}, claims, key=key)


def client_assertion(client_id: str, aud: str | list[str], *, key: EcKey | None = None, secret: str | None = None,
                     lifetime: int = 120) -> str:
    """An RFC 7523 §2.2 client assertion (private_key_jwt with ``key``, client_secret_jwt with ``secret``)."""
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": aud, "jti": secrets.token_urlsafe(16), "iat": now,
              "exp": now + lifetime}
    return jws({"typ": "JWT"}, claims, key=key, secret=secret)


# -- the server ------------------------------------------------------------------------------------------------
class ServerError(RuntimeError):
    """The test server failed to start or to answer a test-only request."""


@dataclass(eq=False)
class OidcServer:
    """oidc_app.mjs on 127.0.0.1 (a free port unless ``port``), issuer ``http://127.0.0.1:PORT``.

    Every setting is a keyword argument (a dataclass field) and stays readable as an attribute.
    Clients (all ``application_type: native``, redirect ``http://127.0.0.1/callback`` with any port plus
    ``redirect_uris``, grant types authorization_code, refresh_token and device_code):
    the confidential ``client_id``/``client_secret`` (authenticating with ``client_auth``: client_secret_basic
    or client_secret_post), the public ``public_client_id`` (none), and when asked the private_key_jwt client
    ``PRIVATE_KEY_JWT_CLIENT_ID`` (``private_key_jwk``: its public JWK) and the client_secret_jwt client
    ``CLIENT_SECRET_JWT_CLIENT_ID`` (``client_secret_jwt=True``; secret ``CLIENT_SECRET_JWT_SECRET``);
    ``more_client_jwks``: further public keys of the private_key_jwt client (an RSA key beside the EC one).

    Switches, all off by default (oidc_app.mjs's header says how each is made):
    ``require_par`` (RFC 9126 §5), ``dpop_required`` (every client's ``dpop_bound_access_tokens``),
    ``token_nonce`` (DPoP nonces at the token and PAR endpoints), ``api_nonce_ttl`` (> 0: the API's own
    rotating DPoP nonces), ``dpop_off`` (DPoP turned off: proofs ignored, every token Bearer),
    ``resource_metadata`` (RFC 9728 document and challenge parameter; ``challenge_metadata_url`` /
    ``resource_metadata_resource`` make the challenge name another URL / the document another resource,
    ``resource_metadata_servers`` the document name other authorization servers),
    ``api_requires_dpop`` (the API refuses unbound tokens; its RFC 9728 document says
    dpop_bound_access_tokens_required), ``registration`` ("open" or "token", with ``initial_access_token``),
    ``step_up_acr`` / ``step_up_max_age`` (RFC 9470 challenge from the API). ``keep_alive_timeout``: seconds Node
    keeps an idle connection (None: Node's 5 s, which a client polling every 5-6 s can meet as a reset connection).
    """

    state_dir: Path
    _: KW_ONLY
    access_token_ttl: int = 3600
    client_id: str = DEFAULT_CLIENT_ID
    client_secret: str = DEFAULT_CLIENT_SECRET
    client_auth: str = "client_secret_basic"
    public_client_id: str = DEFAULT_PUBLIC_CLIENT_ID
    redirect_uris: tuple[str, ...] = ()  # besides LOOPBACK_REDIRECT_URI
    port: int | None = None
    require_par: bool = False
    dpop_required: bool = False
    token_nonce: bool = False
    api_nonce_ttl: int = 0
    dpop_off: bool = False
    private_key_jwk: dict[str, str] | None = None
    more_client_jwks: tuple[dict[str, str], ...] = ()  # more public keys of that client (an RSA one, say)
    client_secret_jwt: bool = False
    resource_metadata: bool = False
    challenge_metadata_url: str | None = None  # the challenge names this instead (another origin: a mix-up test)
    resource_metadata_resource: str | None = None  # the document's resource instead of the API's URL (§3.3 test)
    resource_metadata_servers: tuple[str, ...] | None = None  # its authorization_servers instead of the issuer
    api_requires_dpop: bool = False  # the API takes DPoP-bound tokens only, and its resource metadata says so
    registration: str = "off"
    initial_access_token: str | None = None  # "token" registration without one: a random one
    step_up_acr: str | None = None
    step_up_max_age: int | None = None
    keep_alive_timeout: float | None = None
    startup_timeout: float = 15.0
    start_attempts: int = 3
    boot_seconds: float | None = field(default=None, init=False)
    start_failures: int = field(default=0, init=False)  # starts that hung or died and were retried
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.registration not in ("off", "open", "token"):
            raise ValueError(f"registration must be off, open or token, not {self.registration!r}")
        if self.client_auth not in ("client_secret_basic", "client_secret_post"):
            raise ValueError(f"client_auth must be client_secret_basic or client_secret_post, not {self.client_auth!r}")
        self.state_dir = Path(self.state_dir)
        if self.registration == "token" and not self.initial_access_token:
            self.initial_access_token = secrets.token_urlsafe(24)

    # -- configuration -----------------------------------------------------------------------------------
    def clients(self) -> list[dict[str, Any]]:
        """The clients oidc-provider is configured with (its client metadata, RFC 7591 §2 names)."""
        common = {"application_type": "native", "redirect_uris": [LOOPBACK_REDIRECT_URI, *self.redirect_uris],
                  "grant_types": ["authorization_code", "refresh_token", DEVICE_GRANT], "response_types": ["code"],
                  "dpop_bound_access_tokens": self.dpop_required}
        clients = [
            {**common, "client_id": self.client_id, "client_secret": self.client_secret,
             "token_endpoint_auth_method": self.client_auth},
            {**common, "client_id": self.public_client_id, "token_endpoint_auth_method": "none"},
        ]
        if self.private_key_jwk is not None:
            clients.append({**common, "client_id": PRIVATE_KEY_JWT_CLIENT_ID,
                            "jwks": {"keys": [self.private_key_jwk, *self.more_client_jwks]},
                            "token_endpoint_auth_method": "private_key_jwt"})
        if self.client_secret_jwt:
            clients.append({**common, "client_id": CLIENT_SECRET_JWT_CLIENT_ID,
                            "client_secret": CLIENT_SECRET_JWT_SECRET,
                            "token_endpoint_auth_method": "client_secret_jwt"})
        return clients

    def config(self) -> dict[str, Any]:
        """What oidc_app.mjs reads (written to ``state_dir/config.json``)."""
        return {
            "state_dir": str(self.state_dir),
            "port": self.port or 0,
            "keep_alive_timeout": self.keep_alive_timeout,
            "access_token_ttl": self.access_token_ttl,
            "clients": self.clients(),
            "require_par": self.require_par,
            "token_nonce": self.token_nonce,
            "api_nonce_ttl": self.api_nonce_ttl,
            "dpop_off": self.dpop_off,
            "resource_metadata": self.resource_metadata,
            "challenge_metadata_url": self.challenge_metadata_url,
            "resource_metadata_resource": self.resource_metadata_resource,
            "resource_metadata_servers": self.resource_metadata_servers,
            "api_requires_dpop": self.api_requires_dpop,
            "registration": self.registration,
            "initial_access_token": self.initial_access_token,
            "step_up_acr": self.step_up_acr,
            "step_up_max_age": self.step_up_max_age,
        }

    # -- lifecycle ---------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        if self.port is None:
            raise ServerError("server has no port yet: call start()")
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start the server and wait for READY; a start that hangs (SERVER-FACTS: Node 20) is killed and retried."""
        if self.running:
            return self
        ok, why = node_stack_available()
        if not ok:
            raise ServerError(why)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        for attempt in range(1, self.start_attempts + 1):
            if self._start_once():
                self.boot_seconds = time.monotonic() - started
                return self
            self.start_failures += 1
            if attempt == self.start_attempts:
                raise ServerError(f"oidc-provider server not ready after {attempt} starts of "
                                  f"{self.startup_timeout:.0f} s; stderr:\n{_tail(self.state_dir / 'server.err')}")
        raise AssertionError("unreachable")

    def _start_once(self) -> bool:
        config_path = self.state_dir / "config.json"
        config_path.write_text(json.dumps(self.config(), indent=1), encoding="utf-8")
        out_path = self.state_dir / "server.out"
        with open(out_path, "wb") as out, open(self.state_dir / "server.err", "ab") as err:
            self._proc = subprocess.Popen(
                ["node", str(APP), str(config_path)], cwd=str(HERE), stdin=subprocess.DEVNULL, stdout=out,
                stderr=err, start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            for line in _tail(out_path, 1000).splitlines():
                if line.startswith("READY "):
                    self.port = int(line.split()[1].rsplit(":", 1)[1])
                    return True
            if self._proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        return False

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    def restart(self) -> Self:
        """Stop and start on the same port. The state is in memory: every token and registration is gone."""
        self.stop()
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- URLs --------------------------------------------------------------------------------------------
    @property
    def issuer(self) -> str:
        """The issuer identifier (RFC 8414 §2; the ``iss`` of every authorization response, RFC 9207)."""
        return self.base_url

    @property
    def metadata_url(self) -> str:
        return f"{self.base_url}/.well-known/oauth-authorization-server"

    @property
    def authorize_endpoint(self) -> str:
        return f"{self.base_url}/auth"

    @property
    def par_endpoint(self) -> str:
        return f"{self.base_url}/request"

    @property
    def token_endpoint(self) -> str:
        return f"{self.base_url}/token"

    @property
    def revoke_endpoint(self) -> str:
        return f"{self.base_url}/token/revocation"

    @property
    def introspect_endpoint(self) -> str:
        return f"{self.base_url}/token/introspection"

    @property
    def device_authorization_endpoint(self) -> str:
        return f"{self.base_url}/device/auth"

    @property
    def device_verification_url(self) -> str:
        return f"{self.base_url}/device"

    @property
    def registration_endpoint(self) -> str:
        return f"{self.base_url}/reg"

    @property
    def memos_url(self) -> str:
        """The protected API, and the one resource indicator (RFC 8707) the server issues tokens for."""
        return f"{self.base_url}/api/memos/"

    @property
    def resource_metadata_url(self) -> str:
        """RFC 9728 §3.1: the well-known path inserted before the API's path (served with resource_metadata)."""
        return f"{self.base_url}/.well-known/oauth-protected-resource/api/memos/"

    @property
    def access_log_path(self) -> Path:
        return self.state_dir / "access.log"

    # -- requests as a client makes them ---------------------------------------------------------------------
    def authorize_url(self, *, client_id: str | None = None, redirect_uri: str = LOOPBACK_REDIRECT_URI,
                      scope: str | None = "read", **params: str) -> str:
        """The authorization endpoint with these parameters (response_type code)."""
        query = {"response_type": "code", "client_id": client_id or self.client_id, "redirect_uri": redirect_uri,
                 **({"scope": scope} if scope is not None else {}), **params}
        return f"{self.authorize_endpoint}?{urlencode(query)}"

    def client_credentials(self, client_id: str | None = None, *, key: EcKey | None = None,
                           aud: str | list[str] | None = None) -> tuple[tuple[str, str] | None, dict[str, str]]:
        """(Basic auth, body fields) that authenticate ``client_id`` as it is registered here.

        ``key``: the private_key_jwt client's key (ignored for the others); ``aud``: the assertion's audience
        (default the issuer).
        """
        client_id = client_id or self.client_id
        if client_id == self.client_id:
            if self.client_auth == "client_secret_basic":
                return (client_id, self.client_secret), {}
            return None, {"client_id": client_id, "client_secret": self.client_secret}
        if client_id in (PRIVATE_KEY_JWT_CLIENT_ID, CLIENT_SECRET_JWT_CLIENT_ID):
            if client_id == PRIVATE_KEY_JWT_CLIENT_ID and key is None:
                raise ValueError("the private_key_jwt client needs its key")
            assertion = client_assertion(client_id, aud or self.issuer,
                                         key=key if client_id == PRIVATE_KEY_JWT_CLIENT_ID else None,
                                         secret=CLIENT_SECRET_JWT_SECRET if client_id == CLIENT_SECRET_JWT_CLIENT_ID
                                         else None)
            return None, {"client_id": client_id, "client_assertion_type": ASSERTION_TYPE,
                          "client_assertion": assertion}
        return None, {"client_id": client_id}

    def grant_token(self, person: Person, *, client_id: str | None = None, scope: str = "read",
                    redirect_uri: str = LOOPBACK_REDIRECT_URI, key: EcKey | None = None,
                    dpop_key: EcKey | None = None, **params: str) -> dict[str, Any]:
        """A real grant, obtained as a plain client would (PKCE; PAR when the server requires it; a DPoP proof
        with ``dpop_key``, retried once with the server's nonce). Shaped as requests-oauthlib keeps a token."""
        verifier, challenge = pkce_pair()
        client_id = client_id or self.client_id

        def new_assertion() -> dict[str, str]:
            return self.client_credentials(client_id, key=key)[1]

        query = {"code_challenge": challenge, "code_challenge_method": "S256", **params}
        url = self.authorize_url(client_id=client_id, scope=scope, redirect_uri=redirect_uri, **query)
        if self.require_par:
            auth, body = self.client_credentials(client_id, key=key)
            pushed = self.post_with_dpop(self.par_endpoint, dict(parse_qs(urlsplit(url).query)), auth=auth,
                                         extra=body, dpop_key=dpop_key, refresh_assertion=new_assertion)
            if pushed.status_code != 201:
                raise ServerError(f"PAR failed: {pushed.status_code} {pushed.text[:300]}")
            pushed_query = {"client_id": client_id, "request_uri": pushed.json()["request_uri"]}
            url = f"{self.authorize_endpoint}?{urlencode(pushed_query)}"
        redirect = person.authorize(url)
        code = parse_qs(urlsplit(redirect).query)["code"][0]
        auth, body = self.client_credentials(client_id, key=key)
        data = {"grant_type": "authorization_code", "code": code, "code_verifier": verifier,
                "redirect_uri": redirect_uri}
        response = self.post_with_dpop(self.token_endpoint, data, auth=auth, extra=body, dpop_key=dpop_key,
                                       refresh_assertion=new_assertion)
        if response.status_code != 200:
            raise ServerError(f"code exchange failed: {response.status_code} {response.text[:300]}")
        token = response.json()
        token["scope"] = token.get("scope", "").split()
        token["expires_at"] = time.time() + token["expires_in"]
        return token

    def post_with_dpop(self, url: str, data: dict[str, Any], *, auth: tuple[str, str] | None = None,
                       extra: dict[str, str] | None = None, dpop_key: EcKey | None = None,
                       refresh_assertion: Any = None) -> requests.Response:
        """POST a form, with a DPoP proof when ``dpop_key``; after 400 use_dpop_nonce retry once with the nonce
        (a new proof, and a new client assertion from ``refresh_assertion()`` since its jti may not repeat)."""
        body = {**data, **(extra or {})}
        headers = {"DPoP": dpop_proof(dpop_key, "POST", url)} if dpop_key else {}
        response = requests.post(url, data=body, auth=auth, headers=headers, timeout=15)
        nonce = response.headers.get("DPoP-Nonce")
        if dpop_key and nonce and response.status_code == 400 and response.json().get("error") == "use_dpop_nonce":
            if refresh_assertion is not None:
                body.update(refresh_assertion())
            elif "client_assertion" in body:
                raise ServerError("a retried request needs a new client assertion: pass refresh_assertion")
            headers = {"DPoP": dpop_proof(dpop_key, "POST", url, nonce=nonce)}
            response = requests.post(url, data=body, auth=auth, headers=headers, timeout=15)
        return response

    # -- access log --------------------------------------------------------------------------------------------
    def _read_log_lines(self) -> list[str]:
        try:
            text = self.access_log_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return text.split("\n")[:-1]  # a line being written may lack its newline yet

    def log_mark(self) -> int:
        """A position in the access log; pass it as ``since`` to see only later requests."""
        return len(self._read_log_lines())

    def access_log(self, since: int = 0, *, include_admin: bool = False) -> list[dict[str, Any]]:
        """Parsed access-log records after ``since``, without /__test__/ requests unless asked.

        Each record: t, t_start, method, path, kind (authorization, par, token, revocation, introspection,
        device_authorization, device, interaction, registration, metadata, resource_metadata, api, ...),
        status, remote_port, grant_type, auth (the Authorization scheme, lower case), client_auth
        (basic / post / none, as the other servers' logs say, or private_key_jwt / client_secret_jwt, at the
        endpoints that authenticate clients), body_keys, query_keys, params (non-secret values), has (secret parameter
        names), dpop (a proof was sent), dpop_nonce / dpop_ath (the proof carried them), dpop_jti / dpop_htm /
        dpop_htu / dpop_jkt (the proof's jti, htm, htu and its key's RFC 7638 thumbprint), dpop_nonce_sent (the
        answer carried DPoP-Nonce), www_authenticate, error, response (non-secret parts of the answer).
        """
        records = [json.loads(line) for line in self._read_log_lines()[since:] if line.strip()]
        return records if include_admin else [r for r in records if r["kind"] != "admin"]

    # -- test-only endpoints -------------------------------------------------------------------------------
    def _admin(self, method: str, name: str, **params: Any) -> Any:
        response = requests.request(method, f"{self.base_url}/__test__/{name}", params=params, timeout=10)
        if response.status_code != 200:
            raise ServerError(f"{method} /__test__/{name} answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def age_tokens(self, seconds: int) -> int:
        """Pretend ``seconds`` passed for every access token; return how many were aged."""
        return int(self._admin("POST", "age_tokens", seconds=int(seconds))["aged"])

    def api_unavailable(self, count: int = 1) -> None:
        """The API answers 503 to its next ``count`` requests after checking them (a DPoP proof's jti is then seen)."""
        self._admin("POST", "api_unavailable", count=int(count))

    def expire_pushed_requests(self) -> int:
        """Let every pushed authorization request (RFC 9126) expire now, as its 60 s would; return how many."""
        return int(self._admin("POST", "expire_requests")["expired"])

    def reset(self) -> int:
        """Forget every grant, token, session and registration-free state (configured clients stay)."""
        return int(self._admin("POST", "reset")["deleted"])

    def tokens(self) -> list[dict[str, Any]]:
        """Summaries of stored tokens and codes (kind, client_id, scope, exp, dpop_bound, jkt, acr; no values)."""
        return self._admin("GET", "tokens")["tokens"]

    def live_tokens(self) -> int:
        """How many access and refresh tokens the server would still honour (none after a logout)."""
        now = time.time()
        return sum(1 for t in self.tokens() if t["kind"] in ("AccessToken", "RefreshToken")
                   and not t["consumed"] and t["exp"] > now)

    def issued_secrets(self) -> list[str]:
        """Every secret the server holds now (client secrets, tokens, codes, user codes, registration tokens),
        so a test can check none was printed. reset() forgets the tokens: take them before it."""
        return self._admin("GET", "secrets")["secrets"]

    # -- the device flow, as a device starts it --------------------------------------------------------------
    def start_device_flow(self, client_id: str | None = None, *, scope: str = "read", **extra: str) -> dict:
        """RFC 8628 §3.1: the device asks for a device_code and a user_code (client authenticated as registered)."""
        auth, body = self.client_credentials(client_id)
        response = requests.post(self.device_authorization_endpoint, data={"scope": scope, **body, **extra},
                                 auth=auth, timeout=15)
        if response.status_code != 200:
            raise ServerError(f"device authorization failed: {response.status_code} {response.text[:300]}")
        return response.json()


# -- the person at the browser ---------------------------------------------------------------------------------
class AuthorizationError(AssertionError):
    """The authorization did not end at the client's redirect URI (an error page, an unexpected page).

    An AssertionError, as the DOT helper raises: the person could not do what the test expected.
    """


@dataclass
class _Form:
    action: str
    method: str
    ident: str | None
    fields: dict[str, str] = field(default_factory=dict)


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[_Form] = []
        self.text: list[str] = []
        self._hidden = 0  # inside <style> or <script>, whose text no person reads

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag in ("style", "script"):
            self._hidden += 1
        elif tag == "form":
            self.forms.append(_Form(a.get("action", ""), a.get("method", "get").lower(), a.get("id")))
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1].fields[a["name"]] = a.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script"):
            self._hidden -= 1

    def handle_data(self, data: str) -> None:
        if data.strip() and not self._hidden:
            self.text.append(data.strip())


class Person:
    """A person with a browser (one cookie jar) on devInteractions' pages: logs in with any name, consents.

    Cookies are path-scoped (/interaction/<uid>, /auth/<uid>): one Person per person, reused across
    authorizations to keep the login session.
    """

    MAX_STEPS = 12

    def __init__(self, login: str = DEFAULT_LOGIN, password: str = DEFAULT_PASSWORD, *, timeout: float = 15.0):
        self.login = login
        self.password = password
        self.timeout = timeout
        self.session = requests.Session()
        self.pages: list[str] = []  # what the last walk met: login, consent, user_code, confirm, done
        self._user_code: str | None = None
        self._last_text: list[str] = []

    def close(self) -> None:
        self.session.close()

    def authorize(self, url: str, *, approve: bool = True) -> str:
        """Open the authorization URL, log in and consent (or abort); return the redirect to the client.

        The redirect is returned unfollowed (nothing need listen there); it carries code or error, state, iss.
        """
        result = self._walk(self.session.get(url, allow_redirects=False, timeout=self.timeout), approve)
        if result is None:
            raise AuthorizationError(f"authorization ended on a page, not a redirect: {self.pages}")
        return result

    def approve_device(self, verification_url: str, user_code: str | None = None, *, approve: bool = True) -> str:
        """Open the verification page (verification_uri, or verification_uri_complete with the code filled in),
        enter ``user_code``, confirm (or abort), log in, consent; return the text of the last page."""
        self._user_code = user_code
        self._walk(self.session.get(verification_url, allow_redirects=False, timeout=self.timeout), approve)
        return " ".join(self._last_text)

    def _walk(self, response: requests.Response, approve: bool) -> str | None:
        origin = "{0.scheme}://{0.netloc}".format(urlsplit(response.url))
        self.pages = []
        for _ in range(self.MAX_STEPS):
            if response.is_redirect:
                location = urljoin(response.url, response.headers["Location"])
                if not location.startswith(origin + "/"):
                    return location
                response = self.session.get(location, allow_redirects=False, timeout=self.timeout)
                continue
            page = _Forms()
            page.feed(response.text)
            self._last_text = page.text
            form, values = self._choose(page.forms, approve)
            if form is None:
                if response.status_code >= 400:
                    text = " ".join(page.text)[:500]
                    raise AuthorizationError(f"{response.url} answered {response.status_code}: {text}")
                self.pages.append("done")
                return None
            target = urljoin(response.url, form.action or response.url)
            if form.method == "get":
                response = self.session.get(target, allow_redirects=False, timeout=self.timeout)
            else:
                response = self.session.post(target, data={**form.fields, **values}, allow_redirects=False,
                                             timeout=self.timeout)
        raise AuthorizationError(f"gave up after {self.MAX_STEPS} pages: {self.pages}")

    def _choose(self, forms: list[_Form], approve: bool) -> tuple[_Form | None, dict[str, str]]:
        for form in forms:
            if "password" in form.fields:
                self.pages.append("login")
                return form, {"login": self.login, "password": self.password}
            if form.fields.get("prompt") == "consent":
                self.pages.append("consent")
                if not approve:
                    abort = form.action.rstrip("/") + "/abort"
                    return _Form(abort, "get", None), {}
                return form, {}
            if "confirm" in form.fields:
                self.pages.append("confirm")
                return form, ({} if approve else {"abort": "yes"})
            if "user_code" in form.fields:  # the input form, or the page that posts a prefilled code itself
                if "user_code" in self.pages and form.ident == "op.deviceInputForm":
                    return None, {}  # shown again: the code was refused or the person aborted
                self.pages.append("user_code")
                return form, {"user_code": self._user_code or form.fields.get("user_code", "")}
        return None, {}


__all__ = [
    "ASSERTION_TYPE", "CLIENT_SECRET_JWT_CLIENT_ID", "CLIENT_SECRET_JWT_SECRET", "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET", "DEFAULT_PUBLIC_CLIENT_ID", "DEVICE_GRANT", "LOOPBACK_REDIRECT_URI", "MEMO_MESSAGE",
    "MFA_ACR", "PASSWORD_ACR", "PRIVATE_KEY_JWT_CLIENT_ID", "AuthorizationError", "EcKey", "OidcServer", "Person",
    "ServerError", "client_assertion", "dpop_proof", "jws", "node_stack_available", "pkce_pair",
]
