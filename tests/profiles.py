"""Server profiles for the conformance suite (tests/test_conformance.py): each test server, with its switches,
and what it does, as features that scenarios can ask for.

Adding a profile is adding one entry to PROFILES:

    Profile(
        name="dot-strict",                    # the test id: test_first_run[dot-strict-loopback]
        marker="dot",                         # the server's marker (doorkeeper / dot / browser, see conftest)
        features=frozenset({"loopback", "rotation_immediate", "dead_token_403", "metadata", "iss", ...}),
        start=dot(strict=True),               # start(folder, **switches): the server with the profile's switches
        adapter=DotTarget,                    # or DoorkeeperTarget, or a new Target subclass for a new server
        require=require_dot_stack,            # skips (fails under CI=true) when the server's stack is missing
        variants={"wrong_iss": {"iss": "wrong"}},  # feature -> switches of a server a scenario starts itself
    )

A scenario that needs a server the shared one cannot be (it sends a wrong iss, say) asks for the variant's
feature and starts it with profile.launch(folder, "wrong_iss"), then stops it.

Adding a feature: name it in FEATURES (one line: what a server with it does), give it to the profiles that
have it, and let a scenario ask for it with `@needs("feature")` (or `@needs(lacks=("feature",))`).

Adding a scenario: see the docstring of tests/test_conformance.py.

A Target (the adapter) gives every server the same shape for the scenarios: base_url, client_id, client_secret,
the endpoints (authorize_endpoint, token_endpoint, revoke_endpoint, memos_url), access_log(since)/log_mark(),
age_tokens(seconds), reset(), live_tokens(); client_env(mode) is the script's configuration for the server in a
redirect mode ("oob" or "loopback"), written as the README tells a user to (with metadata: OAUTH_ISSUER only; a
public client: no CLIENT_SECRET; with the feature resource: OAUTH_RESOURCE); person() is someone at a browser who
authorizes or denies an authorization URL the way the mode needs (oob: returns the code to paste; loopback:
the browser follows the redirect to the script's listener).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from servers.doorkeeper import AuthorizationDenied, BrowserPerson, DoorkeeperServer, require_oidc, require_ruby_stack
from servers.dot import DotServer, require_dot_stack
from servers.harness import AccessEntry, require
from servers.oidc import PRIVATE_KEY_JWT_CLIENT_ID, EcKey, OidcServer, node_stack_available
from servers.oidc import Person as OidcBrowser
from servers.tls import TestPKI, trust_in_this_process

LOOPBACK = "http://127.0.0.1/callback"  # registered without a port: any loopback port is accepted (RFC 8252 7.3)
RESOURCE = "https://memos.example.test/api/"  # the RFC 8707 resource of the profiles with the feature "resource"
MIXUP_ISS = "http://127.0.0.1:9/mix-up"  # the iss a "wrong_iss" variant sends: another issuer's

FEATURES = {
    "oob": "shows the code on a page to paste (urn:ietf:wg:oauth:2.0:oob is registered)",
    "loopback": f"redirects to {LOOPBACK} on any port (RFC 8252 7.3)",
    "rotation_grace": "a refresh rotates the refresh token; the old one works until the new access token is used",
    "rotation_immediate": "a refresh rotates the refresh token; the used one dies at once",
    "dead_token_401": "the API answers an expired or revoked access token with 401 (+ WWW-Authenticate)",
    "dead_token_403": "the API answers an expired or revoked access token with a bare 403 (no challenge)",
    "revoke_kills_both": "revoking the access token (RFC 7009) kills its refresh token as well",
    "write_scope": "the client may ask for scope write, which the memo API does not accept (it needs read)",
    "insufficient_scope_challenge": "403 for a token without the needed scope names insufficient_scope (RFC 6750)",
    "refresh_scope_strict": "a refresh whose scope names anything not granted gets 400 invalid_scope",
    "narrow_scope": "grants fewer scopes than asked (RFC 6749 3.3): never write; the token response says so",
    "access_token_unrevocable": "revoking an access token gets 400 unsupported_token_type (RFC 7009 2.2.1); "
                                "revoking the refresh token ends the grant",
    "iss": "every authorization response carries iss (RFC 9207)",
    "metadata": "publishes its metadata (RFC 8414 or OIDC discovery); the client is given OAUTH_ISSUER only",
    "tls": "speaks https only, with a certificate of the tests' own CA (tests/servers/tls.py); the client is given "
           "REQUESTS_CA_BUNDLE",
    "public_client": "the client is a public one: no CLIENT_SECRET, client_id in the body (RFC 8252 8.4)",
    "resource": "requires the RFC 8707 resource at authorization and at the token endpoint; the client sets "
                "OAUTH_RESOURCE",
    "offline_access": "the client may ask for scope offline_access",
    "private_key_jwt": "the client authenticates with a JWT signed by its key (RFC 7523 2.2; OAUTH_CLIENT_KEY, a "
                       "0600 PEM file), no CLIENT_SECRET",
    "par": "the metadata offers PAR (RFC 9126) and the client pushes (OAUTH_PAR=auto): the URL the person opens "
           "carries client_id and request_uri only (without it the client is given OAUTH_PAR=off if PAR is offered)",
    "resource_metadata": "the API's 401 names its RFC 9728 metadata (the server's own), which names the API and "
                         "this server: MEMOS_API_URL with CLIENT_ID and CLIENT_SECRET is a whole configuration",
    "foreign_resource_metadata": "a variant whose RFC 9728 document names another resource than the API (DOT's "
                                 "default: the URL it is mounted under), which a client must not use (9728 3.3)",
    "wrong_iss": "a variant of the server sends an iss that names another issuer (the mix-up attack)",
    "omitted_iss": "a variant of the server promises iss in its metadata but sends none",
    "error_without_iss": "its error redirects (access_denied) carry no iss, though its metadata promises iss",
    # The device grant: each is a variant (a server of its own, polling every second, so the scenarios stay short).
    "device": "the device authorization grant (RFC 8628) for a device client; the variant sends "
              "verification_uri_complete and names no device endpoint in its metadata",
    "device_in_metadata": "a variant of the device server that sends no verification_uri_complete and names its "
                          "device endpoint in its metadata (RFC 8414)",
    "device_slow_down": "a variant of the device server that answers the first poll with slow_down",
    "device_code_expiry": "a variant of the device server whose device codes expire after 4 s",
}


def goes_to_listener(authorize_url: str) -> bool:
    """Whether the authorization request's redirect_uri is a loopback listener (else out-of-band)."""
    return parse_qs(urlsplit(authorize_url).query)["redirect_uri"][0].startswith("http://")


# --- the person at a browser --------------------------------------------------------------------


class Person:
    """Someone at a browser, playing the authorization URL the script printed.

    authorize(url) is what they do at the prompt: the text to paste (oob), or None after their browser went to
    the script's listener (loopback); deny(url) the same with Deny pressed. landing(url): approve, but stop
    where the browser was sent (the code page, or the listener's address), for a person who pastes that address.
    codes: every code they were given (secrets that must never be printed); pages: what the listener answered.
    """

    def __init__(self) -> None:
        self.codes: list[str] = []
        self.pages: list[requests.Response] = []

    def landing(self, url: str, *, approve: bool = True, error: bool = False) -> str:
        raise NotImplementedError

    def authorize(self, url: str) -> str | None:
        return self._go(url, self.landing(url))

    def meets_an_error(self, url: str) -> None:
        """Approve, where the server answers with an error redirect (no code): the browser goes to the listener."""
        self._go(url, self.landing(url, error=True))

    def deny(self, url: str) -> None:
        self._go(url, self.landing(url, approve=False))

    def _go(self, url: str, landed: str) -> str | None:
        """A browser sent to a loopback listener goes there; from an out-of-band code page the code is pasted."""
        if goes_to_listener(url):
            self.pages.append(requests.get(landed, timeout=10))
            return None
        return self.codes[-1]

    def _keep_code(self, landed: str, code: str | None = None) -> str:
        code = code or next(iter(parse_qs(urlsplit(landed).query).get("code", [])), None)
        if code:
            self.codes.append(code)
        return landed

    def close(self) -> None:
        pass


class DoorkeeperPerson(Person):
    def __init__(self, server: DoorkeeperServer) -> None:
        super().__init__()
        self.browser = BrowserPerson.for_server(server)

    def landing(self, url: str, *, approve: bool = True, error: bool = False) -> str:
        try:
            code = self.browser.authorize(url, approve=approve)
        except AuthorizationDenied:
            if (approve and not error) or not goes_to_listener(url):
                raise
            return str(self.browser.last_url)
        return self._keep_code(str(self.browser.last_url), code)

    def close(self) -> None:
        self.browser.close()


class DotPerson(Person):
    def __init__(self, server: DotServer) -> None:
        super().__init__()
        self.server = server
        self.session = requests.Session()

    def landing(self, url: str, *, approve: bool = True, error: bool = False) -> str:
        return self._keep_code(self.server.login_and_authorize_http(url, approve=approve, session=self.session))

    def close(self) -> None:
        self.session.close()


class OidcPerson(Person):
    """Someone at a browser on oidc-provider's pages (servers.oidc.Person: logs in, consents or aborts).

    The server never shows a code (no out-of-band page): every approval ends in a redirect to the client's
    redirect URI, where the browser goes; the URL may be a pushed request's (RFC 9126), whose redirect URI
    is not in it, so the redirect itself says where the browser went.
    """

    def __init__(self, server: OidcServer) -> None:
        super().__init__()
        self.browser = OidcBrowser()

    def landing(self, url: str, *, approve: bool = True, error: bool = False) -> str:
        return self._keep_code(self.browser.authorize(url, approve=approve))

    def _go(self, url: str, landed: str) -> str | None:
        self.pages.append(requests.get(landed, timeout=10))
        return None

    def close(self) -> None:
        self.browser.close()


# --- one shape for every server -------------------------------------------------------------------


def _of_server(name: str, doc: str) -> property:
    """What every test server has under the same name (DoorkeeperServer and DotServer), read through the Target."""
    return property(lambda target: getattr(target.server, name), doc=doc)


class Target:
    """A started server of one profile, in the shape the scenarios use: everything they may ask is named here."""

    person_class: type[Person] = Person

    base_url = _of_server("base_url", "http://127.0.0.1:PORT")
    issuer = _of_server("issuer", "the issuer its metadata names (RFC 8414)")
    metadata_url = _of_server("metadata_url", "where its metadata is published, or None")
    authorize_endpoint = _of_server("authorize_endpoint", "the authorization endpoint's URL")
    token_endpoint = _of_server("token_endpoint", "the token endpoint's URL")
    revoke_endpoint = _of_server("revoke_endpoint", "the revocation endpoint's URL (RFC 7009)")
    par_endpoint = _of_server("par_endpoint", "the pushed authorization request endpoint (RFC 9126; feature par)")
    memos_url = _of_server("memos_url", "the memo API's URL")
    log_mark = _of_server("log_mark", "log_mark() -> int: a position in the access log")
    access_log = _of_server("access_log", "access_log(since) -> list[AccessEntry] (tests/servers/harness.py)")
    age_tokens = _of_server("age_tokens", "age_tokens(seconds): the server's clock moves on for every token")
    reset = _of_server("reset", "reset(): forget every grant and token, keep the client and the user")
    # The device grant (feature "device"): a server with it has these too.
    device_authorization_endpoint = _of_server("device_authorization_url", "the device endpoint (RFC 8628 3.1)")
    device_verification_url = _of_server("device_verification_url", "the page where the person enters the code")
    device_client_id = _of_server("device_client_id", "a confidential client allowed the device grant")
    device_client_secret = _of_server("device_client_secret", "its secret")
    public_device_client_id = _of_server("public_device_client_id", "a public client allowed the device grant")
    device_polls = _of_server("device_polls", "device_polls(since) -> list[AccessEntry]: the device grant's polls")
    approve_device = _of_server("approve_device", "approve_device(code, url=, approve=) -> the page title the "
                                                  "person ends on (code None: the page has it filled in)")
    issued_secrets = _of_server("issued_secrets", "issued_secrets() -> every token, code and secret it issued")

    def __init__(self, profile: Profile, server: Any) -> None:
        self.profile = profile
        self.server = server

    def has(self, feature: str) -> bool:
        return feature in self.profile.features

    @property
    def dead_token_status(self) -> int:
        return 401 if self.has("dead_token_401") else 403

    @property
    def client_id(self) -> str:
        return self.server.public_client_id if self.has("public_client") else self.server.client_id

    @property
    def client_secret(self) -> str | None:
        """The secret the client is configured with: None for a public client (CLIENT_SECRET unset)."""
        return None if self.has("public_client") else self.server.client_secret

    def client_env(self, mode: str) -> dict[str, str | None]:
        """The script's settings for this server, as the README gives them (beyond CLIENT_ID/SECRET).

        With metadata: the issuer alone ("issuer-only configuration"; None unsets what Client.env would set).
        """
        if self.has("metadata"):
            env: dict[str, str | None] = {"OAUTH_SERVER_URL": None, "OAUTH_ISSUER": self.issuer}
        else:
            env = {"OAUTH_SERVER_URL": self.base_url, **self.endpoint_env()}
        env["OAUTH_LOGIN_TIMEOUT"] = "30"
        if mode == "loopback":
            env["OAUTH_REDIRECT_URI"] = LOOPBACK
        if self.has("resource"):
            env["OAUTH_RESOURCE"] = RESOURCE
        if self.has("tls"):
            # requests' own variable, so the issuer-only scenario still sees the issuer as the only server setting
            # (tests/test_transport.py proves OAUTH_CA_BUNDLE, and that it beats this one)
            env["REQUESTS_CA_BUNDLE"] = str(self.server.ca_file)
        return env

    def endpoint_env(self) -> dict[str, str | None]:
        """The endpoint settings a server without metadata needs beyond OAUTH_SERVER_URL."""
        return {}

    def refuses_the_redirect_uri(self, page: str) -> bool:
        """Whether `page` (its text) is the server's error page for a redirect URI the client did not register,
        in the server's words (Doorkeeper's and DOT's: invalid_request, "redirect URI")."""
        return "invalid_request" in page and "redirect uri" in page.lower()

    def device_env(self, *, public: bool = False) -> dict[str, str | None]:
        """The script's settings for the device grant: the device client, every endpoint set (no discovery)."""
        return {"CLIENT_ID": self.public_device_client_id if public else self.device_client_id,
                "CLIENT_SECRET": None if public else self.device_client_secret, "OAUTH_SERVER_URL": self.base_url,
                "OAUTH_TOKEN_URL": self.token_endpoint, "OAUTH_REVOKE_URL": self.revoke_endpoint,
                "MEMOS_API_URL": self.memos_url, "OAUTH_DEVICE_AUTHORIZATION_URL": self.device_authorization_endpoint,
                "OAUTH_DEVICE_FLOW": "1"}

    def _client_auth(self) -> dict[str, Any]:
        if self.client_secret:
            return {"auth": (self.client_id, self.client_secret), "data": {}}
        return {"auth": None, "data": {"client_id": self.client_id}}

    def person(self) -> Person:
        return self.person_class(self.server)

    def token_works(self, access_token: str) -> bool:
        response = requests.get(self.memos_url, headers={"Authorization": f"Bearer {access_token}"}, timeout=10)
        return response.status_code == 200

    def api_status(self, access_token: str) -> int:
        return requests.get(self.memos_url, headers={"Authorization": f"Bearer {access_token}"}, timeout=10).status_code

    def refresh_answer(self, refresh_token: str, **extra: str) -> tuple[int, str | None]:
        """What the token endpoint says to a refresh with this token (and extra parameters): (status, error)."""
        auth = self._client_auth()
        data = {"grant_type": "refresh_token", "refresh_token": refresh_token, **auth["data"], **extra}
        if self.has("resource"):
            data.setdefault("resource", RESOURCE)
        response = requests.post(self.token_endpoint, data=data, auth=auth["auth"], timeout=10)
        try:
            error = response.json().get("error")
        except ValueError:
            error = None
        return response.status_code, error

    def revoke(self, token: str) -> int:
        auth = self._client_auth()
        return requests.post(self.revoke_endpoint, data={"token": token, **auth["data"]}, auth=auth["auth"],
                             timeout=10).status_code

    def live_tokens(self) -> int:
        """How many access or refresh tokens the server would still honour (none after a logout)."""
        raise NotImplementedError


class DoorkeeperTarget(Target):
    person_class = DoorkeeperPerson

    def live_tokens(self) -> int:
        return sum(1 for row in self.server.tokens() if not row["revoked"])


class DotTarget(Target):
    person_class = DotPerson

    def endpoint_env(self) -> dict[str, str | None]:
        base = self.base_url
        return {"OAUTH_AUTHORIZE_URL": f"{base}/o/authorize/", "OAUTH_TOKEN_URL": f"{base}/o/token/",
                "OAUTH_REVOKE_URL": f"{base}/o/revoke_token/", "MEMOS_API_URL": f"{base}/api/memos/"}

    def live_tokens(self) -> int:
        summary = self.server.tokens()
        return summary["active_access_tokens"] + summary["active_refresh_tokens"]


class OidcTarget(Target):
    """oidc-provider (tests/servers/oidc.py): its access-log records read as AccessEntry, its clients by feature
    (the confidential one with HTTP Basic, the public one, the private_key_jwt one with its key file)."""

    person_class = OidcPerson

    @property
    def client_id(self) -> str:
        return PRIVATE_KEY_JWT_CLIENT_ID if self.has("private_key_jwt") else super().client_id

    @property
    def client_secret(self) -> str | None:
        return None if self.has("private_key_jwt") else super().client_secret

    def client_env(self, mode: str) -> dict[str, str | None]:
        env = super().client_env(mode)
        if self.has("private_key_jwt"):
            env["OAUTH_CLIENT_KEY"] = str(self.server.client_key_file)  # private_key_jwt by default with a key
        if not self.has("par"):
            env["OAUTH_PAR"] = "off"  # the metadata always offers PAR here
        return env

    def _client_auth(self) -> dict[str, Any]:
        if self.has("private_key_jwt"):
            auth, data = self.server.client_credentials(self.client_id, key=self.server.client_key)
            return {"auth": auth, "data": data}
        return super()._client_auth()

    def refuses_the_redirect_uri(self, page: str) -> bool:
        return "invalid_redirect_uri" in page and "redirect_uri did not match any of the client's registered" in page

    def log_mark(self) -> int:
        return self.server.log_mark()

    def access_log(self, since: int = 0) -> list[AccessEntry]:
        return [self._entry(record) for record in self.server.access_log(since)]

    @staticmethod
    def _entry(record: dict[str, Any]) -> AccessEntry:
        """Its log's record as the other servers' (servers.harness.AccessEntry): secret values are not in it."""
        params = record["params"]
        query = "&".join(f"{key}={params[key]}" if key in params else f"{key}=[redacted]"
                         for key in record["query_keys"])
        return AccessEntry(started=record["t_start"], finished=record["t"], method=record["method"],
                           path=record["path"], query=query, status=record["status"],
                           remote_port=record["remote_port"], grant_type=record["grant_type"], auth=record["auth"],
                           client_auth=record["client_auth"], params=params, secret_params=record["has"],
                           body_keys=record["body_keys"], error=record["error"], response=record["response"])

    def live_tokens(self) -> int:
        return self.server.live_tokens()


# --- the profiles -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    name: str
    marker: str
    features: frozenset[str]
    start: Callable[..., Any]  # start(folder, **switches): the server with this profile's switches; returns it
    adapter: type[Target]
    require: Callable[[], None] = lambda: None
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # feature -> the switches that show it
    modes: tuple[str, ...] = field(init=False)  # the redirect modes it has, the default first

    def __post_init__(self) -> None:
        unknown = self.features - FEATURES.keys()
        assert not unknown, f"profile {self.name}: unknown features {sorted(unknown)} (add them to FEATURES)"
        assert self.variants.keys() <= self.features, f"profile {self.name}: a variant's feature is not declared"
        object.__setattr__(self, "modes", tuple(m for m in ("oob", "loopback") if m in self.features))

    def launch(self, folder: Path, variant: str | None = None) -> Target:
        """Start the profile's server; with `variant` (a feature in `variants`), with that variant's switches."""
        self.require()
        return self.adapter(self, self.start(folder, **(self.variants[variant] if variant else {})))


DOORKEEPER = frozenset({"oob", "loopback", "dead_token_401", "offline_access"})
OIDC = frozenset({"loopback", "rotation_immediate", "dead_token_401", "iss", "metadata", "revoke_kills_both",
                  "narrow_scope", "refresh_scope_strict", "offline_access"})
DOT = frozenset({"loopback", "rotation_immediate", "refresh_scope_strict", "offline_access"})


# The switches of DotServer's device variants (tests/test_e2e_device.py).
DEVICE_VARIANTS: dict[str, dict[str, Any]] = {
    "device": {"device_interval": 1, "device_uri_complete": True},
    "device_in_metadata": {"device_interval": 1, "advertise_device": True},
    "device_slow_down": {"device_interval": 1, "slow_down": 1},
    "device_code_expiry": {"device_interval": 1, "device_expires_in": 4, "expire_on_poll": True},
}


def doorkeeper(**switches: Any) -> Callable[..., DoorkeeperServer]:
    return lambda folder, **variant: DoorkeeperServer(folder, redirect_uris=[LOOPBACK],
                                                        **{**switches, **variant}).start()


def doorkeeper_tls(**switches: Any) -> Callable[..., DoorkeeperServer]:
    """Doorkeeper serving https itself (WEBrick with TLS) with a certificate of a CA made for it."""
    def start(folder: Path, **variant: Any) -> DoorkeeperServer:
        pki = TestPKI(folder / "pki")
        trust_in_this_process(pki.ca_file)  # the person's browser and the admin calls
        server = DoorkeeperServer(folder, redirect_uris=[LOOPBACK], tls=pki.cert_files(), **{**switches, **variant})
        server.ca_file = pki.ca_file
        return server.start()
    return start


def dot(**switches: Any) -> Callable[..., DotServer]:
    return lambda folder, **variant: DotServer(folder, redirect_uris=[LOOPBACK], **{**switches, **variant}).start()


def require_node_stack() -> None:
    require(node_stack_available(), "the oidc-provider test server")


def oidc(*, client_key: bool = False, **switches: Any) -> Callable[..., OidcServer]:
    """oidc-provider; with client_key, its private_key_jwt client too, whose key a user keeps in a 0600 file."""
    def start(folder: Path, **variant: Any) -> OidcServer:
        folder.mkdir(parents=True, exist_ok=True)
        key = EcKey.generate()
        server = OidcServer(folder, **{**switches, **variant}, **({"private_key_jwk": key.public_jwk()}
                                                                   if client_key else {}))
        if client_key:
            server.client_key, server.client_key_file = key, folder / "client-key.pem"
            descriptor = os.open(server.client_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w", encoding="ascii") as file:
                file.write(key.pem())
        return server.start()
    return start


PROFILES: list[Profile] = [
    Profile("doorkeeper", "doorkeeper", DOORKEEPER | {"rotation_grace", "revoke_kills_both"}, doorkeeper(),
            DoorkeeperTarget, require_ruby_stack),
    Profile("doorkeeper-immediate", "doorkeeper", DOORKEEPER | {"rotation_immediate", "revoke_kills_both"},
            doorkeeper(previous_refresh_token=False), DoorkeeperTarget, require_ruby_stack),
    # ruby-doorkeeper-openid-connect: discovery at /.well-known/openid-configuration; no iss unless switched on.
    Profile("doorkeeper-oidc", "doorkeeper",
            DOORKEEPER | {"rotation_grace", "revoke_kills_both", "metadata", "wrong_iss", "omitted_iss"},
            doorkeeper(oidc=True), DoorkeeperTarget, require_oidc,
            variants={"wrong_iss": {"iss_value": MIXUP_ISS}, "omitted_iss": {"advertise_iss": True}}),
    # The same over https, with the tests' own CA (issue 15): login, refresh and logout over TLS.
    Profile("doorkeeper-tls", "doorkeeper", DOORKEEPER | {"rotation_grace", "revoke_kills_both", "metadata", "tls"},
            doorkeeper_tls(oidc=True), DoorkeeperTarget, require_oidc),
    # What the strict server of issue 8 did, on Doorkeeper: scopes narrowed, strict refresh scope, JWT-like
    # access tokens that cannot be revoked, iss, a resource indicator required.
    Profile("doorkeeper-strict", "doorkeeper",
            DOORKEEPER | {"rotation_grace", "narrow_scope", "refresh_scope_strict", "access_token_unrevocable",
                          "iss", "resource", "wrong_iss"},
            doorkeeper(grant_scopes=("read", "openid", "offline_access"), strict_refresh_scope=True,
                       refuse_access_token_revocation=True, send_iss=True, require_resource=RESOURCE),
            DoorkeeperTarget, require_ruby_stack, variants={"wrong_iss": {"iss_value": MIXUP_ISS}}),
    # The device scenarios run here only: the other DOT profiles' switches do not touch the device grant.
    Profile("dot", "dot", DOT | {"dead_token_403", "revoke_kills_both", "write_scope", *DEVICE_VARIANTS},
            dot(), DotTarget, require_dot_stack, variants=DEVICE_VARIANTS),
    # DOT's own RFC 9728 view answers the API's 401 (its challenge names the document); the document names the
    # API as DOT's OAUTH2_PROTECTED_RESOURCE_IDENTIFIER says, or (the variant) DOT's default, its mount URL.
    Profile("dot-challenge", "dot",
            DOT | {"dead_token_401", "insufficient_scope_challenge", "revoke_kills_both", "write_scope",
                   "resource_metadata", "foreign_resource_metadata"},
            dot(bearer_challenge=True, resource_is_api=True), DotTarget, require_dot_stack,
            variants={"foreign_resource_metadata": {"resource_is_api": False}}),
    # DOT strict: RFC 8414 metadata, iss, the public client, S256 only; and scopes narrowed, and access tokens
    # that cannot be revoked while their grant lives (revoking the refresh token first removes them: 200).
    Profile("dot-strict", "dot",
            DOT | {"dead_token_403", "metadata", "iss", "error_without_iss", "public_client", "narrow_scope",
                   "wrong_iss", "omitted_iss"},
            dot(strict=True, narrow_scopes=("write",), revoke_access_tokens=False), DotTarget, require_dot_stack,
            variants={"wrong_iss": {"iss": "wrong", "wrong_iss": MIXUP_ISS}, "omitted_iss": {"iss": "omit"}}),
    # oidc-provider (issue 16): no out-of-band page; refresh tokens rotated, a reused one kills its grant; iss in
    # every authorization response, errors included; discovery. PAR offered, pushed by oidc-pkjwt only.
    Profile("oidc", "oidc", OIDC, oidc(), OidcTarget, require_node_stack),
    Profile("oidc-public", "oidc", OIDC | {"public_client"}, oidc(), OidcTarget, require_node_stack),
    Profile("oidc-pkjwt", "oidc", OIDC | {"private_key_jwt", "par"}, oidc(client_key=True), OidcTarget,
            require_node_stack),
]


# --- what a scenario needs --------------------------------------------------------------------------


def needs(*features: str, lacks: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Generate the scenario only for the profiles that have every one of `features` and none of `lacks`.

    A profile without them gets no test at all (not a skip: under CI=true a skip fails the run).
    """
    unknown = (set(features) | set(lacks)) - FEATURES.keys()
    assert not unknown, f"unknown features {sorted(unknown)} (add them to profiles.FEATURES)"

    def mark(scenario: Callable[..., Any]) -> Callable[..., Any]:
        scenario.needs = (frozenset(features), frozenset(lacks))  # type: ignore[attr-defined]
        return scenario

    return mark


def profile_params(scenario: Callable[..., Any], with_mode: bool) -> list[Any]:
    """pytest.param(profile[, mode]) for each profile the scenario applies to, with the profile's server marker."""
    wanted, unwanted = getattr(scenario, "needs", (frozenset(), frozenset()))
    params = []
    for profile in PROFILES:
        if not wanted <= profile.features or unwanted & profile.features:
            continue
        marks = [getattr(pytest.mark, profile.marker)]
        if with_mode:
            params += [pytest.param(profile, mode, id=f"{profile.name}-{mode}", marks=marks) for mode in profile.modes]
        else:
            params.append(pytest.param(profile, id=profile.name, marks=marks))
    return params
