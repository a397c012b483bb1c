#!/usr/bin/env python3
# /// script
# requires-python = ">=3.10"
# dependencies = [
#   "requests>=2.31,<3",
#   "requests-oauthlib>=2.0,<3",
#   "python-dotenv>=1.0,<2",
#   "oauthlib>=3.2,<5",
#   "urllib3>=1.26,<3",
# ]
# ///
"""Fetch your memos from a Doorkeeper-protected API, authorizing with OAuth 2.0 from a terminal.

The first run prints an authorization URL; you log in in a browser, press Authorize, and paste
the code the server shows.  The token is kept in a private file beside this script and is
reused, and refreshed, on later runs without asking.  `python fetch_memos.py --help` says more.

The file reads top to bottom in the order a run meets things; each banner says what its section owns:
   1. Settings          defaults < .env < environment < flags, validated once
   2. Errors, messages  the catalogue of failures and their exit codes; redaction of secrets
   3. Files             the token store, the metadata cache, the client registrations (private, atomic, locked)
   4. Server metadata   RFC 9728 (from the API alone), RFC 8414, RFC 7591 registration -> endpoints and client
   5. Session           the OAuth2Session, client authentication, refresh; the only code that talks HTTP
   6. Grant rules       what a token answer means; what a stored token is good for
   7. The code grant    PKCE + state, the out-of-band paste or the loopback listener, the code exchange
   8. The device grant  RFC 8628 polling; authorize() picks a grant
   9. Commands          fetch (the default), --status, --logout
  10. main()            flags -> one command -> one line and an exit code
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import errno
import functools
import io
import json
import logging
import os
import pickle
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

if TYPE_CHECKING:  # the HTTP stack is imported lazily so that --help and --status stay instant
    import requests
    from requests_oauthlib import OAuth2Session

__version__ = "1.0.0"

log = logging.getLogger("fetch_memos")

# The public surface: what tests/ and bench/ use. Everything else may change without notice.
__all__ = [
    "DEVICE_CLOCK", "DEVICE_POLL_RETRIES", "EXIT_CODES", "MAX_ANSWER_BYTES", "MAX_API_BYTES", "MAX_GRANTS",
    "MAX_JSON_DEPTH", "MAX_TOKEN_FILE_BYTES", "MESSAGES", "METADATA_MAX_AGE", "META_KEY", "OAUTH_ERRORS",
    "OAUTH_ERRORS_WITHOUT_SECRET", "PROMPT_ATTEMPTS", "RETRY_ATTEMPTS", "SETTINGS", "AuthorizationError",
    "BadTokenFile", "ClientRegistrations", "Clock", "ConfigError", "DeadGrant", "DevicePoller", "FetchMemosError",
    "GrantKey", "LoopbackListener", "MemoSession", "MetadataCache", "OAuthError", "PollError", "ServerError",
    "Settings", "StepUpRequired", "Terminal", "TokenFileBusy", "TokenNotSaved", "TokenStore", "TransientServerError",
    "WaitingLine", "answered", "apply_metadata", "authorize", "bearer_challenge", "build_parser", "call_api",
    "check_resource_metadata", "command_status", "fail", "get_memos", "grant_key", "is_expiring", "is_loopback_host",
    "load_settings", "main", "metadata_urls", "nested_deeper_than", "oauth_error", "oauth_failure",
    "parse_challenges", "parse_pasted", "parse_token_bytes", "print_json", "read_pasted_code", "readable_user_code",
    "redact", "register_client", "registered_client", "registration_request", "remember_secret",
    "request_device_authorization", "resolve_endpoints", "resource_metadata_url", "same_origin", "sane_expires_in",
    "should_open_browser", "step_up_challenge", "terminal_text", "tls_failure", "token_meta", "token_mismatch",
]

OOB_REDIRECT_URI = "urn:ietf:wg:oauth:2.0:oob"
REGISTERED_REDIRECT_URI = "http://127.0.0.1/callback"  # RFC 8252 section 7.3: the server accepts any port
DEFAULT_SERVER_URL = "http://localhost:3801"
DEFAULT_TOKEN_FILE_NAME = "oauth_token.pickle"
SCRIPT_DIR = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------
# 1. Settings: one row per setting; defaults, then .env, then the environment, then flags; validated here, once.
# ---------------------------------------------------------------------------------------------

class Setting(NamedTuple):
    """One setting, defined once: load_settings, --help, the README's options table and .env.example come from it."""

    variable: str  # the environment (and .env) variable
    field: str  # the Settings field it fills
    flag: str  # "" for none
    default: str  # what an unset or empty value means; "" where none is sent or the help says how it is derived
    help: str  # "{default}" in it is replaced by the default
    parse: Callable[[str, str, _Load], Any]  # (variable, value or default, the load) -> the field, or ConfigError
    switch: bool = False  # a flag without a value, meaning "1"
    title: str = ""  # an endpoint's label in --status
    metadata: str = ""  # an endpoint's RFC 8414 metadata field: set, the endpoint may come from the metadata
    shown_default: str = ""  # the README's default (Markdown) where `default` alone would not say it
    doc: str = ""  # the README's meaning (Markdown: code, links) where it says more than the help

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")

    def describe(self) -> str:
        return self.help.replace("{default}", self.default)


class _Load:
    """One load_settings call: the merged raw values, and each field parsed once, on first use.

    A parser that needs another setting (every URL asks OAUTH_ALLOW_INSECURE_HTTP, the endpoints ask the server
    URL, which asks the issuer) calls get(); so the rows' order decides only which error a run reports first.
    """

    def __init__(self, merged: Mapping[str, str], *, env_file: Path | None = None, needs_client: bool = True) -> None:
        self.merged = merged
        self.fields: dict[str, Any] = {}
        self.env_file = env_file  # the .env that was read, to name in advice; None when there is none
        self.needs_client = needs_client  # False for --status, which only reads the store
        self.from_flags: set[str] = set()  # variables a flag set: a message names the flag the person typed

    def named(self, variable: str, value: str) -> str:
        """How a message names a value: as typed, `--timeout='0'` from a flag, `OAUTH_TIMEOUT='0'` otherwise."""
        flag = SETTINGS[variable].flag
        return f"{flag}={value!r}" if flag and variable in self.from_flags else f"{variable}={value!r}"

    def given(self, variable: str) -> str:
        """The value set by a flag, the environment or .env; "" when unset or empty."""
        return self.merged.get(variable, "").strip()

    def get(self, variable: str) -> Any:
        """The Settings field a variable fills, parsed and validated by its row."""
        row = SETTINGS[variable]
        if row.field not in self.fields:
            self.fields[row.field] = row.parse(variable, self.given(variable) or row.default, self)
        return self.fields[row.field]


CLIENT_AUTH_METHODS = ("basic", "post", "none", "private_key_jwt", "client_secret_jwt")
PAR_MODES = ("auto", "off")


def _text(name: str, value: str, load: _Load) -> str:
    return value


def _switch(name: str, value: str, load: _Load) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


# The settings that name the authorization server; with none of them set, MEMOS_API_URL alone leads to it (RFC 9728).
SERVER_SETTINGS = ("OAUTH_ISSUER", "OAUTH_SERVER_URL", "OAUTH_AUTHORIZE_URL", "OAUTH_TOKEN_URL")


def starts_from_api(load: _Load) -> bool:
    """MEMOS_API_URL is set and nothing names the server: the API's protected resource metadata does (RFC 9728)."""
    return bool(load.given("MEMOS_API_URL")) and not any(load.given(name) for name in SERVER_SETTINGS)


def _client_id(name: str, value: str, load: _Load) -> str:
    # Discovery (OAUTH_ISSUER, or the API alone) may find a registration endpoint (RFC 7591): decided after it.
    if not value and load.needs_client and not (load.given("OAUTH_ISSUER") or starts_from_api(load)):
        where = "is empty" if name in load.merged else "is not set"
        if load.env_file is not None:  # it exists: copying .env.example over it would be the wrong advice
            raise ConfigError(f"{name} {where}. Fill in {name} (and CLIENT_SECRET) in {load.env_file} with the "
                              "client credentials of your OAuth application (.env.example lists every setting), "
                              "or set the environment variable.")
        raise ConfigError(
            f"{name} {where}. Copy .env.example to .env beside fetch_memos.py and fill in the client "
            "credentials of your OAuth application (or set the environment variable)."
        )
    return value


def _client_auth(name: str, value: str, load: _Load) -> str:
    """The one place the default lives: private_key_jwt with a key, else basic with a secret, none without."""
    secret = load.get("CLIENT_SECRET")
    key = load.get("OAUTH_CLIENT_KEY")
    method = (value or ("private_key_jwt" if key else "basic" if secret else "none")).lower()
    if method not in CLIENT_AUTH_METHODS:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(CLIENT_AUTH_METHODS)}.")
    if method == "private_key_jwt":
        if not key:
            raise ConfigError(f"{name}=private_key_jwt needs OAUTH_CLIENT_KEY (--client-key), the PEM file of the "
                              "client's private key, which is not set.")
    elif method != "none" and not secret:
        raise ConfigError(f"{name}={method} needs CLIENT_SECRET, which is not set. Set it in .env "
                          "beside fetch_memos.py, or use OAUTH_CLIENT_AUTH=none for a public client.")
    return method


def _client_key(name: str, value: str, load: _Load) -> str:
    """"" when unset; else the key file's absolute path, once read_client_key accepts it (so a key that others
    can read stops the run before any request, as OpenSSH refuses it)."""
    if not value:
        return ""
    try:
        path = Path(value).expanduser().absolute()
    except RuntimeError as exc:  # ~user that does not exist
        raise ConfigError(f"{name}={value!r}: {exc}.") from None
    read_client_key(path)
    return str(path)


def _par(name: str, value: str, load: _Load) -> str:
    mode = value.strip().lower()
    if mode not in PAR_MODES:
        raise ConfigError(f"{load.named(name, value)} is not one of {', '.join(PAR_MODES)}.")
    return mode


def _issuer(name: str, value: str, load: _Load) -> str:
    """"" when unset: load_settings then derives it from the server URL, and no metadata is fetched."""
    return valid_issuer_setting(value, load.get("OAUTH_ALLOW_INSECURE_HTTP")) if value else ""


def _server_url(name: str, value: str, load: _Load) -> str:
    issuer = load.get("OAUTH_ISSUER")
    if issuer and not load.given(name):
        value = origin_url(issuer)
    return _check_url(name, value, load.get("OAUTH_ALLOW_INSECURE_HTTP"))


def _optional_url(name: str, value: str, load: _Load) -> str:
    return _check_url(name, value, load.get("OAUTH_ALLOW_INSECURE_HTTP")) if value else ""


def _requested_url(name: str, value: str, load: _Load) -> str:
    """A URL the run sends requests to; "<server>" in it stands for OAUTH_SERVER_URL."""
    return _optional_url(name, value.replace("<server>", load.get("OAUTH_SERVER_URL").rstrip("/")), load)


def _scope(name: str, value: str, load: _Load) -> tuple[str, ...]:
    scope = tuple(value.replace(",", " ").split())
    if not scope:
        raise ConfigError(f"{name}={value!r} names no scope; set it to e.g. read.")
    return scope


def _redirect_uri(name: str, value: str, load: _Load) -> str:
    if value == OOB_REDIRECT_URI:
        return value
    parts = _parse_url(name, value)
    if parts.scheme != "http" or not is_loopback_host(parts.hostname):
        raise ConfigError(
            f"{name}={value!r} is not supported: use {OOB_REDIRECT_URI} (copy and paste) or a "
            "loopback address such as http://127.0.0.1:8765/callback (RFC 8252)."
        )
    return value


def _max_age(name: str, value: str, load: _Load) -> int | None:
    """OpenID Connect Core section 3.1.2.1: max_age, the most seconds since the person last logged in."""
    if not value:
        return None
    if not value.isdigit() or int(value) > 10**9:
        raise ConfigError(f"{load.named(name, value)} is not a number of seconds (0 or more).")
    return int(value)


def _token_file(name: str, value: str, load: _Load) -> Path:
    """The default is beside the script; a path that is set is taken from the current folder, ~ expanded."""
    try:
        path = Path(value).expanduser() if load.given(name) else SCRIPT_DIR / value
    except RuntimeError as exc:  # ~user that does not exist
        raise ConfigError(f"{name}={value!r}: {exc}.") from None
    return path.absolute()


def _positive_seconds(name: str, value: str, load: _Load) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"{load.named(name, value)} is not a number of seconds.") from None
    if not 0 < seconds <= 3600:
        raise ConfigError(f"{load.named(name, value)} must be more than 0 and at most 3600 seconds.")
    return seconds


def _ca_bundle(name: str, value: str, load: _Load) -> str:
    """"" when unset (requests' own REQUESTS_CA_BUNDLE, else certifi, then decide); else a readable file's path."""
    if not value:
        return ""
    path = Path(value).expanduser().absolute()
    pem = "it should be a PEM file of the CA certificates to trust"
    if not path.exists():
        raise ConfigError(f"{name}={value!r} does not exist; {pem}.")
    if not path.is_file():  # checked before opening: a FIFO would block the open
        raise ConfigError(f"{name}={value!r} is not a file; {pem}.")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{name}={value!r}: cannot read it ({exc.strerror or exc}); {pem}.") from None
    return str(path)


# Every setting, keyed by its environment (and .env) variable; the order is --help's, the README's and .env.example's.
SETTINGS: dict[str, Setting] = {row.variable: row for row in (
    Setting("CLIENT_ID", "client_id", "--client-id", "", "the OAuth application's client id (required)",
            _client_id, shown_default="(required)",
            doc="the application's client id"),
    Setting("CLIENT_SECRET", "client_secret", "", "", "the application's client secret; leave it unset for a public "
            "client (PKCE only, RFC 8252 section 8.4). .env or environment only, never a flag, because other users "
            "can read a command line", _text, shown_default="unset: a public client",
            doc="the client secret of a confidential application; no flag, because other users can read a command "
            "line"),
    Setting("OAUTH_CLIENT_AUTH", "client_auth", "--client-auth", "", "how the client authenticates at the token, "
            "revocation, device authorization and PAR endpoints: basic (HTTP Basic, client_secret_basic), post "
            "(client_secret_post: id and secret in the form), none (public client: client_id in the form), "
            "private_key_jwt (a JWT signed with OAUTH_CLIENT_KEY, RFC 7523) or client_secret_jwt (a JWT signed "
            "with CLIENT_SECRET); default private_key_jwt with OAUTH_CLIENT_KEY, else basic with a secret, none "
            "without", _client_auth,
            shown_default="`private_key_jwt` with `OAUTH_CLIENT_KEY`, else `basic` with a secret, `none` without",
            doc="client authentication at the token, revocation, device authorization and PAR endpoints: `basic` "
            "(HTTP Basic, `client_secret_basic`), `post` (`client_secret_post`), `none` (`client_id` in the form, "
            "no Authorization header), `private_key_jwt` or `client_secret_jwt` (a signed JWT, RFC 7523; see "
            "[JWT client authentication](#jwt-client-authentication))"),
    Setting("OAUTH_CLIENT_KEY", "client_key", "--client-key", "", "a PEM file of the client's private key (EC P-256 "
            "signs ES256, RSA signs RS256) for private_key_jwt; it must be private (chmod 600), as OpenSSH requires "
            "of a key (default: none)", _client_key, shown_default="unset",
            doc="the client's private key (PEM; EC P-256 or RSA) for `private_key_jwt`; refused unless only you "
            "can read it"),
    Setting("OAUTH_CLIENT_KEY_ID", "client_key_id", "--client-key-id", "", "the key's kid, sent in the assertion's "
            "header, for a server that holds several keys of the client (default: none sent)", _text,
            shown_default="unset", doc="the `kid` the assertion's header names (optional)"),
    Setting("OAUTH_INITIAL_ACCESS_TOKEN", "initial_access_token", "", "", "the initial access token a server that "
            "protects its dynamic client registration (RFC 7591 section 3) gave you; used only when CLIENT_ID is "
            "unset. .env or environment only, never a flag", _text, shown_default="unset",
            doc="the initial access token for a server whose client registration is protected (RFC 7591 §3); "
            "no flag, because other users can read a command line"),
    Setting("OAUTH_ISSUER", "issuer", "--issuer", "", "the authorization server's issuer identifier. When set, every "
            "endpoint not set below comes from its RFC 8414 metadata (cached beside the token for 24 h), and "
            "an authorization response's iss must be it (RFC 9207). Default: OAUTH_SERVER_URL without a trailing "
            "slash, and no metadata is fetched", _issuer,
            shown_default="`OAUTH_SERVER_URL` without a trailing slash",
            doc="the server's issuer identifier. Set, it turns on discovery (RFC 8414: every endpoint not set "
            "explicitly comes from the server's metadata, cached for 24 h in `<token file>.metadata.json`); "
            "always, an authorization response that carries `iss` must carry this one, and one without `iss` is "
            "refused when the metadata promised it (RFC 9207 §2.4)"),
    Setting("OAUTH_SERVER_URL", "server_url", "--server-url", DEFAULT_SERVER_URL, "the authorization server (default "
            "{default}, or the origin of OAUTH_ISSUER when that is set)", _server_url,
            shown_default=f"`{DEFAULT_SERVER_URL}`, or the origin of `OAUTH_ISSUER`",
            doc="the authorization server's base URL (a Rails app with Doorkeeper, a Django app with "
            "django-oauth-toolkit, ...): the default endpoints below are paths under it"),
    Setting("OAUTH_AUTHORIZE_URL", "authorize_url", "--authorize-url", "<server>/oauth/authorize",
            "authorization endpoint (default {default})", _requested_url,
            title="Authorize:", metadata="authorization_endpoint"),
    Setting("OAUTH_TOKEN_URL", "token_url", "--token-url", "<server>/oauth/token", "token endpoint (default {default})",
            _requested_url, title="Token:", metadata="token_endpoint"),
    Setting("OAUTH_REVOKE_URL", "revoke_url", "--revoke-url", "<server>/oauth/revoke",
            "revocation endpoint, RFC 7009 (default {default})", _requested_url,
            title="Revoke:", metadata="revocation_endpoint",
            doc="revocation endpoint (RFC 7009)"),
    Setting("OAUTH_DEVICE_AUTHORIZATION_URL", "device_authorization_url", "--device-authorization-url", "",
            "device authorization endpoint, RFC 8628 (default: from the metadata, else none; django-oauth-toolkit: "
            "<site>/o/device-authorization/)", _requested_url,
            title="Device auth:", metadata="device_authorization_endpoint",
            doc="device authorization endpoint (RFC 8628)"),
    Setting("OAUTH_PAR_URL", "par_url", "--par-url", "", "pushed authorization request endpoint, RFC 9126 (default: "
            "from the metadata, else none)", _requested_url,
            title="PAR:", metadata="pushed_authorization_request_endpoint",
            doc="pushed authorization request endpoint (RFC 9126), see [Pushed authorization requests]"
            "(#pushed-authorization-requests-par)"),
    Setting("OAUTH_PAR", "par", "--par", "auto", "auto: push the authorization request (RFC 9126) whenever a PAR "
            "endpoint is known, so the browser's URL carries only client_id and request_uri; off: never (default "
            "{default})", _par,
            doc="`auto`: push the authorization request whenever a PAR endpoint is known; `off`: never"),
    Setting("OAUTH_DPOP", "dpop", "--dpop", "0", "set to 1 to ask for DPoP-bound tokens (RFC 9449): a key pair made "
            "when authorizing and kept with the token signs a proof for every token request and API call, so a "
            "stolen token is useless without the key (needs the cryptography package). Unset, an API whose "
            "resource metadata requires DPoP (RFC 9728) gets it; 0 turns that off", _switch, switch=True,
            doc="ask for DPoP-bound tokens (RFC 9449), see [DPoP](#dpop); unset, an API whose resource metadata "
            "requires them gets them"),
    Setting("MEMOS_API_URL", "api_url", "--api-url", "<server>/api/memos/",
            "the protected JSON API (default {default})", _requested_url),
    Setting("OAUTH_SCOPE", "scope", "--scope", "read", "space-separated scopes to ask for (default {default}; with "
            "offline_access the authorization request also asks for prompt=consent)", _scope,
            doc="scopes to ask for; with `offline_access` the authorization request carries `prompt=consent`"),
    Setting("OAUTH_RESOURCE", "resource", "--resource", "", "resource indicator, RFC 8707: the URL of the API the "
            "token is for, sent on the authorization and token requests (default: none sent)", _optional_url,
            doc="resource indicator (RFC 8707), sent on the authorization, code and refresh requests"),
    Setting("OAUTH_ACR_VALUES", "acr_values", "--acr-values", "", "authentication context classes to ask the "
            "server for, space-separated (OpenID Connect acr_values; servers honour it only with openid in "
            "OAUTH_SCOPE). An API that demands one (RFC 9470 step-up) gets it without this (default: none asked)",
            _text, shown_default="unset",
            doc="`acr_values` to ask for up front (a stronger login); an API's step-up challenge (RFC 9470) asks "
            "for it by itself, see [Zero configuration](#zero-configuration-starting-from-the-api-alone)"),
    Setting("OAUTH_MAX_AGE", "max_age", "--max-age", "", "the most seconds since the person's last login that the "
            "authorization may accept (OpenID Connect max_age; with openid in OAUTH_SCOPE) (default: none asked)",
            _max_age, shown_default="unset",
            doc="`max_age` to ask for up front: the login must be at most this many seconds old"),
    Setting("OAUTH_REDIRECT_URI", "redirect_uri", "--redirect-uri", OOB_REDIRECT_URI, "redirect URI registered for "
            "the app (default {default}; a http://127.0.0.1:PORT/... URI catches the redirect itself; without "
            "CLIENT_ID, http://127.0.0.1/callback)",
            _redirect_uri, shown_default=f"`{OOB_REDIRECT_URI}`; without `CLIENT_ID` `http://127.0.0.1/callback`",
            doc="or a loopback URI, see below"),
    Setting("OAUTH_TOKEN_FILE", "token_file", "--token-file", DEFAULT_TOKEN_FILE_NAME, "where the token is kept "
            "(default {default} beside the script; a relative path is relative to the current folder)",
            _token_file, shown_default=f"`{DEFAULT_TOKEN_FILE_NAME}` beside the script",
            doc="a relative path is relative to the current folder"),
    Setting("OAUTH_CA_BUNDLE", "ca_bundle", "--ca-bundle", "", "a PEM file of CA certificates to trust for every "
            "HTTPS request, e.g. a private or corporate CA (default: REQUESTS_CA_BUNDLE if set, else the certifi "
            "bundle)", _ca_bundle, shown_default="`REQUESTS_CA_BUNDLE` if set, else certifi's bundle",
            doc="a PEM file of the CA certificates to trust for every HTTPS request (a private or corporate CA); "
            "it replaces the default bundle, so it must hold every CA the server's certificate chains to"),
    Setting("OAUTH_TIMEOUT", "timeout", "--timeout", "10", "seconds each HTTP request may take (default {default})",
            _positive_seconds),
    Setting("OAUTH_LOGIN_TIMEOUT", "login_timeout", "--login-timeout", "300", "seconds to wait for the browser's "
            "redirect, or for the device flow's approval (default {default})", _positive_seconds,
            doc="seconds to wait for the browser's redirect (loopback) or the device flow's approval"),
    Setting("OAUTH_ALLOW_INSECURE_HTTP", "allow_insecure_http", "--allow-insecure-http", "0", "set to 1 to allow "
            "plain http to a host that is not this machine (tokens then cross the network unencrypted)",
            _switch, switch=True,
            doc="allow plain http to a host that is not this machine"),
    Setting("OAUTH_DEVICE_FLOW", "device_flow", "--device", "0", "set to 1 to authorize with the device flow (RFC "
            "8628): the script shows a URL and a code to enter on any device, and waits; nothing is typed here, so "
            "it also works without a terminal", _switch, switch=True,
            doc="authorize with the device flow (RFC 8628), see [Device flow](#device-flow)"),
)}

# The endpoints a run may take from the issuer's metadata, and the URLs it sends requests to (for oauthlib's http rule).
ENDPOINTS: tuple[Setting, ...] = tuple(row for row in SETTINGS.values() if row.metadata)
REQUESTED_URLS: tuple[str, ...] = tuple(row.field for row in SETTINGS.values() if row.parse is _requested_url)


class Settings(NamedTuple("SettingsFields", [
        *((row.field, row.parse.__annotations__["return"]) for row in SETTINGS.values()),  # the parser's type
        ("open_browser", bool), ("debug", bool),  # flags, not settings: no variable
        ("issuer_explicit", bool),  # OAUTH_ISSUER was set: endpoints come from its metadata (RFC 8414)
        ("issuer_required", bool),  # the metadata promised iss in every authorization response (RFC 9207)
        ("par_required", bool),  # the metadata says require_pushed_authorization_requests (RFC 9126 section 5)
        ("endpoint_sources", Mapping[str, str]),  # {"token_url": "explicit" | "metadata" | "default", ...}
        ("metadata_fetched_at", "float | None"),
        ("from_api", bool),  # MEMOS_API_URL alone: the issuer comes from its resource metadata (RFC 9728)
        ("dpop_explicit", bool),  # OAUTH_DPOP was set: an API's resource metadata does not change it
        ("issuer_via", str),  # the resource metadata URL that named the issuer; "" when OAUTH_ISSUER did
        ("registration_url", str),  # the metadata's registration_endpoint (RFC 7591); "" for none
        ("client_registered_at", "float | None"),  # the client id came from our own registration, at this time
        ("forget_client", bool)])):  # --logout --forget-client
    """Everything a run needs to know, validated; nothing after this re-checks it. A field per row of SETTINGS.

    A NamedTuple, not a frozen dataclass: as immutable, and about 10 M instructions cheaper to define on every run.
    """

    __slots__ = ()

    @property
    def is_oob(self) -> bool:
        return self.redirect_uri == OOB_REDIRECT_URI

    @property
    def has_credentials(self) -> bool:
        """The client authenticates with something (a secret or a key): a public client is told otherwise."""
        return bool(self.client_secret) or self.client_auth != "none"

    @property
    def signs_assertions(self) -> bool:
        """The client authenticates with a signed JWT (RFC 7523): private_key_jwt or client_secret_jwt."""
        return self.client_auth.endswith("_jwt")

    @property
    def uses_plain_http(self) -> bool:
        return any(getattr(self, field).lower().startswith("http://") for field in REQUESTED_URLS)

    def source(self, endpoint: str) -> str:
        """Where an endpoint came from: "explicit" (a setting), "metadata" (RFC 8414) or "default"."""
        return self.endpoint_sources.get(endpoint, "default")


def is_loopback_host(host: str | None) -> bool:
    """RFC 8252 section 8.3: loopback traffic never leaves the machine, so http is acceptable there."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_url(value: str) -> Any:
    """urlsplit with one answer on every Python: a bracketed host must be an IPv6 address (RFC 3986 section 3.2.2).

    Python 3.10 takes http://[127.0.0.1]/ and strips the brackets; 3.11 refuses it. We refuse it everywhere, and
    a port that is not a number too (parts.port raises ValueError).
    """
    parts = urlsplit(value)
    parts.port  # noqa: B018
    host = parts.netloc.rpartition("@")[2]
    if "[" in host or "]" in host:
        literal, bracket, rest = host.partition("]")
        if not literal.startswith("[") or not bracket or "[" in literal[1:] or "]" in rest:
            raise ValueError("unbalanced brackets in the host")
        import ipaddress

        try:
            ipaddress.IPv6Address(literal[1:])
        except ValueError:
            raise ValueError(f"{literal[1:]!r} in brackets is not an IPv6 address") from None
    return parts


def _parse_url(name: str, value: str) -> Any:
    try:
        return _split_url(value)
    except ValueError as exc:
        raise ConfigError(f"{name}={value!r} is not a valid URL ({exc}).") from None


def _check_url(name: str, value: str, allow_insecure_http: bool) -> str:
    parts = _parse_url(name, value)
    if parts.scheme not in ("http", "https") or not parts.hostname or not value.isprintable() or " " in value:
        raise ConfigError(f"{name}={value!r} is not a valid URL; expected something like https://memos.example.com.")
    if parts.fragment:
        raise ConfigError(f"{name}={value!r} must not contain a #fragment.")
    if "@" in parts.netloc or "\\" in value:
        # URL parsers disagree on user-info and backslashes (http://evil\@localhost/): refuse both, so the
        # host we check is the host we connect to. The value is not repeated: it may hold a password.
        raise ConfigError(f"{name} must not contain user information (user:password@) or backslashes.")
    if parts.scheme == "http" and not allow_insecure_http and not is_loopback_host(parts.hostname):
        raise ConfigError(
            f"{name}={value} uses plain http to {parts.hostname}, which is not this machine: tokens would "
            "cross the network unencrypted. Use https, or set OAUTH_ALLOW_INSECURE_HTTP=1 if you mean it."
        )
    return value


def read_env_file(path: Path) -> dict[str, str]:
    """Values from a .env file, without touching os.environ (the tests import this module)."""
    try:
        text = path.read_bytes().decode("utf-8")
        if "=" not in text:
            return {}  # nothing to assign (e.g. an empty file): spare the run importing python-dotenv
        from dotenv import dotenv_values

        # No ${VAR} interpolation: a secret may contain "$", and values must mean what they say.
        values = dotenv_values(stream=io.StringIO(text), interpolate=False)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; save it as UTF-8.") from None
    return {key: value for key, value in values.items() if value is not None}


def warn_if_others_can_read(env_file: Path, values: Mapping[str, str]) -> None:
    """A .env holding the client secret should be 0600, and one that others can change can send the run (and the
    secret) to their server, secret or not. OpenSSH refuses such a key file; we only warn, on each run until it is
    fixed, and never change the file (it is the person's)."""
    if sys.platform == "win32":
        return  # ACLs decide, and st_mode cannot tell
    try:
        st = env_file.stat()
    except OSError:
        return
    mode = st.st_mode & 0o777
    secret_readable = bool(values.get("CLIENT_SECRET", "").strip()) and mode & 0o044
    also = "; they can also read the client secret in it" if secret_readable else ""
    if st.st_uid not in (os.geteuid(), 0):  # root can change any file anyway
        warn(f"{env_file} belongs to another user (uid {st.st_uid}), who can change it and so point this script at "
             f"another server{also}; use a .env of your own, mode 600 (--env-file)")
    elif mode & 0o022:
        warn(f"other users can change {env_file} (mode {mode:o}) and so point this script at another server{also}; "
             f"make it private: chmod 600 {env_file}")
    elif secret_readable:
        warn(f"{env_file} holds the client secret and other users can read it (mode {mode:o}); "
             f"make it private: chmod 600 {env_file}")


def valid_issuer_setting(value: str, allow_insecure_http: bool) -> str:
    """RFC 8414 section 2: an https URL (http only where _check_url allows it) with no query or fragment."""
    _check_url("OAUTH_ISSUER", value, allow_insecure_http)
    if urlsplit(value).query:
        raise ConfigError(f"OAUTH_ISSUER={value!r} must not contain a ?query (RFC 8414 section 2).")
    return value


def origin_url(url: str) -> str:
    """scheme://host[:port] of a URL, as text."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _check_env_file_flag(env_file: Path) -> None:
    """--env-file that is not a regular file: a device such as /dev/null means "no settings from a file" (it is
    never read: /dev/zero would never end); a FIFO would block the run, a folder has nothing to read."""
    import stat

    try:
        mode = env_file.stat().st_mode
    except OSError:
        raise ConfigError(f"--env-file {env_file} does not exist.") from None
    if stat.S_ISCHR(mode):
        return
    kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
    raise ConfigError(f"--env-file {env_file} is {kind}; name a .env file (or /dev/null for none).")


def load_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Merge defaults < .env < environment < flags, then let each row parse and validate its value, once."""
    env_file = Path(args.env_file) if args.env_file else SCRIPT_DIR / ".env"
    if args.env_file and not env_file.is_file():
        _check_env_file_flag(env_file)
    from_file = read_env_file(env_file) if env_file.is_file() else {}
    merged = dict(from_file)
    merged.update({key: environ[key] for key in SETTINGS if key in environ})
    flagged = set()
    for key, row in SETTINGS.items():
        value = getattr(args, row.dest) if row.flag else None
        if value is not None and value is not False:
            merged[key] = "1" if value is True else str(value)
            flagged.add(key)
    load = _Load(merged, env_file=env_file if env_file.is_file() else None,
                 needs_client=getattr(args, "command", "fetch") != "status")
    load.from_flags = flagged
    for key in SETTINGS:
        load.get(key)
    fields = load.fields
    issuer_explicit = bool(fields["issuer"])
    if not issuer_explicit:
        # Only this default drops the slash; an OAUTH_ISSUER that is set is compared exactly as set.
        fields["issuer"] = fields["server_url"].rstrip("/")
    if args.loopback is not None:
        fields["redirect_uri"] = f"http://127.0.0.1:{args.loopback}/callback"
    elif not fields["client_id"] and not load.given("OAUTH_REDIRECT_URI"):
        # A registered (or to be registered) client: RFC 8252 section 7.3's loopback redirect, any port; the
        # out-of-band URI is no redirect a standards server registers.
        fields["redirect_uri"] = REGISTERED_REDIRECT_URI
    if from_file:  # after validation: a run stopped by a configuration error says only that
        warn_if_others_can_read(env_file, from_file)
    return Settings(
        **fields,
        open_browser=not args.no_browser,
        debug=args.debug,
        issuer_explicit=issuer_explicit,
        issuer_required=False,
        par_required=False,
        endpoint_sources={row.field: "explicit" if load.given(row.variable) else "default" for row in ENDPOINTS},
        metadata_fetched_at=None,
        from_api=starts_from_api(load),
        dpop_explicit=bool(load.given("OAUTH_DPOP")),
        issuer_via="",
        registration_url="",
        client_registered_at=None,
        forget_client=bool(getattr(args, "forget_client", False)),
    )


# ---------------------------------------------------------------------------------------------
# 2. Errors and messages: the catalogue (every failure's words and exit code), OAuth error codes by endpoint,
#    the one sanitizer for server text, the one redaction of secrets, wire errors in words.
# ---------------------------------------------------------------------------------------------

class FetchMemosError(Exception):
    """An expected failure: main() prints its message as one line and exits with its code.

    `what` is the MESSAGES key it was made from ("" for the few raised with words of their own).
    """

    exit_code = 1

    def __init__(self, message: str = "", *, what: str = "") -> None:
        super().__init__(message)
        self.what = what


class ServerError(FetchMemosError):
    """The server or the API failed: unreachable, timed out, 5xx, 4xx from the API, bad body."""

    exit_code = 1


class ConfigError(FetchMemosError):
    """Usage or configuration is wrong, including client credentials the server rejects."""

    exit_code = 2


class AuthorizationError(FetchMemosError):
    """Authorization failed, or needs a person and none is at the terminal."""

    exit_code = 3


# The classes below exist because some code catches them by class; every other failure is one of the three above,
# told apart by its `what`.

class DeadGrant(AuthorizationError):
    """The stored grant no longer works (revoked, expired, or the server forgot it): caught to authorize anew."""


class TransientServerError(ServerError):
    """The server could not be reached or failed with a 5xx: caught by the device poller, which tries again."""


class TokenNotSaved(FetchMemosError):
    """Saving failed; caught where the run can still succeed without the file."""

    exit_code = 1


class TokenFileBusy(FetchMemosError):
    """Another run held the token file's lock for longer than we wait: nothing failed, so try again later.

    Exit 1 like a server failure (the run did not get its memos, and another try will do), but its own
    class: the server is not at fault. Raised by the token store (section 3).
    """

    exit_code = 1


class BadTokenFile(Exception):
    """The file is not a token this script can use; the store sets it aside (never reaches main())."""


# What each exit code means: --help and the README's table are rendered from this, and every MESSAGES entry
# names one of these codes (a unit test holds them to it).

LOCK_WAIT_SECONDS = 60.0  # how long a run waits for another's refresh before giving up (TokenFileBusy, exit 1)

EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "the server or the API failed: unreachable, timeout, 5xx, a 4xx from the API, an answer that is not the "
       "expected JSON; or another fetch_memos run held the token file's lock for over "
       f"{LOCK_WAIT_SECONDS:g} s (nothing failed: try again)",
    2: "usage or configuration error: a missing or empty variable, a malformed URL, plain http to a remote host, "
       "client credentials rejected, a server certificate not trusted or not for that host, https to a port that "
       "does not speak TLS, an endpoint that answers 404 (a wrong URL), missing Python packages",
    3: "authorization failed or needs a person: a wrong, expired or reused code, denied consent, a state mismatch, "
       "end of input at the prompt, a device code that expired, a dead grant or no token when no terminal is "
       "attached; --status with no token stored (like `gh auth status`)",
    130: "interrupted (Ctrl-C)",
}

_ERROR_CLASSES: dict[int, type[FetchMemosError]] = {1: ServerError, 2: ConfigError, 3: AuthorizationError}

DEVICE_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"


class Message(NamedTuple):
    """One thing that can go wrong: its exit code and its words (str.format fields, filled in by fail())."""

    exit_code: int
    text: str
    raises: type[FetchMemosError] | None = None  # only for the classes some code catches; else by exit code


_EXPIRED = "the code expired; run again."

# Every failure the script reports after its settings are read, keyed by what happened. Adding one: one entry here,
# then `raise fail("key", field=...)` where it happens (or an OAUTH_ERRORS row when a server's error code means it).
MESSAGES: dict[str, Message] = {
    # -- the token endpoint, the device authorization endpoint and the revocation endpoint ------------------
    "client_rejected": Message(2, "the server at {url} rejected the client credentials ({error}); check CLIENT_ID "
                                  "and CLIENT_SECRET in .env."),
    "assertion_rejected": Message(2, "the server at {url} rejected the client's signed assertion "
                                     "({error}{description}); check CLIENT_ID and OAUTH_CLIENT_KEY (CLIENT_SECRET "
                                     "for client_secret_jwt), that the server registered the client for this "
                                     "method (and holds its public key), and OAUTH_ISSUER (the assertion's "
                                     "audience)."),
    "client_secret_missing": Message(
        2, "the server at {url} rejected the client ({error}): it expects a client secret, and CLIENT_SECRET is "
           "missing. Set CLIENT_SECRET in .env beside fetch_memos.py (a confidential application), or register the "
           "application as public."),
    "device_grant_not_allowed": Message(
        2, "the server at {url} does not let this application use the device flow ({error}{detail}); register it "
           f"with the device code grant type ({DEVICE_GRANT_TYPE})."),
    "scope_refused": Message(2, "the server at {url} refused the requested scope ({error}{detail}); check "
                                "OAUTH_SCOPE."),
    "endpoint_down": Message(1, "the {endpoint} {url} answered {answered}; try again later."),
    "endpoint_failed": Message(1, "the {endpoint} {url} failed ({error}); try again later."),
    "token_not_json": Message(1, "the token endpoint {url} answered {status} with {kind}, not a token; check "
                                 "OAUTH_TOKEN_URL (or OAUTH_SERVER_URL)."),
    "token_missing": Message(1, "the token endpoint {url} answered without a token{description}."),
    "token_malformed": Message(1, "the token endpoint {url} sent a malformed token ({problem})."),
    "token_request_failed": Message(3, "the token request to {url} failed: {error}{detail}."),
    "code_rejected": Message(3, "the server did not accept the code: it is wrong, expired or already used. "
                                "Run again to get a new one."),
    "refresh_lost": Message(1, "{problem} while refreshing the token. The stored token was kept; run again (if the "
                               "server had already used it up, you will be asked to authorize again)."),
    "refresh_refused": Message(3, "the server refused to refresh the stored grant ({error}).", DeadGrant),
    "grant_dead": Message(3, "the stored authorization is no longer valid (revoked, expired, or unknown to the "
                             "server).", DeadGrant),
    "no_refresh_token": Message(3, "the stored token has expired and came without a refresh token.", DeadGrant),
    # -- the authorization response, pasted or caught (RFC 6749 section 4.1.2.1, RFC 9207) ------------------
    "denied_in_browser": Message(3, "authorization was denied in the browser; run again and press Authorize to allow "
                                    "access."),
    "denied_at_server": Message(3, "authorization was denied at the server{detail}; run again and press Authorize to "
                                   "allow access."),
    "authorization_refused": Message(3, "the server refused the authorization: {error}{detail}."),
    "iss_missing": Message(
        3, "the authorization response carries no iss, though the metadata of {issuer} says every response names its "
           "issuer (RFC 9207); it may belong to another server's authorization (a mix-up attack), so it was refused "
           "before any token request. Run again, and check OAUTH_ISSUER."),
    "iss_wrong": Message(
        3, "the authorization response names the issuer {named!r}, not the expected {issuer} (RFC 9207); it may "
           "belong to another server's authorization (a mix-up attack), so it was refused before any token "
           "request.{advice}"),
    "not_a_code": Message(3, "that does not look like an authorization code; paste the code the server showed, or the "
                             "whole address of that page."),
    "bare_code_unverifiable": Message(3, "a bare code cannot be checked against the issuer {issuer} (RFC 9207); paste "
                                         "the whole address the browser ended up on instead."),
    "paste_unreadable": Message(3, "that is neither a code nor an address that can be read; paste the code the server "
                                   "showed, or the whole address of that page."),
    "state_mismatch": Message(3, "the pasted URL belongs to a different authorization request (its state does not "
                                 "match); run again and use the URL this run printed."),
    "no_code_in_paste": Message(3, "the server gave no code: the pasted address has none in it. {hint}"),
    "token_folder_unwritable": Message(2, "cannot write the token file {path} ({problem}); set OAUTH_TOKEN_FILE to "
                                          "a file in a folder you can write. Nothing was sent to the server yet."),
    "server_unreachable": Message(1, "{problem} No browser was sent there: check {setting}, or start the server."),
    "paste_again": Message(3, "The server did not accept that code: it is wrong, expired or already used. Copy it "
                              "again from the page (this authorization is still valid) and paste it; {left} more "
                              "{left_word}."),
    "end_of_input": Message(3, "no code was entered (end of input); run again to authorize."),
    "nothing_pasted": Message(3, "no code was entered; run again to authorize."),
    "port_in_use": Message(2, "port {port} on {host} is already in use, so the browser's redirect cannot be caught "
                              "there; free it or choose another port with --loopback=PORT (and register that redirect "
                              "URI)."),
    "cannot_listen": Message(2, "cannot listen on {host}:{port}: {problem}."),
    # -- pushed authorization requests (RFC 9126) -----------------------------------------------------------
    "par_required": Message(2, "the server requires pushed authorization requests (its metadata says "
                               "require_pushed_authorization_requests, RFC 9126 section 5), and OAUTH_PAR=off; set "
                               "OAUTH_PAR=auto (the default)."),
    "par_refused": Message(3, "the server refused the pushed authorization request at {url}: {error}{detail}.{hint}"),
    "par_answer_unusable": Message(1, "the pushed authorization request endpoint {url} answered {answered} without a "
                                      "usable request_uri; check OAUTH_PAR_URL (or set OAUTH_PAR=off)."),
    "request_uri_expired": Message(3, "the pushed authorization request expired at the server (or was already used) "
                                      "before the browser opened it ({error}); run again and open the new URL right "
                                      "away."),
    "login_timeout": Message(3, "no authorization arrived within {timeout:.0f} s; run again (or raise "
                                "OAUTH_LOGIN_TIMEOUT)."),
    # -- the device grant (RFC 8628) ------------------------------------------------------------------------
    "no_device_endpoint": Message(
        2, "the device flow needs the server's device authorization endpoint, and the server publishes none "
           "{where} nor is one set: set OAUTH_DEVICE_AUTHORIZATION_URL (or "
           "--device-authorization-url). Doorkeeper offers one only with the doorkeeper-device_authorization_grant "
           "gem; django-oauth-toolkit serves <site>/o/device-authorization/ but does not advertise it."),
    "device_endpoint_missing": Message(2, "there is no device authorization endpoint at {url} (404); check "
                                          "OAUTH_DEVICE_AUTHORIZATION_URL."),
    "device_endpoint_not_json": Message(1, "the device authorization endpoint {url} answered {status} without a usable "
                                           "JSON body; check OAUTH_DEVICE_AUTHORIZATION_URL."),
    "device_authorization_refused": Message(3, "the server refused the device authorization request: "
                                               "{error}{detail}."),
    "device_answer_lacks": Message(1, "the device authorization endpoint {url} answered without {lacks}."),
    "device_no_verification_uri": Message(1, "the device authorization endpoint {url} named no verification_uri (the "
                                             "page where the code is entered); the server's device flow is not fully "
                                             "configured."),
    "device_denied": Message(3, "authorization was denied at the server; run again and approve access to allow it."),
    "device_code_expired": Message(3, _EXPIRED),
    "device_wait_ended": Message(3, _EXPIRED + " fetch_memos waited OAUTH_LOGIN_TIMEOUT={timeout:g} s for the "
                                    "approval (raise it to wait longer)."),
    "device_code_rejected": Message(3, "the server no longer accepts this device code ({error}{detail}); run again."),
    "poll_server_down": Message(1, "the token endpoint {url} answered {answered}.", TransientServerError),
    "poll_unreachable": Message(1, "{problem}", TransientServerError),
    "poll_gave_up": Message(1, "{problem}; gave up waiting for the approval after {failures} failed polls in a row.",
                            TransientServerError),
    "poll_not_json": Message(1, "the token endpoint {url} answered {status} without a JSON body; check "
                                "OAUTH_TOKEN_URL."),
    "poll_no_token": Message(1, "the token endpoint {url} answered {status} without a token."),
    # -- the API and the commands -----------------------------------------------------------------------------
    "api_rejected_token": Message(1, "the API at {url} rejected a freshly refreshed token (401); check MEMOS_API_URL "
                                     "and the server's token settings."),
    "api_forbidden": Message(1, "the API at {url} refused access (403 Forbidden): the account or the token's scope "
                                "lacks permission (check OAUTH_SCOPE, then --logout and run again)."),
    "api_failed": Message(1, "the API at {url} answered {answered}."),
    "api_empty": Message(1, "the API at {url} answered {status} with an empty body instead of JSON."),
    "api_not_json": Message(1, "the API at {url} answered {status} with {content_type}, not JSON."),
    "needs_person": Message(3, "{reason} Authorizing needs a person at a terminal: run fetch_memos.py interactively "
                               "once."),
    "revocation_failed": Message(1, "revoking at {url} failed with {answered}{code}."),
    # -- files and server metadata (sections 3 and 4) -----------------------------------------------------------
    "token_file_not_a_file": Message(2, "cannot read the token file {path}: {why}. Point OAUTH_TOKEN_FILE at a file."),
    "token_file_unreadable": Message(2, "cannot read the token file {path}: {problem}. Fix its permissions, or point "
                                        "OAUTH_TOKEN_FILE elsewhere."),
    "token_file_stuck": Message(2, "the token file {path} is not usable and could not be set aside: {problem}. Move it "
                                   "away by hand."),
    "metadata_issuer_mismatch": Message(2, "the server metadata at {url} names the issuer {found}, not {expected} (RFC "
                                           "8414 section 3.3); set OAUTH_ISSUER to the server's issuer identifier, "
                                           "exactly as it is written."),
    "named_server_mismatch": Message(2, "the server metadata at {url} names the issuer {found}, not {expected} (RFC "
                                        "8414 section 3.3); it was refused (a mix-up defence, RFC 9728 section 7); set "
                                        "OAUTH_ISSUER if you trust the server."),
    "metadata_server_failed": Message(1, "the server failed to answer with its metadata (tried {tried}); try again "
                                         "later."),
    "metadata_not_found": Message(2, "no authorization server metadata found for {issuer} (tried {tried}); check "
                                     "OAUTH_ISSUER, or unset it and set the endpoints (OAUTH_AUTHORIZE_URL, "
                                     "OAUTH_TOKEN_URL, ...) yourself."),
    "endpoint_not_found": Message(2, "the {endpoint} {url} answered 404 Not Found: there is no such endpoint; check "
                                     "{setting}."),
    # -- starting from the API (RFC 9728), registering (RFC 7591), step-up (RFC 9470) -------------------------
    "resource_metadata_elsewhere": Message(
        2, "the API at {api} names its resource metadata at {url}, on another origin; fetch_memos takes it only "
           "from the API's own origin (RFC 9728 section 7: a mix-up defence), so nothing was sent there. Set "
           "OAUTH_ISSUER to the API's authorization server if you trust it."),
    "resource_mismatch": Message(
        2, "the protected resource metadata at {url} is for the resource {resource}, not MEMOS_API_URL={api} (RFC "
           "9728 section 3.3); it was refused, and nothing was sent to the server it names. Set MEMOS_API_URL to "
           "the API's exact URL, or set OAUTH_ISSUER."),
    "resource_metadata_unusable": Message(
        2, "the protected resource metadata at {url} {problem}; set OAUTH_ISSUER to the API's authorization "
           "server."),
    "resource_metadata_failed": Message(1, "the API's resource metadata {url} answered {answered}; try again later."),
    "no_registration": Message(
        2, "CLIENT_ID is not set, and the server {issuer} offers no dynamic client registration (its metadata names "
           "no registration_endpoint, RFC 7591). Register an application by hand at the server (a native, public "
           "client with the redirect URI " + REGISTERED_REDIRECT_URI + ") and set CLIENT_ID in .env."),
    "no_resource_metadata": Message(
        2, "CLIENT_ID is not set, and the API at {api} publishes no resource metadata (RFC 9728) naming a server "
           "that could register fetch_memos. Set CLIENT_ID (and CLIENT_SECRET) in .env with the client credentials "
           "of your OAuth application, and OAUTH_SERVER_URL or OAUTH_ISSUER."),
    "registration_forgotten": Message(
        2, "the server {issuer} no longer accepts the client {client_id} that fetch_memos registered itself (kept in "
           "{path}); it has most likely forgotten it. Run fetch_memos.py --logout --forget-client, then run again to "
           "register anew."),
    "registration_needs_token": Message(
        2, "the registration endpoint {url} answered 401: the server registers clients only with an initial access "
           "token (RFC 7591 section 3). Set OAUTH_INITIAL_ACCESS_TOKEN in .env (or the environment) to the one its "
           "operator gave you, or set CLIENT_ID."),
    "registration_token_rejected": Message(
        2, "the registration endpoint {url} rejected OAUTH_INITIAL_ACCESS_TOKEN ({answered}{detail}); check it, "
           "or set CLIENT_ID."),
    "registration_refused": Message(
        2, "the registration endpoint {url} refused to register fetch_memos: {error}{detail}. Register an "
           "application by hand and set CLIENT_ID."),
    "registration_unusable": Message(1, "the registration endpoint {url} answered {answered} without a usable "
                                        "client_id."),
    "step_up_needs_person": Message(
        3, "the API at {url} asks for a stronger login: {asked} (RFC 9470){note}. Authorizing needs a person at a "
           "terminal: run fetch_memos.py interactively once."),
    "step_up_refused": Message(
        3, "the API at {url} still asks for {asked} after a new login that asked for it (RFC 9470){note}; "
           "fetch_memos steps up once, not again."),
    # -- the client's key (private_key_jwt, RFC 7523) ------------------------------------------------------------
    "client_key_unreadable": Message(2, "cannot read the client key OAUTH_CLIENT_KEY={path} ({problem})."),
    "client_key_untrusted": Message(2, "the client key OAUTH_CLIENT_KEY={path} was refused: {why}."),
    "client_key_exposed": Message(2, "the client key {path} can be read by other users (mode {mode}); a private key "
                                     "must be private, as OpenSSH also insists: chmod 600 {path}"),
    "client_key_unusable": Message(2, "the client key OAUTH_CLIENT_KEY={path} cannot sign client assertions: "
                                      "{problem}."),
    "crypto_missing": Message(2, "{feature} needs the Python package cryptography, which is not installed: "
                                 "`pip install cryptography` (with uv: `uv run --with cryptography fetch_memos.py`)."),
    # -- DPoP (RFC 9449) ------------------------------------------------------------------------------------------
    "dpop_not_bound": Message(0, "Note: the token endpoint {url} issued a {token_type} token though DPoP was asked "
                                 "for (OAUTH_DPOP=1): it does not bind tokens to a key, so this grant's token is "
                                 "used as issued, without DPoP proofs."),
    "packages_missing": Message(2, "the Python package {package} is not installed: run `uv run fetch_memos.py` "
                                   "(uv installs what the script needs), or `pip install -r requirements.txt` first."),
    "logout_failed": Message(1, "{problem} Not logged out: the grant may still be valid at the server, so the token "
                                "file was kept ({path}); run --logout again when the server answers."),
    "client_kept": Message(2, "{problem} The token file was kept."),
    # -- the transport: TLS, redirects, bounds (section 5) ---------------------------------------------------
    # TLS: what a person can fix in the settings is exit 2; an expired certificate is the server's to fix (exit 1).
    "tls_untrusted": Message(2, "the TLS certificate of {host} is not trusted ({why}): if {host} uses a private or "
                                "corporate CA, set OAUTH_CA_BUNDLE to a PEM file of it; otherwise someone may be "
                                "intercepting the connection. Nothing was sent."),
    "tls_wrong_host": Message(2, "the TLS certificate of {host} is for another name ({why}); check the URL's host "
                                 "({url}). Nothing was sent."),
    "tls_expired": Message(1, "the TLS certificate of {host} has expired; the server's operator must renew it. "
                              "Nothing was sent.", FetchMemosError),
    "tls_not_tls": Message(2, "{host} does not speak TLS on port {port} ({why}): is {url} meant to be http://, or "
                              "is the port wrong?"),
    "tls_failed": Message(1, "the TLS connection to {host} failed ({why}).", FetchMemosError),
    # A credential-bearing request (token, revocation, device authorization) never follows a redirect, and a GET
    # follows one only within its origin: a 3xx elsewhere could carry the request (and its secrets) anywhere.
    "redirect_refused": Message(1, "the {endpoint} {url} answered {answered} pointing to {location}; fetch_memos does "
                                   "not follow it ({why}). Check the URL: set it to where the server really "
                                   "answers.", FetchMemosError),
    "revocation_redirected": Message(1, "the revocation endpoint {url} answered {answered} pointing to {location}; "
                                        "fetch_memos does not follow it, so nothing was revoked: you are not logged "
                                        "out, and the token file was kept.", FetchMemosError),
    "too_many_redirects": Message(1, "{url} redirected more than {limit} times; check the URL."),
    "answer_too_large": Message(1, "the {endpoint} {url} sent more than {limit}; stopped reading (a {endpoint} "
                                   "answer is never that large)."),
    "answer_too_deep": Message(1, "the {endpoint} {url} sent JSON nested too deeply to read."),
    "answer_too_slow": Message(1, "the {endpoint} {url} did not finish answering within OAUTH_TIMEOUT={timeout:g} s; "
                                  "stopped waiting."),
}


def fail(what: str, **fields: object) -> FetchMemosError:
    """The error for MESSAGES[what], its fields filled in: the one way the code above makes a failure."""
    entry = MESSAGES[what]
    kind = entry.raises or _ERROR_CLASSES[entry.exit_code]
    return kind(entry.text.format(**fields), what=what)


def _escaped(ch: str, json_escape: bool = False) -> str:
    code = ord(ch)
    if json_escape:
        if code > 0xFFFF:  # JSON has no \U: a surrogate pair (RFC 8259 section 7)
            code -= 0x10000
            return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
        return f"\\u{code:04x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _printable(value: object, limit: int | None = 200, *, keep: str = "") -> str:
    """The one sanitizer for text a server sent, before it reaches a terminal: bounded, and every character that
    is not printable (C0/C1 controls, DEL, bidi and other format characters, line separators) shown as an escape
    (\\x1b, \\u202e), so a server can neither drive the terminal (ESC]0;title BEL, ESC[2J, CSI as U+009B, OSC 8
    links) nor make a line read differently than it is (U+202E, \\r). `keep` names characters let through (our
    own newlines, where whole messages pass through it on their way out)."""
    text = str(value)
    if limit is not None:
        text = text[:limit]
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch in keep else _escaped(ch) for ch in text)


def terminal_text(text: str) -> str:
    """A message as it is printed: secrets redacted, anything a server smuggled in escaped (lines kept)."""
    return _printable(redact(text), None, keep="\n")


def terminal_json(text: str) -> str:
    """JSON for a person's terminal: the characters _printable escapes become \\uXXXX, so the text stays valid
    JSON with the same data (they can only occur inside strings; json.dumps already escapes C0 controls)."""
    if text.replace("\n", "").isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == "\n" else _escaped(ch, json_escape=True) for ch in text)


def endpoint_setting(settings: Settings, field: str) -> str:
    """The setting a person fixes when an endpoint is wrong: its own variable when set, else where it came from."""
    row = next(row for row in ENDPOINTS if row.field == field)
    source = settings.source(field)
    if source == "explicit":
        return row.variable
    if source == "metadata":
        return f"OAUTH_ISSUER (its metadata named this endpoint; or set {row.variable})"
    base = "OAUTH_ISSUER" if settings.issuer_explicit else "OAUTH_SERVER_URL"
    return f"{base}={settings.server_url} (the {row.variable} default is built from it; no extra path)"


def not_found(settings: Settings, field: str, endpoint: str, url: str) -> ConfigError:
    """A 404 from an endpoint the settings named is a configuration mistake (exit 2), not a failed login."""
    return fail("endpoint_not_found", endpoint=endpoint, url=url, setting=endpoint_setting(settings, field))


def answered(response: requests.Response) -> str:
    """ "401 Unauthorized": how every message names the HTTP status a server answered with."""
    return f"{response.status_code} {_printable(response.reason or '', 100)}".rstrip()


class OAuthError(NamedTuple):
    """An OAuth error answer (RFC 6749 sections 4.1.2.1 and 5.2), sanitized: safe to print."""

    error: str
    description: str = ""
    uri: str = ""

    @property
    def detail(self) -> str:
        """" (description)" for the messages that add it, else ""."""
        return f" ({self.description})" if self.description else ""


def oauth_error(body: object) -> OAuthError | None:
    """The one reader of an OAuth error: a JSON text, a parsed body or query parameters; None when none is there.

    A server may send anything: a body that is not JSON, not an object, or fields that are not strings. Only a
    `error` with something printable in it makes an error; every field passes the sanitizer and is bounded.
    """
    if isinstance(body, (str, bytes)):
        try:
            body = json.loads(body)
        except ValueError:
            return None
    if not isinstance(body, Mapping):
        return None

    def field(name: str) -> object:
        value = body.get(name)
        return value[0] if isinstance(value, list) and value else value  # parse_qs gives lists

    error = field("error")
    if not isinstance(error, str) or not any(ch.isprintable() for ch in error):
        return None
    return OAuthError(_printable(error, 60), _printable(field("error_description") or ""),
                      _printable(field("error_uri") or ""))


def oauth_failure(endpoint: str, error: OAuthError, url: str, *, has_secret: bool = True, signs: bool = False,
                  **fields: object) -> FetchMemosError:
    """What an OAuth error from `endpoint` means for the person: the OAUTH_ERRORS row for its code, or the
    endpoint's row for any other code. `signs`: the client authenticates with an assertion (RFC 7523)."""
    what = OAUTH_ERRORS.get((endpoint, error.error)) or OAUTH_ERRORS[(endpoint, "*")]
    if not has_secret:
        what = OAUTH_ERRORS_WITHOUT_SECRET.get((endpoint, error.error), what)
    elif signs and what == "client_rejected":
        what = "assertion_rejected"
    return fail(what, url=url, error=error.error, detail=error.detail,
                description=f": {error.description.rstrip('.')}" if error.description else "",
                endpoint=ENDPOINT_TITLES.get(endpoint, endpoint), **fields)


# What an OAuth error code means at each endpoint, keyed by (endpoint, error code); "*" is any other code.
# Error codes: RFC 6749 section 4.1.2.1 (authorization) and 5.2 (token), RFC 8628 section 3.5 (device poll),
# RFC 7009 section 2.2.1 (revocation). Endpoints: "authorization" (a pasted response), "redirect" (the loopback's),
# "token" (code exchange), "refresh", "device_authorization", "device_poll", "revocation", "par" (RFC 9126).
OAUTH_ERRORS: dict[tuple[str, str], str] = {
    ("authorization", "access_denied"): "denied_at_server",
    ("authorization", "*"): "authorization_refused",
    ("redirect", "access_denied"): "denied_in_browser",  # the person just pressed Deny: a description adds nothing
    ("redirect", "*"): "authorization_refused",
    **{(endpoint, error): what for endpoint in ("token", "refresh") for error, what in (
        ("invalid_client", "client_rejected"),
        ("unauthorized_client", "client_rejected"),
        ("missing_token", "token_missing"),  # oauthlib's own codes for a 200 without a token
        ("missing_token_type", "token_missing"),
        ("server_error", "endpoint_failed"),
        ("temporarily_unavailable", "endpoint_failed"),
        ("*", "token_request_failed"),
    )},
    ("token", "invalid_grant"): "code_rejected",
    ("refresh", "invalid_grant"): "grant_dead",
    ("refresh", "invalid_scope"): "refresh_refused",
    ("device_authorization", "invalid_client"): "client_rejected",
    ("device_authorization", "unauthorized_client"): "device_grant_not_allowed",
    ("device_authorization", "invalid_scope"): "scope_refused",
    ("device_authorization", "*"): "device_authorization_refused",
    ("device_poll", "invalid_client"): "client_rejected",
    ("device_poll", "unauthorized_client"): "device_grant_not_allowed",
    ("device_poll", "unsupported_grant_type"): "device_grant_not_allowed",
    ("device_poll", "invalid_grant"): "device_code_rejected",
    ("device_poll", "access_denied"): "device_denied",
    ("device_poll", "expired_token"): "device_code_expired",
    ("device_poll", "*"): "token_request_failed",
    ("revocation", "invalid_client"): "client_rejected",
    ("revocation", "*"): "revocation_failed",
    ("par", "invalid_client"): "client_rejected",
    ("par", "unauthorized_client"): "client_rejected",
    ("par", "invalid_scope"): "scope_refused",
    ("par", "*"): "par_refused",
    # RFC 9126 section 4 (RFC 9101 section 7): a request_uri the server no longer holds, expired or used
    ("authorization", "invalid_request_uri"): "request_uri_expired",
    ("redirect", "invalid_request_uri"): "request_uri_expired",
}

# Where a client without CLIENT_SECRET is told "a secret is expected" rather than "check the credentials".
# The device endpoints say the latter either way. "401" is a bare 401 at revocation (no error body).
OAUTH_ERRORS_WITHOUT_SECRET: dict[tuple[str, str], str] = {
    ("token", "invalid_client"): "client_secret_missing",
    ("refresh", "invalid_client"): "client_secret_missing",
    ("revocation", "invalid_client"): "client_secret_missing",
    ("revocation", "401"): "client_secret_missing",
    ("par", "invalid_client"): "client_secret_missing",
}

ENDPOINT_TITLES = {"token": "token endpoint", "refresh": "token endpoint",
                   "device_authorization": "device authorization endpoint", "device_poll": "token endpoint",
                   "revocation": "revocation endpoint", "par": "pushed authorization request endpoint"}


# Secrets seen during the run; every log record and error message passes through redact().
_SECRETS: set[str] = set()


def remember_secret(*values: object) -> None:
    """Register values that must never be printed (tokens, client secret, code, PKCE verifier)."""
    for value in values:
        # Shorter strings are no credential any server issues, and replacing them would mangle ordinary words
        # ("[redacted]" in every "the") in every message.
        if isinstance(value, str) and len(value) >= 4:
            _SECRETS.add(value)


def redact(text: str) -> str:
    """Replace every known secret in text: the last line of defence for messages and logs."""
    for value in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(value, "[redacted]")
    return text


def warn(message: str) -> None:
    """A warning does not stop the run; it still goes to stderr, never stdout."""
    print(f"fetch_memos: warning: {terminal_text(message)}", file=sys.stderr, flush=True)


def say(message: str = "") -> None:
    """Prompts and progress go to stderr, so that stdout carries only the API's JSON."""
    print(terminal_text(message), file=sys.stderr, flush=True)


def prompt() -> None:
    """The "> " the person types after; the line stays open for their answer."""
    print("> ", end="", file=sys.stderr, flush=True)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything behind it: requests wraps urllib3, which wraps the socket error."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        reason = getattr(current, "reason", None)  # urllib3's wrappers; ssl.SSLError.reason is a str
        todo += [current.__cause__, current.__context__, reason if isinstance(reason, BaseException) else None]
        todo += [arg for arg in getattr(current, "args", ()) if isinstance(arg, BaseException)]


def _describe_request_error(exc: Exception, url: str, timeout: float) -> str:
    """Say in words what went wrong on the wire, naming the URL."""
    import requests
    from urllib3 import exceptions as urllib3_errors
    from urllib3.exceptions import ConnectTimeoutError, ReadTimeoutError

    # NameResolutionError is urllib3 2's; 1.26 (which requests 2.31 admits) leaves the socket.gaierror as the cause.
    lookup_failed = (socket.gaierror, getattr(urllib3_errors, "NameResolutionError", socket.gaierror))
    causes = list(_causes(exc))
    if any(isinstance(c, lookup_failed) for c in causes):
        return f"cannot resolve the host of {url} (DNS lookup failed; check the URL and your network)"
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return f"cannot reach {url}: connection refused (is the server running?)"
    if isinstance(exc, requests.exceptions.ConnectTimeout) or any(isinstance(c, ConnectTimeoutError) for c in causes):
        return f"could not connect to {url} within {timeout:g} s"
    if isinstance(exc, requests.exceptions.Timeout) or any(isinstance(c, ReadTimeoutError) for c in causes):
        return f"{url} did not answer within {timeout:g} s"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return f"the connection to {url} broke off in the middle of the answer"
    if isinstance(exc, requests.exceptions.SSLError):
        return f"the TLS connection to {url} failed (certificate problem?)"
    if isinstance(exc, requests.exceptions.ConnectionError):
        if any(isinstance(c, OSError) and getattr(c, "errno", None) for c in causes):
            errors = [c for c in causes if isinstance(c, OSError) and c.errno]
            if errors[0].errno in (errno.ECONNRESET, errno.EPIPE):
                return f"the connection to {url} was reset before an answer arrived"
            return f"cannot reach {url}: {errors[0].strerror or errors[0]}"
        return f"the connection to {url} broke off before an answer arrived"
    return f"the request to {url} failed ({type(exc).__name__})"


def request_failed(exc: Exception, url: str, timeout: float, context: str = "") -> FetchMemosError:
    """The one way a requests exception becomes our error: what went wrong on the wire, then the context."""
    return tls_failure(exc, url) or ServerError(_describe_request_error(exc, url, timeout) + context + ".")


# OpenSSL's verify codes (X509_V_ERR_*) and what they mean for the person; anything else is "untrusted".
_TLS_EXPIRED = {10}  # CERT_HAS_EXPIRED
_TLS_WRONG_HOST = {62, 64}  # HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH
_TLS_WHY = {18: "self-signed certificate", 19: "self-signed certificate in its chain",
            20: "issued by an unknown CA", 21: "issued by an unknown CA", 9: "not yet valid"}


def tls_failure(exc: BaseException, url: str) -> FetchMemosError | None:
    """A TLS failure in one line naming the host and what is wrong; None when exc is no TLS failure.

    The verify code, not the text, decides: OpenSSL's wording changes between versions. "Not TLS at all" (https
    to an http port) shows as a record-layer error (WRONG_VERSION_NUMBER, or "record layer failure" in 3.2+).
    """
    import ssl

    causes = list(_causes(exc))
    failed = next((c for c in causes if isinstance(c, ssl.SSLCertVerificationError)), None)
    parts = urlsplit(url)
    host = parts.hostname or url
    if failed is not None:
        code = getattr(failed, "verify_code", None)
        if code is None:  # the host name was checked in Python (ssl.match_hostname: urllib3 1.26), not by OpenSSL
            said: Any = failed.args[0] if failed.args else failed
            while isinstance(said, tuple) and said:  # urllib3 1.26 passes its words as a tuple
                said = said[0]
            return fail("tls_wrong_host", host=host, url=url, why=_printable(str(said), 120).rstrip("."))
        why = _printable(failed.verify_message or "verification failed", 120).rstrip(".")
        if code in _TLS_EXPIRED:
            return fail("tls_expired", host=host, url=url)
        if code in _TLS_WRONG_HOST:
            return fail("tls_wrong_host", host=host, url=url, why=why)
        return fail("tls_untrusted", host=host, url=url, why=_TLS_WHY.get(code, why))
    other = next((c for c in causes if isinstance(c, ssl.SSLError)), None)
    if other is None:
        return None
    reason = str(getattr(other, "reason", "") or other)
    if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG"):
        return fail("tls_not_tls", host=host, url=url, port=parts.port or 443, why=_printable(reason.lower(), 60))
    return fail("tls_failed", host=host, url=url, why=_printable(reason or type(other).__name__, 120))


# ---------------------------------------------------------------------------------------------
# 3. Files: the token store (the only code that opens the token file) and the metadata cache.
# ---------------------------------------------------------------------------------------------

MAX_TOKEN_FILE_BYTES = 64 * 1024
META_KEY = "fetch_memos"  # our keys, beside the token fields the server sent
OTHER_GRANTS = "other_grants"  # in META_KEY of the grant saved last: the grants of other servers and clients
MAX_GRANTS = 16  # grants kept side by side; past that the one saved longest ago goes


class _LegacyOAuth2Token(dict):
    """Stands in for oauthlib's OAuth2Token, which the original script pickled, so loading runs none of its code."""


class _TokenUnpickler(pickle.Unpickler):
    """Allows plain data and the one class the original script wrote; nothing else is ever resolved."""

    ALLOWED: ClassVar[dict[tuple[str, str], type]] = {
        ("oauthlib.oauth2.rfc6749.tokens", "OAuth2Token"): _LegacyOAuth2Token,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent reference")


MAX_PICKLE_MEMO_SLOTS = 4096  # a token needs a few dozen


# Calls, extension-registry and buffer opcodes, and Python 2 byte strings: no token ever needs them.
_REFUSED_OPCODES = frozenset({"REDUCE", "INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID",
                              "NEWOBJ_EX", "BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER",
                              "STRING", "BINSTRING", "SHORT_BINSTRING"})


def _check_opcodes(data: bytes) -> None:
    """Read the pickle's opcodes without running any, and refuse what a token never needs.

    The C unpickler sizes its memo by the largest index a PUT names, so nine bytes could make it
    allocate gigabytes; and REDUCE-like opcodes are how a pickle calls things.
    """
    import pickletools
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # genops decodes arguments first and may warn about odd escapes
            for opcode, arg, _pos in pickletools.genops(data):
                if opcode.name in _REFUSED_OPCODES:
                    raise BadTokenFile(f"it is not a token file (it uses the {opcode.name} opcode)")
                if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET") and (
                        not isinstance(arg, int) or arg > MAX_PICKLE_MEMO_SLOTS):
                    raise BadTokenFile("it is damaged (an out-of-range memo index)")
    except (ValueError, TypeError) as exc:
        raise BadTokenFile(f"it is damaged or truncated ({exc})") from None


def parse_token_bytes(data: bytes) -> dict[str, Any]:
    """Turn the file's bytes into a token dict (the grant saved last, its META_KEY holding the others), or raise
    BadTokenFile; never runs code from the file."""

    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise BadTokenFile(f"it is {len(data)} bytes, far more than a token")
    _check_opcodes(data)
    try:
        obj = _TokenUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise BadTokenFile(f"it is not a token file ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - a damaged pickle can fail in many ways, all meaning "not a token"
        raise BadTokenFile(f"it is damaged or truncated ({type(exc).__name__})") from None
    token = check_grant(obj)
    others = token[META_KEY].get(OTHER_GRANTS, []) if META_KEY in token else []
    if not isinstance(others, list):
        raise BadTokenFile(f"its {META_KEY} {OTHER_GRANTS} is not a list")
    for other in others:
        if OTHER_GRANTS in check_grant(other).get(META_KEY, {}):
            raise BadTokenFile(f"a grant in its {META_KEY} {OTHER_GRANTS} holds grants itself")
    return token


def check_grant(obj: Any) -> dict[str, Any]:
    """One grant as the file holds it: the server's token fields plus our META_KEY; else BadTokenFile."""
    if not isinstance(obj, dict):
        raise BadTokenFile(f"it holds a {type(obj).__name__}, not a token")
    token = dict(obj)
    access_token = token.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise BadTokenFile("it holds no access token")
    for key in ("refresh_token", "token_type"):
        if key in token and not isinstance(token[key], (str, type(None))):
            raise BadTokenFile(f"its {key} is not text")
    for key in ("expires_at", "expires_in"):
        if key in token and (isinstance(token[key], bool) or not isinstance(token[key], (int, float, type(None)))):
            raise BadTokenFile(f"its {key} is not a number")
    for key in ("expires_at", "expires_in"):
        if isinstance(token.get(key), (int, float)) and not -1e11 < token[key] < 1e11:
            raise BadTokenFile(f"its {key} is not a usable number")
    scope = token.get("scope")
    if not (scope is None or isinstance(scope, str)
            or (isinstance(scope, list) and all(isinstance(item, str) for item in scope))):
        raise BadTokenFile("its scope is not text")
    meta = token.get(META_KEY, {})
    if not isinstance(meta, dict):
        raise BadTokenFile(f"its {META_KEY} entry is not a mapping")
    for key in ("server_url", "token_url", "api_url", "client_id"):
        if key in meta and not isinstance(meta[key], str):
            raise BadTokenFile(f"its {META_KEY} {key} is not text")
    if "scope" in meta and not (isinstance(meta["scope"], list) and all(isinstance(s, str) for s in meta["scope"])):
        raise BadTokenFile(f"its {META_KEY} scope is not a list of text")
    dpop = meta.get("dpop", {})
    if not (isinstance(dpop, dict) and all(isinstance(part, dict) and all(isinstance(v, str) for v in part.values())
                                           for part in dpop.values())):
        raise BadTokenFile(f"its {META_KEY} dpop entry is not a key and nonces")
    if dpop.get("jwk") and not all(isinstance(dpop["jwk"].get(name), str) for name in ("kty", "crv", "x", "y", "d")):
        raise BadTokenFile(f"its {META_KEY} dpop key is not an EC private key")
    if META_KEY in token:
        token[META_KEY] = dict(meta)
    return token


# How every file of ours is opened: never through a symlink in its place (O_NOFOLLOW), never waiting on a FIFO or a
# device (O_NONBLOCK: opening a FIFO with no writer, or a tty, would block the run), never becoming a controlling
# terminal; binary on Windows, whose os.open otherwise translates line ends. Flags a platform lacks count as 0.
_OPEN_SAFELY = (getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
                | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))


class UntrustedFile(Exception):
    """A file at one of our paths that the rule below refuses; `regular` says whether it is a file we may set aside."""

    def __init__(self, reason: str, regular: bool) -> None:
        super().__init__(reason)
        self.regular = regular


def _file_kind(mode: int) -> str:
    import stat

    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return kind
    return "not a regular file"


def not_ours(st: os.stat_result) -> UntrustedFile | None:
    """Why a file is not one of ours: not a regular file, or (POSIX) another user's. None when it is ours.

    Windows: st_uid is always 0 and st_mode says nothing about ACLs, so only the file type is judged there.
    """
    import stat

    if not stat.S_ISREG(st.st_mode):
        return UntrustedFile(f"it is {_file_kind(st.st_mode)}, not a regular file", stat.S_ISLNK(st.st_mode))
    if sys.platform != "win32" and st.st_uid != os.geteuid():
        return UntrustedFile(f"it belongs to another user (uid {st.st_uid})", True)
    return None


def why_untrusted(st: os.stat_result) -> UntrustedFile | None:
    """OpenSSH's rule for a private key (sshkey_perm_ok): ours, and nobody else may change it; plus a regular file.

    Only the file is judged, not its folders (OpenSSH's safe_path walk is for authorized_keys, not keys). Whatever
    another user can put at our path, by creating it or by renaming it over ours in a folder they may write, is a
    file they own, which this rule refuses; the check is made on the open descriptor, so a swap after it changes
    nothing read. A folder others can write still lets them delete or rename our files: that costs a login, and
    leaks no secret and redirects no request, while refusing such folders would refuse every shared or
    group-writable setup (umask 002 with a group per user is common) and OpenSSH does not refuse them for keys.
    """
    refused = not_ours(st)
    if refused is None and sys.platform != "win32" and st.st_mode & 0o022:
        refused = UntrustedFile(f"other users can change it (mode {st.st_mode & 0o777:o})", True)
    return refused


def open_trusted(path: Path) -> int:
    """A read-only descriptor for path if why_untrusted accepts it; else UntrustedFile, or OSError (absent, etc.).

    A symlink in its place is refused, never followed: these files are replaced by rename, which replaces a link,
    not its target, so a followed link would be read in one place and written in another (and a link planted by
    another user could point anywhere). Point OAUTH_TOKEN_FILE at the real file instead.
    """
    if not getattr(os, "O_NOFOLLOW", 0) and os.path.islink(path):  # Windows: no O_NOFOLLOW, so look first
        raise UntrustedFile("it is a symbolic link, not a regular file", True)
    try:
        fd = os.open(path, os.O_RDONLY | _OPEN_SAFELY)
    except OSError:
        try:  # O_NOFOLLOW's ELOOP (EMLINK on FreeBSD), or EACCES on another user's 0600 file: say which
            refused = why_untrusted(os.lstat(path))
        except OSError:
            refused = None
        if refused is not None:
            raise refused from None
        raise
    refused = why_untrusted(os.fstat(fd))
    if refused is not None:
        os.close(fd)
        raise refused
    return fd


MAX_KEY_BYTES = 64 * 1024  # a PEM private key is a few KiB even for RSA 8192


def read_client_key(path: Path) -> bytes:
    """The PEM text of OAUTH_CLIENT_KEY, refused as OpenSSH refuses a private key (sshkey_perm_ok): a regular file
    of ours that nobody else can read or change (mode & 077 == 0). A symlink is followed, as OpenSSH follows one to
    a key; the checks are made on the open descriptor, so what is checked is what is read."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise fail("client_key_unreadable", path=path, problem=getattr(exc, "strerror", None) or exc) from None
    try:
        st = os.fstat(fd)
        refused = not_ours(st)  # a folder or a FIFO, checked before reading it
        if refused is not None:
            raise fail("client_key_untrusted", path=path, why=refused)
        if sys.platform != "win32" and st.st_mode & 0o077:
            raise fail("client_key_exposed", path=path, mode=f"{st.st_mode & 0o777:o}")
        data = os.read(fd, MAX_KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_BYTES or b"-----BEGIN " not in data or b"PRIVATE KEY-----" not in data:
        raise fail("client_key_unusable", path=path, problem="it is not a PEM private key (-----BEGIN ... PRIVATE "
                                                            "KEY-----)")
    text = data.decode("ascii", "replace")
    remember_secret(text, *(line.strip() for line in text.splitlines() if "-----" not in line))
    return data


def _same_token(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a.get("access_token") == b.get("access_token") and a.get("refresh_token") == b.get("refresh_token")


def _file_lock_functions() -> tuple[Any, Any]:
    """(try_lock, unlock) for an open file descriptor: flock on POSIX, msvcrt.locking on Windows.

    Both locks belong to the open file and die with the process, so a killed run never leaves a stale lock.
    """
    if sys.platform == "win32":
        import msvcrt

        def try_lock(fd: int) -> None:
            os.lseek(fd, 0, os.SEEK_SET)  # msvcrt locks bytes from the current position: always byte 0
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)

        def unlock(fd: int) -> None:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

        return try_lock, unlock
    try:
        import fcntl
    except ImportError:  # neither POSIX nor Windows (e.g. WASI): runs are then not serialised
        return None, None
    return (lambda fd: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)), (lambda fd: fcntl.flock(fd, fcntl.LOCK_UN))


# What a non-blocking lock attempt raises while another run holds the lock (msvcrt: EACCES or EDEADLOCK).
_LOCK_BUSY = {errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, getattr(errno, "EDEADLOCK", errno.EDEADLK)}


def _temp_files(path: Path) -> str:
    """The glob of write_private_file's temporary names for path: .NAME.PID.RANDOM.tmp, in the same folder."""
    return f".{path.name}.*.tmp"


def remove_stale_temp_files(path: Path) -> None:
    """A run killed while writing leaves its temp file, which may hold a token: remove it once its writer is gone."""
    for stale in path.parent.glob(_temp_files(path)):
        if sys.platform == "win32":
            # os.kill(pid, 0) there would send CTRL_C_EVENT (= 0) or terminate the process, not probe it:
            # a writer holds its temp file for milliseconds, so one a minute old is stale.
            with contextlib.suppress(OSError):
                if time.time() - stale.stat().st_mtime > 60:
                    stale.unlink()
            continue
        try:
            pid = int(stale.name[len(path.name) + 2:].split(".")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                stale.unlink()
        except (ValueError, OSError):
            continue


def write_private_file(path: Path, data: bytes) -> None:
    """Replace path with data, mode 0600, atomically: a crash at any moment leaves the old file or the new, whole.

    The temp file is created private (O_EXCL, 0600) in the same folder, so the rename cannot cross file systems
    and no other user ever sees the bytes; fsync before the rename, so the new name never points at unwritten
    data. Raises OSError; the temp file is gone either way.
    """
    remove_stale_temp_files(path)
    tmp = path.with_name(_temp_files(path).replace("*", f"{os.getpid()}.{secrets.token_hex(4)}"))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    with contextlib.suppress(OSError):  # the rename itself survives a crash only once the folder is synced
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


GrantKey = tuple[str, str, str]


def grant_key(token_url: str, client_id: str, api_url: str) -> GrantKey:
    """Which grant a run uses: a token goes back only to the token endpoint and API that it came with, for its client.

    Scope is not part of it: asking for another scope replaces the grant (the server decides what it covers).
    """
    try:
        parts = urlsplit(api_url)
        api_origin = f"{parts.scheme}://{parts.hostname}:{parts.port}"
    except ValueError:  # not a URL we could have written: it matches only itself
        api_origin = api_url
    return token_url, client_id, api_origin


def _key_of(grant: Mapping[str, Any]) -> GrantKey | None:
    """None for a grant written by the original script, which knew one server: whichever run asks adopts it."""
    meta = grant.get(META_KEY) or {}
    if not meta.get("token_url"):
        return None
    return grant_key(meta["token_url"], meta.get("client_id", ""), meta.get("api_url", ""))


def _saved_at(grant: Mapping[str, Any]) -> float:
    saved_at = (grant.get(META_KEY) or {}).get("saved_at")
    return float(saved_at) if isinstance(saved_at, (int, float)) and not isinstance(saved_at, bool) else 0.0


class TokenStore:
    """The pickle file holding the grants, one per GrantKey, plus a lock file beside it that serialises refreshes.

    Several servers and clients live side by side, so a run with a mistyped server or client costs nothing stored:
    switching back finds its grant. One file, not one per key: OAUTH_TOKEN_FILE keeps naming the one place tokens
    are, --status can say what else is there, and one lock covers it all. The grant saved last is the file's top
    level, exactly the format of today's and the original script's one-token files (both still load, as a store of
    one grant), and the others sit in its META_KEY under OTHER_GRANTS. `key` (None: the grant saved last) picks
    the grant that load, save and remove act on.
    """

    def __init__(self, path: Path, key: GrantKey | None = None) -> None:
        self.path = path
        self.key = key
        self.lock_path = path.with_name(path.name + ".lock")
        self._lock_depth = 0
        self._last_saved: dict[str, Any] | None = None
        self._grants: list[dict[str, Any]] = []  # as the last load found them, the grant saved last first

    def _mine(self, grant: Mapping[str, Any], key: GrantKey | None) -> bool:
        theirs = _key_of(grant)
        if key is None or theirs is None:
            return True
        if not key[1]:  # no CLIENT_ID (--status needs none): the grant of any client at this token endpoint and API
            return (theirs[0], theirs[2]) == (key[0], key[2])
        return theirs == key

    def load(self) -> dict[str, Any] | None:
        """This key's grant, or None when there is none; a bad file is set aside, never deleted."""
        self._grants = self._read()
        for grant in self._grants:
            remember_secret(grant.get("access_token"), grant.get("refresh_token"))
        return next((dict(grant) for grant in self._grants if self._mine(grant, self.key)), None)

    def other_servers(self) -> list[str]:
        """The servers of the grants that load() found for other keys, for messages (never their tokens)."""
        return [str((grant.get(META_KEY) or {}).get("server_url") or _key_of(grant)[0])
                for grant in self._grants if not self._mine(grant, self.key)]

    def _read(self) -> list[dict[str, Any]]:
        try:
            fd = open_trusted(self.path)
        except FileNotFoundError:
            return []
        except UntrustedFile as exc:
            if not exc.regular:  # a directory, FIFO or device is not ours to move (it may be /dev/null)
                raise fail("token_file_not_a_file", path=self.path, why=exc) from None
            self._refuse(str(exc))
            return []
        except OSError as exc:
            raise fail("token_file_unreadable", path=self.path, problem=exc.strerror or exc) from None
        with os.fdopen(fd, "rb") as handle:
            mode = os.fstat(fd).st_mode
            data = handle.read(MAX_TOKEN_FILE_BYTES + 1)
            try:
                top = parse_token_bytes(data)
            except BadTokenFile as exc:
                self._refuse(str(exc))
                return []
            # Windows has ACLs, not these bits (its st_mode says 0o666 for any writable file): nothing true to say.
            if mode & 0o077 and sys.platform != "win32":
                try:
                    os.fchmod(fd, 0o600)
                    warn(f"the token file {self.path} was readable by other users (mode {mode & 0o777:o}); "
                         "it is now 0600.")
                except OSError as exc:
                    warn(f"the token file {self.path} is readable by other users (mode {mode & 0o777:o}) and "
                         f"could not be made private ({exc.strerror or exc}): chmod 600 {self.path}")
        others = top.get(META_KEY, {}).pop(OTHER_GRANTS, [])
        return [top, *(check_grant(grant) for grant in others)]

    def save(self, token: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        """Write under the lock, through write_private_file: a crash leaves the old token or the new, never half.

        The file is read again under the lock, so grants another run saved meanwhile for other keys are kept.
        """
        record = {key: value for key, value in token.items() if key != META_KEY}
        record[META_KEY] = {k: v for k, v in meta.items() if k != OTHER_GRANTS} | {"saved_at": time.time()}
        if self._last_saved is not None and _same_token(self._last_saved, record) and (
                self._last_saved[META_KEY].get("dpop") == record[META_KEY].get("dpop")):  # DPoP nonces change alone
            return
        key = _key_of(record)
        with self.locked():
            try:
                grants = self._read()
            except ConfigError:  # not a regular file: the rename below replaces it, or says why it cannot
                grants = []
            self._write([record, *(grant for grant in grants if not self._mine(grant, key))])
        self._last_saved = record

    def remove(self) -> list[str]:
        """Forget this key's grant (the whole file without a key); the file and its lock go with the last grant.

        Returns the servers whose grants stay."""
        with self.locked():
            self._grants = [grant for grant in self._read() if not self._mine(grant, self.key)] if self.key else []
            if self._grants:
                self._write(self._grants)
                return self.other_servers()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            if self._lock_depth:  # held: a waiting run sees its file is gone and locks the new one (Windows
                # cannot delete an open file: the lock file stays there)
                with contextlib.suppress(OSError):
                    self.lock_path.unlink()
        return []

    def _write(self, grants: list[dict[str, Any]]) -> None:
        """The first grant on top, the others (newest first, MAX_GRANTS at most, within the size cap) in its meta."""
        top, others = grants[0], sorted(grants[1:], key=_saved_at, reverse=True)[:MAX_GRANTS - 1]
        while True:
            record = dict(top)
            if others:
                record[META_KEY] = {**record.get(META_KEY, {}), OTHER_GRANTS: others}
            data = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
            if len(data) <= MAX_TOKEN_FILE_BYTES or not others:  # a file we wrote is never refused by a later run
                break
            others = others[:-1]
        try:
            write_private_file(self.path, data)
        except OSError as exc:
            raise TokenNotSaved(f"the token could not be saved to {self.path}: {exc.strerror or exc}") from None

    def _refuse(self, reason: str) -> None:
        aside = self.set_aside()
        warn(f"the token file {self.path} was not usable: {reason}. It was set aside as {aside}.")

    def set_aside(self, label: str = "bad") -> Path:
        """Keep a file we will not use under a new name instead of deleting it: nothing is lost."""
        stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.{label}-{stamp}-{secrets.token_hex(2)}")
        try:
            os.replace(self.path, aside)  # renames a symlink itself, never its target
        except OSError as exc:
            raise fail("token_file_stuck", path=self.path, problem=exc.strerror or exc) from None
        if sys.platform != "win32":
            self._make_private(aside)
        return aside

    @staticmethod
    def _make_private(path: Path) -> None:
        """A set-aside file may still hold tokens: make it 0600, through a descriptor so a link is never followed."""
        import stat

        try:
            fd = os.open(path, os.O_RDONLY | _OPEN_SAFELY)
        except OSError:
            return  # a symlink (left as it is), or another user's file we cannot even read
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
                os.fchmod(fd, 0o600)
        except OSError as exc:
            warn(f"{path} could not be made private ({exc.strerror or exc}); whoever could read it still can.")
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def locked(self, wait: float = LOCK_WAIT_SECONDS) -> Iterator[None]:
        """An exclusive lock across runs; the kernel drops it when a run dies, so it never goes stale."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        try_lock, unlock = _file_lock_functions()
        fd = self._open_lock() if try_lock is not None else None
        if fd is not None:
            deadline = time.monotonic() + wait
            while True:
                try:
                    try_lock(fd)
                    if self._is_current_lock(fd):
                        break
                    os.close(fd)  # removed by a logout while we waited: lock the file that is there now
                    fd = self._open_lock()
                    if fd is None:
                        break
                except OSError as exc:
                    if exc.errno not in _LOCK_BUSY:
                        os.close(fd)
                        raise
                    if time.monotonic() > deadline:
                        os.close(fd)
                        raise TokenFileBusy(f"another fetch_memos run has held {self.lock_path} for over "
                                            f"{wait:g} s; try again when it has finished.") from None
                    time.sleep(0.02)
        self._lock_depth = 1
        try:
            yield
        finally:
            self._lock_depth = 0
            if fd is not None:
                with contextlib.suppress(OSError):
                    unlock(fd)
                os.close(fd)

    def _is_current_lock(self, fd: int) -> bool:
        """Whether the file locked is still the one at lock_path (remove() deletes it while holding it)."""
        if sys.platform == "win32":
            return True  # an open file cannot be deleted there
        try:
            here, held = os.lstat(self.lock_path), os.fstat(fd)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)

    def _open_lock(self) -> int | None:
        """The lock file's descriptor, or None to go on unlocked (refreshes are then not serialised, nothing else).

        Never through a symlink (a planted link would have us create or chmod its target), never a FIFO or device,
        never another user's file (its owner could hold the lock forever). Its content means nothing, so a lock of
        ours that others may open is simply made 0600 again.
        """
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | _OPEN_SAFELY, 0o600)
        except OSError as exc:
            refused = None
            with contextlib.suppress(OSError):
                refused = not_ours(os.lstat(self.lock_path))
            if refused is None:  # e.g. no folder yet: saving there fails later, with its own words
                log.debug("no lock file at %s (%s); continuing without a lock", self.lock_path, exc)
                return None
        else:
            st = os.fstat(fd)
            refused = not_ours(st)
            if refused is None:
                if st.st_mode & 0o077 and sys.platform != "win32":
                    with contextlib.suppress(OSError):
                        os.fchmod(fd, 0o600)
                return fd
            os.close(fd)
        warn(f"the lock file {self.lock_path} was not used: {refused}. Runs are not serialised until it is "
             "removed.")
        return None


class MetadataCache:
    """The issuer's metadata, kept in a small JSON file beside the token file so a warm run asks nothing.

    A file of its own, not a field in the token file: it is written before any token exists, and
    writing it never races a refresh that rotates the token.
    """

    def __init__(self, token_file: Path) -> None:
        self.path = token_file.with_name(token_file.name + ".metadata.json")

    def load(self, issuer: str, now: float | None = None) -> dict[str, Any] | None:
        """The cached record for this issuer while it is fresh; None when absent, stale, damaged or another issuer's.

        A file the token file's rule refuses is ignored with a warning: its endpoints would receive the secrets.
        """
        now = time.time() if now is None else now
        try:
            with os.fdopen(open_trusted(self.path), "rb") as handle:
                record = json.loads(handle.read(MAX_METADATA_BYTES + 1).decode("utf-8"))
        except UntrustedFile as exc:
            warn(f"the server metadata cached in {self.path} was not used: {exc}.")
            return None
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("issuer") != issuer:
            return None
        fetched_at = record.get("fetched_at")
        if isinstance(fetched_at, bool) or not isinstance(fetched_at, (int, float)):
            return None
        if not now - METADATA_MAX_AGE < fetched_at <= now + 300:  # stale, or written by a clock far ahead
            return None
        endpoints = record.get("endpoints")
        if not isinstance(endpoints, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in endpoints.items()):
            return None
        return record

    def save(self, record: Mapping[str, Any]) -> None:
        try:
            write_private_file(self.path, json.dumps(record, indent=1).encode("utf-8"))
        except OSError as exc:
            warn(f"the server metadata could not be cached in {self.path} ({exc.strerror or exc}); each run "
                 "will fetch it again.")

    def load_resource(self, api_url: str, now: float | None = None) -> dict[str, Any] | None:
        """The API's protected resource metadata (RFC 9728) as last found, while fresh: {"issuer": ""} when the API
        published none, so an API without it is not asked again on every run."""
        now = time.time() if now is None else now
        try:
            with os.fdopen(open_trusted(self.path), "rb") as handle:
                record = json.loads(handle.read(MAX_METADATA_BYTES + 1).decode("utf-8"))
        except (UntrustedFile, OSError, ValueError):
            return None  # load() warns about an untrusted file
        found = record.get("protected_resource") if isinstance(record, dict) else None
        if not isinstance(found, dict) or found.get("api_url") != api_url:
            return None
        fetched_at = found.get("fetched_at")
        if isinstance(fetched_at, bool) or not isinstance(fetched_at, (int, float)):
            return None
        if not now - METADATA_MAX_AGE < fetched_at <= now + 300:
            return None
        if not all(isinstance(found.get(key, ""), str) for key in ("issuer", "resource", "url")):
            return None
        return found

    def forget(self) -> None:
        """An endpoint taken from the metadata failed: the next run asks the server again."""
        with contextlib.suppress(OSError):
            self.path.unlink()


class ClientRegistrations:
    """The clients this script registered itself (RFC 7591), by issuer, in a private file beside the token file.

    Beside the token, guarded as it is (0600, atomic, refused when others could have written it): a registered
    client secret is a secret. Not inside the token file, because a registration outlives its tokens: --logout
    ends the grant and keeps the client, so the next login needs no new registration (--forget-client drops it).
    """

    def __init__(self, token_file: Path) -> None:
        self.path = token_file.with_name(token_file.name + ".clients.json")

    def _read(self) -> dict[str, Any]:
        try:
            with os.fdopen(open_trusted(self.path), "rb") as handle:
                data = json.loads(handle.read(MAX_TOKEN_FILE_BYTES + 1).decode("utf-8"))
        except FileNotFoundError:
            return {}
        except UntrustedFile as exc:
            warn(f"the client registrations in {self.path} were not used: {exc}.")
            return {}
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def load(self, issuer: str, now: float | None = None) -> dict[str, Any] | None:
        """This issuer's registration, or None: none, damaged, or its client secret expired (RFC 7591 section 3.2.1:
        client_secret_expires_at, 0 for never)."""
        record = self._read().get(issuer)
        if not isinstance(record, dict) or not isinstance(record.get("client_id"), str) or not record["client_id"]:
            return None
        secret, expires = record.get("client_secret", ""), record.get("client_secret_expires_at", 0)
        if not isinstance(secret, str) or isinstance(expires, bool) or not isinstance(expires, (int, float)):
            return None
        if secret and expires and expires <= (time.time() if now is None else now):
            return None
        remember_secret(secret)
        return record

    def save(self, issuer: str, record: Mapping[str, Any]) -> None:
        data = self._read()
        data[issuer] = dict(record)
        try:
            write_private_file(self.path, json.dumps(data, indent=1).encode("utf-8"))
        except OSError as exc:
            warn(f"the client registration could not be kept in {self.path} ({exc.strerror or exc}); the next run "
                 "will register again.")

    def forget(self, issuer: str) -> bool:
        """Drop this issuer's registration (the file with the last one); whether there was one."""
        data = self._read()
        if data.pop(issuer, None) is None:
            return False
        if data:
            write_private_file(self.path, json.dumps(data, indent=1).encode("utf-8"))
        else:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        return True


# ---------------------------------------------------------------------------------------------
# 4. Server metadata: the API's protected resource metadata (RFC 9728) when starting from the API alone, the
#    issuer's metadata (RFC 8414), dynamic client registration (RFC 7591) -> the endpoints and client a run uses.
# ---------------------------------------------------------------------------------------------

METADATA_MAX_AGE = 24 * 3600  # seconds a cached copy is trusted; servers rarely move their endpoints
MAX_METADATA_BYTES = 256 * 1024
_AS_METADATA = "/.well-known/oauth-authorization-server"
_OIDC_METADATA = "/.well-known/openid-configuration"


def metadata_urls(issuer: str) -> list[str]:
    """Where an issuer's metadata may be, in the order asked; a URL two rules give alike is asked once.

    RFC 8414 section 3.1 puts the well-known name between the host and the issuer's path; some servers
    (django-oauth-toolkit) serve it after the path instead, and OpenID Connect Discovery appends
    openid-configuration to the issuer.
    """
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")  # section 3.1: a terminating "/" is removed before inserting
    base = f"{parts.scheme}://{parts.netloc}{path}"
    candidates = [f"{parts.scheme}://{parts.netloc}{_AS_METADATA}{path}", base + _AS_METADATA, base + _OIDC_METADATA]
    return list(dict.fromkeys(candidates))


_RESOURCE_METADATA = "/.well-known/oauth-protected-resource"
MAX_CHALLENGE_CHARS = 8192  # a WWW-Authenticate header longer than this is read only this far


def parse_challenges(header: str) -> list[tuple[str, dict[str, str]]]:
    """The challenges of a WWW-Authenticate header (RFC 9110 section 11.6.1): [(scheme lower-cased, {param: value})].

    A server's text: bounded, and never trusted further than a value compared or sanitized before it is shown.
    A token68 or anything else unparsable is skipped, never an error.
    """
    import re

    token = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
    item = re.compile(rf'\s*({token})(?:\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,"]*))?\s*(?:,|(?=\s)|$)')
    challenges: list[tuple[str, dict[str, str]]] = []
    text, pos = header[:MAX_CHALLENGE_CHARS], 0
    while pos < len(text):
        match = item.match(text, pos)
        if match is None or match.end() == pos:
            pos += 1  # a stray character: skip it
            continue
        pos = match.end()
        name, value = match.group(1), match.group(2)
        if value is None:
            challenges.append((name.lower(), {}))
        elif challenges:
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            challenges[-1][1].setdefault(name.lower(), value)
    return challenges


def bearer_challenge(response: requests.Response) -> dict[str, str]:
    """The parameters of a 401's Bearer (or DPoP, RFC 9449) challenge; {} without one."""
    for scheme, params in parse_challenges(response.headers.get("WWW-Authenticate", "")):
        if scheme in ("bearer", "dpop"):
            return params
    return {}


def resource_metadata_url(api_url: str) -> str:
    """RFC 9728 section 3.1: the well-known name inserted between the host and the API URL's path."""
    parts = urlsplit(api_url)
    path = "" if parts.path == "/" else parts.path
    return parts._replace(path=_RESOURCE_METADATA + path, fragment="").geturl()


def check_resource_metadata(document: object, url: str, api_url: str) -> str:
    """The issuer a protected resource metadata document names, or the refusal (RFC 9728 sections 3.2, 3.3, 7)."""
    if not isinstance(document, dict):
        raise fail("resource_metadata_unusable", url=url, problem="is not a JSON object")
    resource = document.get("resource")
    if resource != api_url:
        # Section 3.3: the resource must be the URL the metadata was found for, the API's, exactly; a document
        # naming another resource (served by someone else, or an attacker) must not choose our server.
        raise fail("resource_mismatch", url=url, resource=_printable(repr(resource), 200), api=api_url)
    servers = document.get("authorization_servers")
    if not isinstance(servers, list) or not servers or not isinstance(servers[0], str) or not servers[0]:
        raise fail("resource_metadata_unusable", url=url, problem="names no authorization server "
                   "(authorization_servers)")
    return servers[0]


def fetch_resource_metadata(settings: Settings) -> dict[str, Any]:
    """Find the API's authorization server from the API alone (RFC 9728): its 401 challenge's resource_metadata,
    else the well-known URL. {"issuer": ""} when the API publishes none (today's defaults apply)."""
    import requests

    api = settings.api_url
    session = transport_session(settings)
    context = " (asking the API for its authorization server, RFC 9728)"
    try:
        try:
            response = session.get(api, headers={"Accept": "application/json"}, limit=MAX_METADATA_BYTES,
                                   endpoint="API", follow=False)
        except requests.exceptions.RequestException as exc:
            raise request_failed(exc, api, settings.timeout, context) from None
        named = bearer_challenge(response).get("resource_metadata", "") if response.status_code == 401 else ""
        if named:
            if not same_origin(named, api):  # section 7: only the API we were told about chooses its server
                raise fail("resource_metadata_elsewhere", api=api, url=_printable(named, 200))
            url = _check_url("the API's resource_metadata", named, settings.allow_insecure_http)
        else:
            url = resource_metadata_url(api)
        try:
            response = session.get(url, headers={"Accept": "application/json"}, limit=MAX_METADATA_BYTES,
                                   endpoint="resource metadata", follow=False)
        except requests.exceptions.RequestException as exc:
            raise request_failed(exc, url, settings.timeout, context) from None
    finally:
        session.close()
    log.debug("GET %s -> %s", url, response.status_code)
    none = {"api_url": api, "fetched_at": time.time(), "issuer": "", "url": url}
    if response.status_code >= 500:
        raise fail("resource_metadata_failed", url=url, answered=answered(response))
    try:
        document = response.json() if response.status_code == 200 else None
    except ValueError:
        document = None
    if document is None:
        if named:  # the API named it: a document that is not there is the API's mistake, not "none published"
            raise fail("resource_metadata_unusable", url=url, problem=f"answered {answered(response)}, not JSON")
        return none
    issuer = check_resource_metadata(document, url, api)
    try:
        valid_issuer_setting(issuer, settings.allow_insecure_http)
    except ConfigError:
        raise fail("resource_metadata_unusable", url=url, problem=f"names the authorization server "
                   f"{_printable(issuer, 200)}, which is no https URL of an issuer (or plain http to a remote "
                   "host)") from None
    # Section 2: an API that always requires DPoP-bound tokens says so; a Bearer token would be refused there.
    return {**none, "issuer": issuer, "resource": document["resource"],
            "dpop_required": document.get("dpop_bound_access_tokens_required") is True}


def use_resource_metadata(settings: Settings, found: Mapping[str, Any]) -> Settings:
    """Continue as with OAUTH_ISSUER set to the server the API named; its resource is the resource indicator
    (RFC 8707) unless OAUTH_RESOURCE says otherwise, and DPoP is used when the API requires it (RFC 9728 section 2,
    dpop_bound_access_tokens_required) unless OAUTH_DPOP says otherwise."""
    server = origin_url(found["issuer"])
    defaults = {row.field: row.default.replace("<server>", server) for row in ENDPOINTS
                if settings.source(row.field) == "default" and row.default}
    dpop = settings.dpop if settings.dpop_explicit else found.get("dpop_required") is True
    return settings._replace(**defaults, issuer=found["issuer"], issuer_explicit=True, server_url=server,
                             resource=settings.resource or found["resource"], issuer_via=found["url"], dpop=dpop)


def issuer_named(settings: Settings) -> str:
    """How messages name the issuer: the setting, or the resource metadata that named it."""
    if settings.issuer_via:
        return f"the authorization server {settings.issuer} (named by {settings.issuer_via})"
    return f"OAUTH_ISSUER={settings.issuer}"


def fetch_metadata(settings: Settings) -> dict[str, Any]:
    """Ask the issuer for its metadata (RFC 8414 section 3) and keep what a run needs."""
    import requests

    tried: list[str] = []
    server_failed = False
    session = transport_session(settings)  # bounded, and no redirect to another origin or to plain http
    for url in metadata_urls(settings.issuer):
        tried.append(url)
        try:
            response = session.get(url, headers={"Accept": "application/json"}, limit=MAX_METADATA_BYTES,
                                   endpoint="server metadata")
        except requests.exceptions.RequestException as exc:
            raise request_failed(exc, url, settings.timeout,
                                 " (fetching the server metadata of OAUTH_ISSUER)") from None
        log.debug("GET %s -> %s", url, response.status_code)
        if response.status_code >= 500:
            server_failed = True
        if response.status_code != 200:
            continue
        try:
            document = response.json()
        except ValueError:
            continue
        if not isinstance(document, dict):
            continue
        if document.get("issuer") != settings.issuer:
            # Section 3.3: metadata naming another issuer must not be used (it could send us anywhere).
            # RFC 9728 section 7: the same rule refuses an authorization server the API named that is not it.
            raise fail("named_server_mismatch" if settings.issuer_via else "metadata_issuer_mismatch", url=url,
                       found=_printable(repr(document.get("issuer")), 200), expected=issuer_named(settings))
        endpoints = {row.metadata: document[row.metadata] for row in ENDPOINTS
                     if isinstance(document.get(row.metadata), str) and document[row.metadata]}
        registration = document.get("registration_endpoint")
        return {"issuer": settings.issuer, "fetched_at": time.time(), "url": url, "endpoints": endpoints,
                "registration_endpoint": registration if isinstance(registration, str) else "",
                "authorization_response_iss_parameter_supported":
                    document.get("authorization_response_iss_parameter_supported") is True,
                "require_pushed_authorization_requests":
                    document.get("require_pushed_authorization_requests") is True}
    where = ", ".join(tried)
    if server_failed:
        raise fail("metadata_server_failed", tried=where)
    raise fail("metadata_not_found", issuer=issuer_named(settings), tried=where)


def apply_metadata(settings: Settings, record: Mapping[str, Any]) -> Settings:
    """The settings with every endpoint not set explicitly taken from the metadata."""
    changes: dict[str, Any] = {}
    sources = dict(settings.endpoint_sources)
    for row in ENDPOINTS:
        url = record["endpoints"].get(row.metadata)
        if settings.source(row.field) == "explicit" or not url:
            continue
        changes[row.field] = _check_url(f"the metadata's {row.metadata}", url, settings.allow_insecure_http)
        sources[row.field] = "metadata"
    registration = record.get("registration_endpoint")
    if isinstance(registration, str) and registration:
        changes["registration_url"] = _check_url("the metadata's registration_endpoint", registration,
                                                 settings.allow_insecure_http)
    return settings._replace(**changes, endpoint_sources=sources, metadata_fetched_at=record["fetched_at"],
                   issuer_required=bool(record.get("authorization_response_iss_parameter_supported")),
                   par_required=record.get("require_pushed_authorization_requests") is True)


def resolve_endpoints(settings: Settings, *, fetch: bool = True) -> Settings:
    """Without OAUTH_ISSUER: the settings as they are, and no request. With it: endpoints from the metadata,
    from the cache while it is fresh (so a warm run makes one request, the API call), else from the server.
    `fetch=False` (for --status) never touches the network."""
    cache = MetadataCache(settings.token_file)
    found = None
    if settings.from_api:  # MEMOS_API_URL alone: the API names its server (RFC 9728), or publishes nothing
        found = cache.load_resource(settings.api_url)
        if found is None:
            if not fetch:
                return settings
            found = fetch_resource_metadata(settings)
            cache.save({"protected_resource": found})  # "none published" too: not asked again on every run
        if not found["issuer"]:
            return settings
        settings = use_resource_metadata(settings, found)
    if not settings.issuer_explicit:
        return settings
    record = cache.load(settings.issuer)
    if record is None:
        if not fetch:
            return settings
        record = fetch_metadata(settings)
        cache.save({**record, "protected_resource": found} if found else record)
    return apply_metadata(settings, record)


REGISTERED_CLIENT = {  # RFC 7591 section 2: a native app, public, PKCE and a loopback redirect (RFC 8252)
    "client_name": "fetch_memos", "application_type": "native", "token_endpoint_auth_method": "none",
    "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
}
# RFC 7591 token_endpoint_auth_method -> OAUTH_CLIENT_AUTH, for a server that registered us otherwise than asked
_REGISTERED_AUTH = {"none": "none", "client_secret_basic": "basic", "client_secret_post": "post"}


def registration_request(settings: Settings) -> dict[str, Any]:
    """The client metadata sent to the registration endpoint (RFC 7591 section 3.1)."""
    parts = urlsplit(settings.redirect_uri)
    redirect = parts._replace(netloc=parts.hostname or "").geturl() if parts.port == 0 else settings.redirect_uri
    dpop = {"dpop_bound_access_tokens": True} if settings.dpop else {}  # RFC 9449 section 5.2
    return {**REGISTERED_CLIENT, "redirect_uris": [redirect], **dpop}


def register_client(settings: Settings) -> dict[str, Any]:
    """Register fetch_memos at the server (RFC 7591 section 3) and return what is kept: never redirected, bounded."""
    import requests

    url = settings.registration_url
    headers = {"Accept": "application/json"}
    if settings.initial_access_token:
        remember_secret(settings.initial_access_token)
        headers["Authorization"] = f"Bearer {settings.initial_access_token}"
    session = transport_session(settings)
    try:
        response = session.post(url, json=registration_request(settings), headers=headers, endpoint="registration "
                                "endpoint")
    except requests.exceptions.RequestException as exc:
        raise request_failed(exc, url, settings.timeout, " (registering the client, RFC 7591)") from None
    finally:
        session.close()
    log.debug("POST %s -> %s", url, response.status_code)
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if isinstance(answer, dict):
        remember_secret(answer.get("client_secret"), answer.get("registration_access_token"))
    refused = oauth_error(answer) if isinstance(answer, dict) else None
    if response.status_code in (401, 403):
        if not settings.initial_access_token:
            raise fail("registration_needs_token", url=url)
        raise fail("registration_token_rejected", url=url, answered=answered(response),
                   detail=f": {refused.error}" if refused else "")
    if response.status_code >= 500:
        raise fail("endpoint_down", endpoint="registration endpoint", url=url, answered=answered(response))
    if refused is not None and response.status_code >= 400:
        raise fail("registration_refused", url=url, error=refused.error, detail=refused.detail)
    client_id = answer.get("client_id") if isinstance(answer, dict) else None
    if response.status_code not in (200, 201) or not isinstance(client_id, str) or not client_id.isprintable():
        raise fail("registration_unusable", url=url, answered=answered(response))
    secret = answer.get("client_secret")
    expires = answer.get("client_secret_expires_at")
    method = answer.get("token_endpoint_auth_method")
    return {"client_id": client_id, "registered_at": time.time(), "registration_endpoint": url,
            "client_secret": secret if isinstance(secret, str) else "",
            "client_secret_expires_at": expires if isinstance(expires, int) and not isinstance(expires, bool) else 0,
            "client_auth": _REGISTERED_AUTH.get(method, "none") if isinstance(method, str) and secret else "none"}


def use_registration(settings: Settings, record: Mapping[str, Any]) -> Settings:
    return settings._replace(client_id=record["client_id"], client_secret=record.get("client_secret", ""),
                             client_auth=record.get("client_auth", "none"),
                             client_registered_at=record.get("registered_at") or 0.0)


def registered_client(settings: Settings, *, register: bool) -> Settings:
    """Without CLIENT_ID: the client registered at this issuer before, else (register) a new registration.

    A later run never registers again while it holds one; without CLIENT_ID or a registration endpoint there is
    no client, and the person is told how to register one by hand.
    """
    if settings.client_id:
        return settings
    registrations = ClientRegistrations(settings.token_file)
    record = registrations.load(settings.issuer) if settings.issuer_explicit else None
    if record is None and register:
        if not settings.issuer_explicit:
            raise fail("no_resource_metadata", api=settings.api_url)
        if not settings.registration_url:
            raise fail("no_registration", issuer=settings.issuer)
        record = register_client(settings)
        registrations.save(settings.issuer, record)
        say(f"Registered fetch_memos as a client of {settings.issuer} (client id {record['client_id']}; RFC 7591).")
    return use_registration(settings, record) if record is not None else settings


# ---------------------------------------------------------------------------------------------
# 5. Session: OAuth2Session with auto refresh wired to the token store, one client authentication (ClientAuth)
#    and one place for request extras; decides when to refresh.
# ---------------------------------------------------------------------------------------------

RETRY_ATTEMPTS = 2  # extra tries of an idempotent API GET after a connection error or a 502/503/504
RETRY_BACKOFF = 0.5  # seconds, doubling
RETRY_STATUSES = (502, 503, 504)  # a gateway's or an overloaded server's: the request may be sent again
# What one answer may hold, enforced while reading, so that whatever a server sends the run stays under 100 MB.
MAX_ANSWER_BYTES = 64 * 1024  # a token, device or revocation answer: a few KiB even with JWTs in it
MAX_API_BYTES = 4 * 1024 * 1024  # the API's JSON (README: Limits); parsed and printed, still far below 100 MB
MAX_REDIRECTS = 5  # same-origin redirects a GET follows (the API, the metadata)
# JSON nested deeper is refused, on every Python alike: 3.10-3.12 fail near a thousand levels with RecursionError,
# 3.13 parses and prints far deeper; no OAuth or memo answer comes close.
MAX_JSON_DEPTH = 500
READ_CHUNK = 64 * 1024
EXPIRES_IN_MAX = 365 * 24 * 3600  # a longer lifetime is taken as one year (see sane_expires_in)


def refresh_margin(token: Mapping[str, Any]) -> float:
    """Seconds before expiry at which a token counts as expired.

    Doorkeeper truncates created_at to the second and oauthlib rounds expires_at and allows no
    leeway, so a token used in its last second fails at the server: refresh half a minute early,
    or halfway through a shorter lifetime.
    """
    lifetime = token.get("expires_in")
    if isinstance(lifetime, (int, float)) and lifetime > 0:
        return min(30.0, lifetime / 2)
    return 30.0


def is_expiring(token: Mapping[str, Any], now: float | None = None) -> bool:
    expires_at = token.get("expires_at")
    if not isinstance(expires_at, (int, float)):
        return False  # no expiry known: the API's 401 will tell
    return expires_at - refresh_margin(token) <= (time.time() if now is None else now)


def same_origin(a: str, b: str) -> bool:
    """RFC 6454 origins: scheme, host and port (the scheme's default when none is written)."""
    first, second = urlsplit(a), urlsplit(b)
    default = {"http": 80, "https": 443}
    return (first.scheme, first.hostname, first.port or default.get(first.scheme)) == (
        second.scheme, second.hostname, second.port or default.get(second.scheme))


def endpoint_title(settings: Settings, url: str) -> str:
    """How messages name the endpoint a URL is, for the transport's errors."""
    for field, title in (("token_url", "token endpoint"), ("revoke_url", "revocation endpoint"),
                         ("device_authorization_url", "device authorization endpoint"),
                         ("par_url", "pushed authorization request endpoint"), ("api_url", "API")):
        if getattr(settings, field, None) == url:
            return title
    return "server"


def _cut(sock: socket.socket, cut: threading.Event) -> None:
    """The deadline's watchdog: shut the socket, so a read blocked on a trickling server returns at once.

    The plain socket's shutdown even for TLS: SSLSocket.shutdown would drop its SSL object under the reader.
    """
    cut.set()
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _DeadlinePassed(Exception):
    """Raised by the deadline's alarm inside a blocked read of an answer's status line or headers."""


@contextlib.contextmanager
def headers_deadline(deadline: float) -> Iterator[None]:
    """Bound the wait for an answer's status line and headers by the whole request's deadline.

    A server that trickles its headers a byte at a time passes any per-read timeout, and until the headers are in
    there is no socket of ours to cut (read_bounded does that for the body). A SIGALRM timer interrupts the blocked
    read instead, half a second after the deadline, so that a server that sends nothing still meets the per-read
    timeout first and its usual message. Only the main thread receives signals, and Windows has no SIGALRM:
    there, per-read timeouts.
    """
    import signal

    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def passed(_signum: int, _frame: Any) -> None:
        raise _DeadlinePassed

    previous = signal.signal(signal.SIGALRM, passed)
    try:
        signal.setitimer(signal.ITIMER_REAL, max(deadline - time.monotonic(), 0.0) + 0.5)
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def read_bounded(response: requests.Response, *, deadline: float, limit: int, endpoint: str,
                 timeout: float) -> requests.Response:
    """Read a streamed answer whole, but never more than `limit` bytes nor past `deadline` (OAUTH_TIMEOUT is for
    the whole request: a byte every few seconds would pass any per-read timeout)."""
    import requests

    url = response.url
    fp = getattr(getattr(response.raw, "_fp", None), "fp", None)  # http.client's socket file, while unread
    sock = getattr(getattr(fp, "raw", None), "_sock", None)
    cut = threading.Event()
    watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), _cut, (sock, cut)) if sock else None
    chunks: list[bytes] = []
    size = 0
    try:
        if watchdog is not None:
            watchdog.daemon = True
            watchdog.start()
        for chunk in response.iter_content(READ_CHUNK):
            size += len(chunk)
            if size > limit:
                raise fail("answer_too_large", endpoint=endpoint, url=url, limit=_size(limit))
            chunks.append(chunk)
        if cut.is_set() or time.monotonic() > deadline:
            raise fail("answer_too_slow", endpoint=endpoint, url=url, timeout=timeout)
    except requests.exceptions.RequestException:
        response.close()
        if cut.is_set() or time.monotonic() > deadline:
            raise fail("answer_too_slow", endpoint=endpoint, url=url, timeout=timeout) from None
        raise
    except FetchMemosError:
        response.close()
        raise
    finally:
        if watchdog is not None:
            watchdog.cancel()
    body = b"".join(chunks)
    response._content = body
    response._content_consumed = True
    # Said here, once, for every parser after (oauthlib's included). Counting brackets first spares ordinary
    # answers a second parse.
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH:
        try:
            too_deep = nested_deeper_than(json.loads(body), MAX_JSON_DEPTH)
        except RecursionError:  # 3.10-3.12 stop near a thousand levels
            too_deep = True
        except ValueError:
            too_deep = False  # not JSON: the caller says what it expected
        if too_deep:
            raise fail("answer_too_deep", endpoint=endpoint, url=url)
    return response


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether parsed JSON nests arrays and objects more than limit deep; walked with a list, not recursion."""
    pending = [(value, 1)] if isinstance(value, (dict, list)) else []
    while pending:
        item, depth = pending.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        pending.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _size(limit: int) -> str:
    return f"{limit // (1024 * 1024)} MiB" if limit >= 1024 * 1024 else f"{limit // 1024} KiB"


@functools.cache
def _transport_class() -> type:
    """The rules every request of a run follows, as a mixin for requests.Session (built on first use, as below)."""
    import requests

    class Transport:
        """Whole-request deadline, bounded answers, no redirect that could carry a credential elsewhere, the CA
        bundle, and no proxy for loopback. Every request of the run goes through request() here."""

        settings: Settings

        def merge_environment_settings(self, url: str, proxies: Any, stream: Any, verify: Any,
                                       cert: Any) -> dict[str, Any]:
            merged = super().merge_environment_settings(url, proxies, stream, verify, cert)  # type: ignore[misc]
            if is_loopback_host(urlsplit(url).hostname):
                merged["proxies"] = {}  # RFC 8252 section 8.3: loopback traffic never leaves the machine
            if self.settings.ca_bundle:
                merged["verify"] = self.settings.ca_bundle  # explicit beats REQUESTS_CA_BUNDLE
            return merged

        def request(self, method: str, url: str, *args: Any, limit: int = MAX_ANSWER_BYTES, endpoint: str = "",
                    follow: bool = True, **kwargs: Any) -> requests.Response:
            from urllib.parse import urljoin

            settings = self.settings
            endpoint = endpoint or endpoint_title(settings, url)
            deadline = time.monotonic() + settings.timeout
            kwargs.update(allow_redirects=False, stream=True)
            first = url
            auth = kwargs.get("auth") or self.auth  # the request's (ClientAuth), else the session's (DPoPAuth)
            dpop = getattr(auth, "dpop", None)
            nonce_retried = False
            for _hop in range(MAX_REDIRECTS + 2):
                kwargs["timeout"] = max(deadline - time.monotonic(), 0.001)
                try:
                    with headers_deadline(deadline):  # one call is one request: urllib3 never retries
                        response = super().request(method, url, *args, **kwargs)  # type: ignore[misc]
                except _DeadlinePassed:
                    raise fail("answer_too_slow", endpoint=endpoint, url=url, timeout=settings.timeout) from None
                if not response.is_redirect:
                    response = read_bounded(response, deadline=deadline, limit=limit, endpoint=endpoint,
                                            timeout=settings.timeout)
                    if not dpop:
                        return response
                    dpop.saw(response, auth.server)
                    if nonce_retried or not dpop_nonce_asked(response, auth.server):
                        return response
                    # RFC 9449 sections 8 and 9: refused for want of the nonce it now sent, so nothing was used up;
                    # sent once more, as a new request (the auth makes a new proof, and a new client assertion)
                    log.debug("the %s asked for a DPoP nonce; sending the request again with it", endpoint)
                    nonce_retried = True
                    continue
                location = urljoin(response.url, response.headers["Location"])
                response.close()
                if method == "GET" and follow and same_origin(location, url):
                    url = location
                    continue
                answer = f"{response.status_code} {_printable(response.reason or '', 60)}".rstrip()
                shown = _printable(location, 200)
                if url == settings.revoke_url:
                    raise fail("revocation_redirected", url=url, answered=answer, location=shown)
                why = ("a request carrying credentials is never sent on" if method != "GET" else
                       "what names the authorization server is never taken from a redirect (RFC 9728)" if not follow
                       else
                       "it leads to plain http" if urlsplit(url).scheme == "https" and location.startswith("http:")
                       else
                       "it leads to another origin")
                raise fail("redirect_refused", endpoint=endpoint, url=url, answered=answer, location=shown, why=why)
            raise fail("too_many_redirects", url=first, limit=MAX_REDIRECTS)

    class PlainTransport(Transport, requests.Session):
        """The transport without a token: the metadata requests (section 4)."""

    Transport.Plain = PlainTransport
    return Transport


def transport_session(settings: Settings) -> requests.Session:
    """A session following the transport's rules, holding no token (metadata discovery)."""
    session = _transport_class().Plain()
    session.settings = settings
    session.headers["User-Agent"] = f"fetch_memos/{__version__}"
    return session


@functools.cache
def _oauth2_session_class() -> type:
    """The OAuth2Session subclass, built on first use so that --help and --status never import the HTTP stack."""
    from requests_oauthlib import OAuth2Session

    class RefreshingSession(_transport_class(), OAuth2Session):
        """Routes requests-oauthlib's auto refresh through MemoSession.refresh(); the transport's rules on top."""

        memo: MemoSession

        def refresh_token(self, token_url: str, refresh_token: str | None = None, **_kwargs: Any) -> dict:
            # The request kwargs requests-oauthlib passes here (params, ...) would leak into the
            # refresh body; MemoSession.refresh() sends exactly what it means to.
            return self.memo.refresh()

        def plain_refresh(self, refresh_token: str, **kwargs: Any) -> dict:
            return OAuth2Session.refresh_token(self, self.memo.settings.token_url, refresh_token=refresh_token,
                                               **kwargs)

    return RefreshingSession


@contextlib.contextmanager
def _oauthlib_transport(settings: Settings) -> Iterator[None]:
    """Let oauthlib accept the plain-http URLs that Settings already allowed, for one call only.

    oauthlib refuses http unless OAUTHLIB_INSECURE_TRANSPORT is set and has no per-call switch.
    Instead of setting it for the whole process (and for any URL), it is set around calls to
    URLs that passed our own rule (loopback, or the person's explicit opt-in) and then restored.
    """
    name = "OAUTHLIB_INSECURE_TRANSPORT"
    if not settings.uses_plain_http or os.environ.get(name):
        yield
        return
    os.environ[name] = "1"
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _check_token_response(response: requests.Response, settings: Settings) -> requests.Response:
    """Report what the token endpoint really said before oauthlib parses it.

    oauthlib turns an HTML error page into "Missing access token parameter", which hides
    the real cause; a JSON error body is left to oauthlib, which names the OAuth error.
    """
    content_type = response.headers.get("Content-Type", "")
    is_json = "json" in content_type.lower()
    if response.status_code == 401 and not settings.has_credentials and not is_json:
        raise fail("client_secret_missing", url=response.url, error="401 Unauthorized")
    if response.status_code >= 500:
        raise fail("endpoint_down", endpoint="token endpoint", url=response.url, answered=answered(response))
    if response.status_code == 404:
        raise not_found(settings, "token_url", "token endpoint", response.url)
    if not is_json:
        kind = "an HTML page" if "html" in content_type.lower() else (
            "an empty body" if not response.content else f"a {content_type or 'untyped'} body")
        raise fail("token_not_json", url=response.url, status=response.status_code, kind=kind)
    return sane_token_answer(response)


def sane_expires_in(value: object) -> int | None:
    """The one rule for a server's expires_in (RFC 6749 section 5.1: seconds, a positive number): a finite number
    above 0 is kept, at most one year (EXPIRES_IN_MAX); a number that is not (negative, 0, Infinity, NaN) means the
    lifetime is unknown, and the API's 401 will tell. So every token saved loads again. Text that is no number
    raises ValueError: the answer is a malformed token, refused, and nothing is saved."""
    import math

    if isinstance(value, str):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return int(min(value, EXPIRES_IN_MAX))


def sane_token_answer(response: requests.Response) -> requests.Response:
    """The token answer with sane_expires_in applied, before oauthlib turns expires_in into expires_at; JSON that
    is not an object (an array, say) is a malformed token here, in words, not oauthlib's TypeError."""
    try:
        answer = json.loads(response.content)
    except ValueError:
        return response
    if not isinstance(answer, dict):
        raise fail("token_malformed", url=response.url, problem=f"the answer is a JSON {type(answer).__name__}, "
                                                                "not an object")
    if "expires_in" not in answer:
        return response
    try:
        lifetime = sane_expires_in(answer["expires_in"])
    except ValueError:
        return response  # oauthlib refuses it (token_malformed)
    if lifetime == answer["expires_in"] and type(lifetime) is type(answer["expires_in"]):
        return response
    log.debug("expires_in %s taken as %s", _printable(answer["expires_in"], 40), lifetime)
    if lifetime is None:
        del answer["expires_in"]
    else:
        answer["expires_in"] = lifetime
    response._content = json.dumps(answer).encode()
    return response


def _without_scope(url: str, headers: dict, body: str) -> tuple[str, dict, str]:
    """requests-oauthlib's refresh_token_request hook: the refresh body carries no `scope`.

    RFC 6749 section 6: an omitted scope means the scope originally granted. Repeating the configured
    scope fails at a server that granted less (invalid_scope), on every later refresh.
    """
    fields = [(key, value) for key, value in parse_qsl(body, keep_blank_values=True) if key != "scope"]
    return url, headers, urlencode(fields)


def request_extras(settings: Settings) -> dict[str, str]:
    """The parameters every authorization and token request carries beyond the grant's own: the one place to add one.

    RFC 8707 section 2: `resource` on the authorization request, the code and refresh token requests, and the
    device flow's requests (which play their parts). Revocation carries none.
    """
    return {"resource": settings.resource} if settings.resource else {}


CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"  # RFC 7523 section 2.2
# Seconds a client assertion stays valid: enough for a slow request and some clock skew, short enough that one
# seen in transit is soon useless (RFC 7523 section 3, item 4: exp; the server remembers each jti until then).
ASSERTION_LIFETIME = 180


def _b64url(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def load_signing_key(path: str) -> tuple[str, Callable[[bytes], bytes]]:
    """(alg, sign) for OAUTH_CLIENT_KEY: ES256 for an EC P-256 key, RS256 for an RSA key (RFC 7518 section 3).

    The only use of the optional `cryptography` package: the standard library has no asymmetric signatures, and
    only a run that signs with a key imports it.
    """
    try:
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
    except ImportError:
        raise fail("crypto_missing", feature="private_key_jwt") from None
    data = read_client_key(Path(path))
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's way of saying the key is encrypted and no password was given
        raise fail("client_key_unusable", path=path, problem="it is encrypted; write an unencrypted copy (openssl "
                                                            "pkey -in KEY -out NEWKEY) and keep it chmod 600") from None
    except (ValueError, UnsupportedAlgorithm):
        raise fail("client_key_unusable", path=path, problem="cryptography cannot read it as a PEM private "
                                                            "key") from None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise fail("client_key_unusable", path=path, problem=f"it is an EC key on {key.curve.name}; ES256 "
                                                                f"needs P-256 (secp256r1)")

        def sign_es256(signing_input: bytes) -> bytes:
            r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")  # RFC 7518 section 3.4: r || s, not DER

        return "ES256", sign_es256
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:  # RFC 7518 section 3.3
            raise fail("client_key_unusable", path=path, problem=f"its RSA key has {key.key_size} bits; RS256 "
                                                                "needs at least 2048")
        return "RS256", lambda signing_input: key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    raise fail("client_key_unusable", path=path, problem="it is neither an EC P-256 key (ES256) nor an RSA key "
                                                        "(RS256)")


def client_assertion(client_id: str, audience: str, alg: str, sign: Callable[[bytes], bytes], *, kid: str = "",
                     now: float | None = None) -> str:
    """A client assertion (RFC 7523 sections 2.2 and 3; OpenID Connect Core section 9): a compact JWS whose iss
    and sub are the client id, with a fresh jti, so that no two requests ever carry the same one."""
    issued = int(time.time() if now is None else now)
    header = {"alg": alg, "typ": "JWT", **({"kid": kid} if kid else {})}
    claims = {"iss": client_id, "sub": client_id, "aud": audience, "jti": secrets.token_urlsafe(24), "iat": issued,
              "exp": issued + ASSERTION_LIFETIME}
    signing_input = ".".join(_b64url(json.dumps(part, separators=(",", ":")).encode("utf-8"))
                             for part in (header, claims))
    assertion = f"{signing_input}.{_b64url(sign(signing_input.encode('ascii')))}"
    remember_secret(assertion)
    return assertion


def hs256_signer(secret: str) -> Callable[[bytes], bytes]:
    """client_secret_jwt's HMAC-SHA256 with the client secret (RFC 7518 section 3.2): the standard library does."""
    import hashlib
    import hmac

    key = secret.encode("utf-8")
    return lambda signing_input: hmac.new(key, signing_input, hashlib.sha256).digest()


NONCE_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F)) - {'"', "\\"}  # RFC 9449 section 8.1: NQCHAR


def dpop_htu(url: str) -> str:
    """RFC 9449 section 4.2: the request URL without query and fragment, normalized as section 4.3 compares it
    (RFC 3986 sections 6.2.2 and 6.2.3: scheme and host in lower case, the default port left out, "/" for no path)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    netloc = host if port is None or port == {"http": 80, "https": 443}.get(scheme) else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path or '/'}"


def jwk_thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638 section 3: SHA-256 of the key's required members (EC: crv, kty, x, y), sorted, no white space;
    what a DPoP-bound token's cnf.jkt holds and the authorization request's dpop_jkt sends (RFC 9449 section 10)."""
    import hashlib

    members = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    return _b64url(hashlib.sha256(json.dumps(members, sort_keys=True, separators=(",", ":")).encode()).digest())


def _int_b64(value: int) -> str:
    return _b64url(value.to_bytes(32, "big"))


def dpop_signer(private_jwk: Mapping[str, str] | None = None,
                why: str = "OAUTH_DPOP=1") -> tuple[dict[str, str], Callable[[bytes], bytes]]:
    """(the private JWK, ES256 sign) of a new P-256 key, or of the one a grant keeps; the only other use of the
    optional `cryptography` package, imported by DPoP runs alone (RFC 7518 section 3.4: r || s, not DER)."""
    try:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
    except ImportError:
        raise fail("crypto_missing", feature=f"DPoP ({why})") from None
    import base64

    if private_jwk is None:
        key = ec.generate_private_key(ec.SECP256R1())
        numbers = key.private_numbers()
        private_jwk = {"kty": "EC", "crv": "P-256", "x": _int_b64(numbers.public_numbers.x),
                       "y": _int_b64(numbers.public_numbers.y), "d": _int_b64(numbers.private_value)}
    else:
        d = base64.urlsafe_b64decode(private_jwk["d"] + "=" * (-len(private_jwk["d"]) % 4))
        key = ec.derive_private_key(int.from_bytes(d, "big"), ec.SECP256R1())
    remember_secret(private_jwk["d"])

    def sign(signing_input: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    return dict(private_jwk), sign


def dpop_proof(private_jwk: Mapping[str, str], sign: Callable[[bytes], bytes], method: str, url: str, *,
               nonce: str = "", access_token: str = "", now: float | None = None) -> str:
    """A DPoP proof (RFC 9449 section 4.2): a JWS of typ dpop+jwt with the public key in its header; a new jti every
    time, so a retry is a new proof; `nonce` when the server gave one (section 8), `ath` on a resource request
    (section 7: base64url of the SHA-256 of the access token)."""
    import hashlib

    header = {"typ": "dpop+jwt", "alg": "ES256",
              "jwk": {name: private_jwk[name] for name in ("kty", "crv", "x", "y")}}  # never d
    claims: dict[str, Any] = {"jti": secrets.token_urlsafe(24), "htm": method.upper(), "htu": dpop_htu(url),
                              "iat": int(time.time() if now is None else now)}
    if nonce:
        claims["nonce"] = nonce
    if access_token:
        claims["ath"] = _b64url(hashlib.sha256(access_token.encode("utf-8")).digest())  # ASCII in any real token
    signing_input = ".".join(_b64url(json.dumps(part, separators=(",", ":")).encode("utf-8"))
                             for part in (header, claims))
    proof = f"{signing_input}.{_b64url(sign(signing_input.encode('ascii')))}"
    remember_secret(proof)  # good for one request only, and still never shown
    return proof


class DPoP:
    """One grant's DPoP state: its key (made when authorizing, kept with the token) and the latest nonce of each
    server. The authorization server's and the API's nonces are kept apart: they may share an origin, and a server
    refuses a nonce it did not issue (RFC 9449 sections 8 and 9). Empty (no key): the grant is not DPoP-bound."""

    SERVERS = ("as", "api")

    def __init__(self, record: Mapping[str, Any] | None = None) -> None:
        self.load(record)

    def load(self, record: Mapping[str, Any] | None) -> None:
        """Take a grant's record (what record() wrote); None or {} for a grant that is not DPoP-bound."""
        record = record or {}
        self.jwk: dict[str, str] | None = dict(record["jwk"]) if record.get("jwk") else None
        self.nonces: dict[str, str] = {server: str((record.get("nonces") or {}).get(server, ""))
                                       for server in self.SERVERS}
        self.changed = False  # a nonce changed since the grant was loaded or saved: worth saving
        self._sign: Callable[[bytes], bytes] | None = None
        if self.jwk:
            remember_secret(self.jwk.get("d"))

    def __bool__(self) -> bool:
        return self.jwk is not None

    def new_key(self, why: str = "OAUTH_DPOP=1") -> None:
        """RFC 9449 section 5: a new authorization, a new key (and no nonce of the old grant's); `why` DPoP is used,
        for the one line that says the package it needs is missing."""
        self.jwk, self._sign = dpop_signer(why=why)
        self.nonces = dict.fromkeys(self.SERVERS, "")

    @property
    def thumbprint(self) -> str:
        return jwk_thumbprint(self.jwk) if self.jwk else ""

    def record(self) -> dict[str, Any]:
        """What the token file keeps (inside the grant's meta: the file is 0600, atomic, locked)."""
        return {"jwk": dict(self.jwk), "nonces": dict(self.nonces)} if self.jwk else {}

    def proof(self, method: str, url: str, server: str, access_token: str = "") -> str:
        if self._sign is None:
            self.jwk, self._sign = dpop_signer(self.jwk)
        return dpop_proof(self.jwk, self._sign, method, url, nonce=self.nonces[server], access_token=access_token)

    def saw(self, response: requests.Response, server: str) -> str:
        """Keep the DPoP-Nonce of any answer (section 8.2: the newest replaces the one held); the nonce, or ""."""
        nonce = response.headers.get("DPoP-Nonce", "")
        if not nonce or len(nonce) > 1024 or not set(nonce) <= NONCE_CHARS:
            return ""
        if nonce != self.nonces[server]:
            self.nonces[server] = nonce
            self.changed = True
        return nonce


def dpop_nonce_asked(response: requests.Response, server: str) -> bool:
    """The server refused the proof for want of its nonce and sent one (RFC 9449 section 8: a 400 use_dpop_nonce
    from the authorization server; section 9: a 401 whose DPoP challenge says use_dpop_nonce): the request was not
    served, so it may be sent once more, as a new request with a new proof."""
    if not response.headers.get("DPoP-Nonce"):
        return False
    if server == "api":
        challenge = response.headers.get("WWW-Authenticate", "")
        dpop_scheme = any(part.strip().lower().startswith("dpop ") for part in challenge.split(","))
        return response.status_code == 401 and dpop_scheme and "use_dpop_nonce" in challenge
    if response.status_code != 400:
        return False
    refused = oauth_error(response.content)
    return refused is not None and refused.error == "use_dpop_nonce"


@functools.cache
def _dpop_auth_class() -> type:
    """DPoPAuth: the API's side of a DPoP-bound grant (RFC 9449 section 7), as an AuthBase, since oauthlib refuses to
    add a token whose type is not Bearer or MAC: the session adds it as Bearer, and this turns it into DPoP."""
    import requests

    class DPoPAuth(requests.auth.AuthBase):
        server = "api"

        def __init__(self, dpop: DPoP) -> None:
            self.dpop = dpop

        def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
            scheme, _, access_token = request.headers.get("Authorization", "").partition(" ")
            if self.dpop and scheme.lower() == "bearer" and access_token:
                # read from the request, not kept here: requests-oauthlib may have refreshed just before
                request.headers["Authorization"] = f"DPoP {access_token}"
                request.headers["DPoP"] = self.dpop.proof(request.method or "GET", request.url or "", self.server,
                                                          access_token=access_token)
            return request

    return DPoPAuth


@functools.cache
def _client_auth_class() -> type:
    """ClientAuth, built on first use so that --help and --status never import requests (as _oauth2_session_class).

    A requests.auth.AuthBase rather than a function: requests-oauthlib's fetch_token and refresh_token take it as
    `auth` and then add no client credentials of their own, so every request that authenticates the client (code
    exchange, refresh, device authorization, device poll, revocation) goes through this one object.
    """
    import requests

    class ClientAuth(requests.auth.AuthBase):
        """Client authentication (RFC 6749 section 2.3.1), one encoder per CLIENT_AUTH_METHODS entry, as Authlib's
        ClientAuth; plus the request extras (request_extras) for the requests that carry them."""

        server = "as"  # whose DPoP nonce the proofs carry (RFC 9449 section 8)

        def __init__(self, settings: Settings, *, extras: Mapping[str, str] | None = None,
                     dpop: DPoP | None = None) -> None:
            self.dpop = dpop  # the grant's DPoP state: a proof on each request while it holds a key
            # one encoder per CLIENT_AUTH_METHODS entry: adding a method is one method here and one name there
            self.encode: Callable[[requests.PreparedRequest], dict[str, str]] = {
                "basic": self.basic, "post": self.post, "none": self.none, "private_key_jwt": self.private_key_jwt,
                "client_secret_jwt": self.client_secret_jwt}[settings.client_auth]
            self.client_id = settings.client_id
            self.client_secret = settings.client_secret
            self.extras = dict(extras or {})
            self.key_path = settings.client_key
            self.key_id = settings.client_key_id
            self.signer: tuple[str, Callable[[bytes], bytes]] | None = None  # loaded on the first assertion
            # The assertion's aud is the issuer identifier, as FAPI 2.0 and the RFC 7523 update ask (one value that
            # every endpoint of the server accepts). Without OAUTH_ISSUER no issuer is known (the server URL is
            # only a guess at one): RFC 7523 section 3 lets the token endpoint's URL serve as the audience.
            self.audience = settings.issuer if settings.issuer_explicit else settings.token_url

        def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
            if self.dpop:  # RFC 9449 section 5 (token requests), RFC 9126 with section 10.1 (PAR)
                request.headers["DPoP"] = self.dpop.proof(request.method or "POST", request.url or "", self.server)
            fields = {**self.encode(request), **self.extras}
            if fields:
                body = request.body.decode() if isinstance(request.body, bytes) else (request.body or "")
                pairs = parse_qsl(body, keep_blank_values=True)
                known = {key for key, _value in pairs}
                pairs = [(key, fields.get(key, value)) for key, value in pairs]
                pairs += [(key, value) for key, value in fields.items() if key not in known]
                request.body = urlencode(pairs)
                request.prepare_content_length(request.body)
            return request

        def basic(self, request: requests.PreparedRequest) -> dict[str, str]:  # client_secret_basic
            requests.auth.HTTPBasicAuth(self.client_id, self.client_secret)(request)
            return {}

        def post(self, _request: requests.PreparedRequest) -> dict[str, str]:  # client_secret_post
            return {"client_id": self.client_id, "client_secret": self.client_secret}

        def none(self, _request: requests.PreparedRequest) -> dict[str, str]:
            return {"client_id": self.client_id}  # a public client identifies itself (section 3.2.1)

        def private_key_jwt(self, _request: requests.PreparedRequest) -> dict[str, str]:
            if self.signer is None:
                self.signer = load_signing_key(self.key_path)
            return self.assertion(*self.signer)

        def client_secret_jwt(self, _request: requests.PreparedRequest) -> dict[str, str]:
            return self.assertion("HS256", hs256_signer(self.client_secret))

        def assertion(self, alg: str, sign: Callable[[bytes], bytes]) -> dict[str, str]:
            """RFC 7523 section 2.2: a new assertion for every request (a retry too), never with a secret or Basic."""
            return {"client_id": self.client_id, "client_assertion_type": CLIENT_ASSERTION_TYPE,
                    "client_assertion": client_assertion(self.client_id, self.audience, alg, sign, kid=self.key_id)}

    return ClientAuth


def _insufficient_scope(response: requests.Response) -> bool:
    return "insufficient_scope" in response.headers.get("WWW-Authenticate", "")


class StepUpRequired(AuthorizationError):
    """The API wants a stronger or more recent login (RFC 9470): caught to authorize again with what it asks for."""

    def __init__(self, acr_values: str, max_age: int | None) -> None:
        super().__init__("step-up", what="step_up")
        self.acr_values = acr_values
        self.max_age = max_age


def step_up_challenge(response: requests.Response) -> StepUpRequired | None:
    """RFC 9470 section 3: a 401 whose Bearer challenge says insufficient_user_authentication, with acr_values
    and/or max_age (sanitized: they are sent back to the server and shown to the person)."""
    params = bearer_challenge(response)
    if params.get("error") != "insufficient_user_authentication":
        return None
    acr = " ".join(value for value in params.get("acr_values", "").split() if value.isprintable())[:500]
    max_age = params.get("max_age", "")
    seconds = int(max_age) if max_age.isdigit() and len(max_age) < 10 else None
    return StepUpRequired(acr, seconds)


def login_demands(settings: Settings) -> dict[str, str]:
    """acr_values and max_age for the authorization request (OpenID Connect Core section 3.1.2.1; RFC 9470)."""
    demands = {"acr_values": settings.acr_values} if settings.acr_values else {}
    if settings.max_age is not None:
        demands["max_age"] = str(settings.max_age)
    return demands


class MemoSession:
    """The HTTP session of one run: an OAuth2Session plus the rules of when and how to refresh.

    requests-oauthlib refreshes on its own (auto_refresh_url) once the token it holds is past
    `expires_at` and then hands the new token to token_updater.  We give it a copy of the token
    whose expires_at is moved forward by refresh_margin(), and route every refresh through
    refresh(), which holds the store's lock, re-reads the file (another run may have refreshed
    already, and Doorkeeper may have revoked the refresh token we hold) and saves the new token
    before anything else can fail (Doorkeeper rotates refresh tokens).
    """

    def __init__(self, settings: Settings, store: TokenStore, token: Mapping[str, Any] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.oauth: OAuth2Session = _oauth2_session_class()(
            client_id=settings.client_id,
            redirect_uri=settings.redirect_uri,
            scope=list(settings.scope),
            auto_refresh_url=settings.token_url,
            token_updater=self._token_updated,
            pkce="S256",
        )
        self.oauth.memo = self
        self.oauth.settings = settings
        check = functools.partial(_check_token_response, settings=settings)
        self.oauth.register_compliance_hook("access_token_response", check)
        self.oauth.register_compliance_hook("refresh_token_response", check)
        self.oauth.register_compliance_hook("refresh_token_request", _without_scope)
        self.dpop = DPoP()  # the grant's key and nonces (RFC 9449); empty unless the grant is DPoP-bound
        # A DPoP proof goes to the token endpoint (RFC 9449 section 5) and the PAR endpoint (section 10.1) only.
        self.client_auth = _client_auth_class()(settings)  # revocation: no request extras, no DPoP proof
        self.par_auth = _client_auth_class()(settings, dpop=self.dpop)  # PAR: the extras are in its body already
        self.token_auth = _client_auth_class()(settings, extras=request_extras(settings), dpop=self.dpop)
        self.device_auth = _client_auth_class()(settings, extras=request_extras(settings))  # device authorization
        self.asked_scope: tuple[str, ...] = settings.scope
        self.pushed = False  # the last authorization request went by PAR (RFC 9126)
        # requests' adapters never retry (urllib3 would resend a prepared request as it is); the API GET is retried
        # by get() alone, a token POST never (a code is single-use and a refresh token rotates). One adapter per
        # scheme keeps one connection pool, so a refresh and the API call share one TCP connection.
        self.oauth.headers["User-Agent"] = f"fetch_memos/{__version__}"
        if token is not None:
            self.use(token)

    # -- the token this session sends ----------------------------------------------------------

    def use(self, token: Mapping[str, Any]) -> None:
        """Hold this token; requests-oauthlib sees it as expired refresh_margin() seconds early."""
        self.token = dict(token)
        asked = scope_asked_for(self.token)
        if asked is not None:  # a stored token says what its grant asked for; a refreshed one keeps that
            self.asked_scope = asked
        remember_secret(self.token.get("access_token"), self.token.get("refresh_token"))
        meta = self.token.get(META_KEY)
        if isinstance(meta, dict):  # a stored grant brings its own DPoP key and nonces (a fresh answer keeps ours)
            self.dpop.load(meta.get("dpop"))
        session_copy = {key: value for key, value in self.token.items() if key != META_KEY}
        if str(session_copy.get("token_type", "")).lower() == "dpop":
            # oauthlib adds only Bearer and MAC tokens: it adds this one as Bearer, and DPoPAuth makes it DPoP
            session_copy["token_type"] = "Bearer"
        if isinstance(session_copy.get("expires_at"), (int, float)):
            session_copy["expires_at"] = session_copy["expires_at"] - refresh_margin(session_copy)
        self.oauth.token = session_copy

    def _token_updated(self, token: dict) -> None:
        """requests-oauthlib's token_updater, empty on purpose: refresh() has already saved the token and taken it into
        use. Needed all the same: without a token_updater requests-oauthlib raises TokenUpdated after an auto refresh
        instead of sending the request."""

    def _save(self, token: Mapping[str, Any]) -> None:
        meta = token_meta(self.settings, self.asked_scope)
        if self.dpop:
            meta["dpop"] = self.dpop.record()
            self.dpop.changed = False
        try:
            self.store.save(token, meta)
        except TokenNotSaved as exc:
            # The run can still succeed; say so, since the next run cannot reuse this token.
            warn(f"{exc}. The next run will have to authorize again.")

    def keep_nonces(self) -> None:
        """Save the grant again when a server sent a new DPoP nonce, so the next run's first proof carries it and
        stays one request (RFC 9449 section 8.2). Only onto the very token held: another run may have refreshed."""
        if not (self.dpop and self.dpop.changed and self.token.get("access_token")):
            return
        try:
            with self.store.locked():
                stored = self.store.load()
                if stored is not None and _same_token(stored, self.token):
                    self._save(self.token)
        except FetchMemosError as exc:  # the file busy or unreadable: the next run just meets the nonce demand
            log.debug("the new DPoP nonce was not saved: %s", exc)

    def start_grant(self) -> None:
        """A new authorization: with OAUTH_DPOP=1 a new key pair (RFC 9449 section 5), else no DPoP."""
        if self.settings.dpop:
            self.dpop.new_key("OAUTH_DPOP=1" if self.settings.dpop_explicit else
                              "the API requires DPoP-bound tokens: its resource metadata says so, RFC 9728")
        else:
            self.dpop.load(None)

    # -- getting tokens ------------------------------------------------------------------------

    def authorization_url(self, authorize_url: str) -> tuple[str, str]:
        """The URL the person opens, and its state: every parameter in it, or pushed first (RFC 9126) when a PAR
        endpoint is known and OAUTH_PAR=auto, and then only client_id and request_uri in it."""
        state = secrets.token_urlsafe(24)
        extra = request_extras(self.settings)
        if "offline_access" in self.settings.scope:
            # OpenID Connect Core section 11: offline_access is ignored unless consent is asked for.
            extra["prompt"] = "consent"
        extra.update(login_demands(self.settings))
        self.pushed = bool(self.settings.par_url) and self.settings.par == "auto"
        if self.dpop and not self.pushed:
            # RFC 9449 section 10: binds the code to the key; a pushed request has the PAR request's proof instead
            extra["dpop_jkt"] = self.dpop.thumbprint
        with _oauthlib_transport(self.settings):
            url, state = self.oauth.authorization_url(authorize_url, state=state, **extra)
        remember_secret(self.oauth._code_verifier)
        if self.pushed:
            url = self.push_authorization_request(url)
        return url, state

    def push_authorization_request(self, url: str) -> str:
        """RFC 9126: POST the authorization request to the PAR endpoint, with client authentication as configured;
        the browser's URL then carries only client_id and request_uri (section 4).

        The pushed body is read back from the URL just built, so it carries every parameter a plain URL would,
        client_id included (section 2.1 wants it even with HTTP Basic), and one added later cannot be left out.
        """
        parts = urlsplit(url)
        params = dict(parse_qsl(parts.query, keep_blank_values=True))
        response = self.post_form(self.settings.par_url, params, extras=False, proof=True)  # extras: in the URL
        request_uri = pushed_request_uri(self, response)
        return parts._replace(query=urlencode({"client_id": params.get("client_id", self.settings.client_id),
                                               "request_uri": request_uri})).geturl()

    @property
    def redirect_uri(self) -> str:
        return self.oauth.redirect_uri

    @redirect_uri.setter
    def redirect_uri(self, value: str) -> None:
        self.oauth.redirect_uri = value

    def exchange_code(self, code: str) -> dict[str, Any]:
        """Trade the code for a token (PKCE verifier and the configured client auth); never retried."""
        url = self.settings.token_url
        try:
            with _oauthlib_transport(self.settings):
                token = run_token_request(lambda: self.oauth.fetch_token(
                    url, code=code, timeout=self.settings.timeout, auth=self.token_auth))
        except Exception as exc:  # noqa: BLE001 - mapped to our errors, or re-raised
            raise self._token_request_failed(exc, "token") from None
        return self.take_new_token(token)

    def take_new_token(self, token: Mapping[str, Any]) -> dict[str, Any]:
        """The one place a freshly granted token (code exchange or device flow) is checked, used and saved.

        RFC 6749 section 3.3 lets the server grant less than asked: say once what is missing and go
        on (refreshes do not ask for scope, so they keep working). The scope asked for is recorded
        beside the token, to notice later when the configuration asks for more.
        """
        token = dict(token)
        self.asked_scope = self.settings.scope
        token_type = str(token.get("token_type", ""))
        if self.dpop and token_type.lower() != "dpop":
            # RFC 9449 section 5: a server that does not bind tokens answers Bearer; the token works as issued
            shown = _printable(token_type or "untyped", 40)
            say(MESSAGES["dpop_not_bound"].text.format(url=self.settings.token_url, token_type=shown))
            self.dpop.load(None)
        granted = granted_scope(token, self.asked_scope)
        missing = [scope for scope in self.asked_scope if scope not in granted]
        if missing:
            say(f"Note: the server did not grant scope {' '.join(missing)} (asked for {' '.join(self.asked_scope)}, "
                f"granted {' '.join(granted) or 'no scope'}); continuing with what was granted.")
        self.use(token)
        self._save(token)
        return token

    def refresh(self) -> dict[str, Any]:
        """The one way to refresh: under the lock, adopting another run's fresh token when there is one."""
        with self.store.locked():
            stored = self.store.load()
            if stored is not None and token_mismatch(stored, self.settings) is None:
                if not _same_token(stored, self.token) and not is_expiring(stored):
                    log.debug("another run refreshed the token already; using it")
                    self.use(stored)
                    return self.oauth.token
                if stored.get("refresh_token"):
                    self.token = stored  # the newest refresh token is the one that works
            refresh_token = self.token.get("refresh_token")
            if not refresh_token:
                raise fail("no_refresh_token")
            url = self.settings.token_url
            try:
                with _oauthlib_transport(self.settings):
                    token = run_token_request(lambda: self.oauth.plain_refresh(
                        refresh_token, timeout=self.settings.timeout, auth=self.token_auth))
                token.setdefault("refresh_token", refresh_token)  # RFC 6749 section 6: kept unless replaced
            except Exception as exc:  # noqa: BLE001 - mapped to our errors, or re-raised
                raise self._token_request_failed(exc, "refresh") from None
            log.debug("refreshed the token at %s", url)
            self.use(token)
            self._save(token)
        return self.oauth.token

    # -- using tokens --------------------------------------------------------------------------

    def get(self, url: str) -> requests.Response:
        """GET with the bearer token; requests-oauthlib refreshes first when the token is (nearly) expired.

        An idempotent GET is tried again after a connection error, a timeout, a 502/503/504 or a body that breaks
        off, RETRY_ATTEMPTS times at most, each a new request: urllib3 is never let retry, because it would resend
        the prepared request as it is, and a DPoP proof must not be sent twice (a resource server may remember the
        jti of every proof it has seen, RFC 9449 section 11.1).
        """
        import requests

        if self.dpop and getattr(self.oauth.auth, "dpop", None) is not self.dpop:
            # The session's auth (in place of requests-oauthlib's no-op), not the request's: its auto refresh takes
            # a request's auth away for the refresh request, and the API call after it would go without a proof.
            self.oauth.auth = _dpop_auth_class()(self.dpop)
        for attempt in range(RETRY_ATTEMPTS + 1):
            last = attempt == RETRY_ATTEMPTS
            try:
                with _oauthlib_transport(self.settings):
                    # read whole (and bounded) inside: a break in the body is retried too
                    response = self.oauth.get(url, timeout=self.settings.timeout, limit=MAX_API_BYTES)
                if last or response.status_code not in RETRY_STATUSES:
                    break
            except FetchMemosError:
                raise
            except requests.exceptions.RequestException as exc:
                # connection errors and timeouts, not TLS refusals (a certificate does not get better)
                retryable = isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                                             requests.exceptions.ChunkedEncodingError))
                if last or not retryable or isinstance(exc, requests.exceptions.SSLError):
                    raise request_failed(exc, url, self.settings.timeout) from None
            time.sleep(RETRY_BACKOFF * 2 ** attempt)
        log.debug("GET %s -> %s", url, response.status_code)
        return response

    def get_with_one_refresh(self, url: str) -> requests.Response:
        """One GET, and after a rejected token exactly one refresh and one retry.

        A 401 never triggers requests-oauthlib's refresh. Some servers (django-oauth-toolkit)
        answer 403 with no challenge for a dead token, so a 403 that does not name
        insufficient_scope is treated the same way.
        """
        response = self.get(url)
        if response.status_code == 401:
            step_up = step_up_challenge(response)
            if step_up is not None:  # RFC 9470: a refresh keeps the same login; only a new authorization helps
                raise step_up
        if response.status_code == 401 or (response.status_code == 403 and not _insufficient_scope(response)):
            log.debug("the API rejected the token (%s); refreshing once", response.status_code)
            self.refresh()
            response = self.get(url)
        return response

    def post_form(self, url: str, data: Mapping[str, str], *, extras: bool = True,
                  proof: bool = False) -> requests.Response:
        """A POST with the client authenticated and no bearer token (device flow; revocation and PAR with
        extras=False; PAR with proof=True, which carries a DPoP proof as token endpoint requests do)."""
        import requests

        if extras:
            auth = self.token_auth if url == self.settings.token_url else self.device_auth
        else:
            auth = self.par_auth if proof else self.client_auth
        try:
            with _oauthlib_transport(self.settings):
                return self.oauth.post(url, data=data, timeout=self.settings.timeout, withhold_token=True, auth=auth)
        except requests.exceptions.RequestException as exc:
            raise request_failed(exc, url, self.settings.timeout) from None

    def endpoint_failed(self, endpoint: str) -> None:
        """An endpoint that came from the metadata failed: the cached metadata may be out of date."""
        if self.settings.source(endpoint) == "metadata":
            MetadataCache(self.settings.token_file).forget()

    def _token_request_failed(self, exc: Exception, endpoint: str) -> Exception:
        error = token_request_error(exc, endpoint, self.settings)
        if isinstance(error, ServerError) or getattr(error, "what", "") == "endpoint_not_found":
            self.endpoint_failed("token_url")
        return error

    def close(self) -> None:
        self.oauth.close()


# ---------------------------------------------------------------------------------------------
# 6. Grant rules: what a token endpoint's answer means, and what a stored token is good for.
# ---------------------------------------------------------------------------------------------

def scope_asked_for(token: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The scope asked for when this grant was obtained, or None when an older version stored none."""
    meta = token.get(META_KEY)
    scope = meta.get("scope") if isinstance(meta, dict) else None
    return tuple(scope) if isinstance(scope, list) else None


def token_meta(settings: Settings, asked: tuple[str, ...] | None = None) -> dict[str, Any]:
    """What we record beside a token: the token is only ever sent back where it came from.

    `scope` is the scope asked for when the grant was obtained (not what was granted, which is the
    token's own `scope`): a refresh keeps the grant's scope, so it stays the same across refreshes.
    """
    return {"version": 1, "server_url": settings.server_url, "token_url": settings.token_url,
            "api_url": settings.api_url, "client_id": settings.client_id,
            "scope": list(settings.scope if asked is None else asked)}


def granted_scope(token: Mapping[str, Any], asked: tuple[str, ...]) -> tuple[str, ...]:
    """RFC 6749 section 5.1: a token response without `scope` granted what was asked."""
    scope = token.get("scope")
    if isinstance(scope, str):
        return tuple(scope.split())
    if isinstance(scope, (list, tuple)) and scope:
        return tuple(scope)
    return asked


def scope_added(token: Mapping[str, Any], settings: Settings) -> str | None:
    """The configured scopes the stored grant was never asked for, said in words; None when there are none.

    A refresh cannot widen a grant (RFC 6749 section 6), so such a scope needs a new authorization.
    """
    asked = scope_asked_for(token)
    if asked is None:
        return None
    missing = [scope for scope in settings.scope if scope not in asked]
    if not missing:
        return None
    return (f"the configuration asks for scope {' '.join(missing)}, which was not asked for when the stored token "
            f"was obtained (it asked for {' '.join(asked) or 'no scope'})")


def _comparable_origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port): what two API URLs must share for a token to be sent to both."""
    try:
        parts = urlsplit(url)
        return parts.scheme, (parts.hostname or ""), parts.port
    except ValueError:  # not a URL we could have written: it matches nothing
        return "", url, None


def token_mismatch(token: Mapping[str, Any], settings: Settings) -> str | None:
    """Why a stored token must not be used with these settings, or None when it may.

    The token URL is compared exactly: the token (and the refresh token with it) goes back only to the endpoint
    that issued it. The API only by origin: a bearer token is good for the whole resource server, so moving to
    another path on the same server (MEMOS_API_URL=.../v2/memos) must not cost a new authorization.
    """
    meta = token.get(META_KEY)
    if not meta:  # written by the original script, which only knew one server: adopt it
        return None
    api_moved = _comparable_origin(meta.get("api_url", "")) != _comparable_origin(settings.api_url)
    if meta.get("token_url") != settings.token_url or api_moved:
        issued, now = f"by {meta.get('server_url')}", settings.server_url
        if meta.get("server_url") == now:  # the same server named twice says nothing: name what moved
            issued, now = ((f"for the API at {meta.get('api_url')}", settings.api_url) if api_moved
                           else (f"by the token endpoint {meta.get('token_url')}", settings.token_url))
        return f"it was issued {issued}, but the configuration now points at {now}"
    if meta.get("client_id") != settings.client_id:
        return "it was issued to a different CLIENT_ID"
    return None


def run_token_request(token_request: Callable[[], Mapping[str, Any]]) -> dict[str, Any]:
    """Send a token request (a callable) and return its token, also when the server granted other scopes than asked.

    oauthlib raises a Warning carrying the token in that case (unless a process-wide variable
    relaxes it); RFC 6749 section 3.3 lets the server decide, so we take what it granted.
    """
    try:
        return dict(token_request())
    except Warning as scope_change:
        token = getattr(scope_change, "token", None)
        if token is None:
            raise
        log.debug("the server granted scope %s", token.get("scope"))
        return dict(token)


def _nothing_was_sent(exc: Exception) -> bool:
    """True when the request cannot have reached the server, so nothing can have been used up there."""
    import requests
    from urllib3.exceptions import NewConnectionError

    return isinstance(exc, requests.exceptions.ConnectTimeout) or any(
        isinstance(c, (NewConnectionError, socket.gaierror, ConnectionRefusedError)) for c in _causes(exc))


def token_request_error(exc: Exception, endpoint: str, settings: Settings) -> Exception:
    """What a failed token request (endpoint "token", "refresh" or "device_poll") means for the person."""
    import requests
    from oauthlib.oauth2.rfc6749 import errors as oauth_errors

    url = settings.token_url
    if isinstance(exc, FetchMemosError):
        return exc
    if isinstance(exc, requests.exceptions.RequestException):
        if endpoint == "refresh" and not _nothing_was_sent(exc):
            return fail("refresh_lost", problem=_describe_request_error(exc, url, settings.timeout))
        return request_failed(exc, url, settings.timeout)
    if isinstance(exc, oauth_errors.OAuth2Error):
        error = oauth_error({"error": exc.error, "error_description": exc.description}) or OAuthError("invalid_request")
        return oauth_failure(endpoint, error, url, has_secret=settings.has_credentials,
                         signs=settings.signs_assertions)
    if isinstance(exc, ValueError):  # oauthlib's complaints about malformed token fields
        return fail("token_malformed", url=url, problem=exc)
    return exc


# ---------------------------------------------------------------------------------------------
# 7. The code grant: build the URL (PKCE S256, state), get the code (paste or loopback), exchange it.
# ---------------------------------------------------------------------------------------------

PROMPT_ATTEMPTS = 3


def _same_text(a: str, b: str) -> bool:
    """Constant-time comparison that also takes non-ASCII text (compare_digest refuses it as str)."""
    return secrets.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


NO_CODE_HINT = (f"If the server showed an invalid-redirect-URI page, it does not support {OOB_REDIRECT_URI} "
                "(copy and paste): register http://127.0.0.1/callback as a redirect URI of the application and run "
                "with --loopback (or set OAUTH_REDIRECT_URI=http://127.0.0.1:PORT/callback).")

PAR_OOB_HINT = (f"If it is the redirect URI: {OOB_REDIRECT_URI} (copy and paste) is one this server may not accept; "
                "register http://127.0.0.1/callback as a redirect URI of the application and run with --loopback (or "
                "set OAUTH_REDIRECT_URI=http://127.0.0.1:PORT/callback).")


def pushed_request_uri(session: MemoSession, response: requests.Response) -> str:
    """The request_uri of a PAR endpoint's answer (RFC 9126 section 2.2: 201 and JSON); else what went wrong."""
    settings = session.settings
    url = settings.par_url
    status = response.status_code
    if status == 404:
        session.endpoint_failed("par_url")
        raise not_found(settings, "par_url", "pushed authorization request endpoint", url)
    if status >= 500:
        session.endpoint_failed("par_url")
        raise fail("endpoint_down", endpoint="pushed authorization request endpoint", url=url,
                   answered=answered(response))
    answer = _json_object(response)
    if status not in (200, 201) or answer is None or "error" in answer:
        refused = oauth_error(answer)  # section 2.3: RFC 6749 section 5.2's error answer
        if refused is None:
            raise fail("par_answer_unusable", url=url, answered=answered(response))
        # The out-of-band URI is no redirect most standards servers register; refused here, there is no page to
        # paste from, so the hint the paste gives (NO_CODE_HINT) is said now.
        oob = session.redirect_uri == OOB_REDIRECT_URI and refused.error in ("invalid_request", "invalid_redirect_uri")
        raise oauth_failure("par", refused, url, has_secret=settings.has_credentials,
                            signs=settings.signs_assertions, hint=f" {PAR_OOB_HINT}" if oob else "")
    request_uri = answer.get("request_uri")
    if not isinstance(request_uri, str) or not request_uri.isprintable() or not 0 < len(request_uri) <= 2000:
        raise fail("par_answer_unusable", url=url, answered=answered(response))
    log.debug("pushed the authorization request to %s (valid for %s s)", url, _printable(answer.get("expires_in")))
    return request_uri


def pushed_request_lost(params: Mapping[str, list[str]]) -> bool:
    """An authorization response that cannot carry our state: the server no longer holds the pushed request
    (expired or used), and the state was in it. RFC 9126 section 4 has it answer invalid_request_uri (RFC 9101
    section 7); such a response is an error and never a code, so letting it through without state stops the run
    with the right words and grants nothing to whoever sent it."""
    return "code" not in params and params.get("error") == ["invalid_request_uri"]


def check_response_issuer(params: Mapping[str, list[str]], issuer: str | None, issuer_required: bool) -> None:
    """RFC 9207: the one check of `iss`, for pasted and loopback responses alike, before any token request.

    A response naming another issuer came from another server's flow (the mix-up attack, RFC 9700
    section 4.4); section 2.4 asks for simple string comparison. When the metadata promised `iss`
    in every response, one without it is refused the same way. `issuer=None` checks nothing.
    """
    if issuer is None:
        return
    values = params.get("iss")
    if not values:
        if issuer_required:
            raise fail("iss_missing", issuer=issuer)
        return
    if len(values) > 1 or values[0] != issuer:
        named = values[0] if len(values) == 1 else " and ".join(values)
        advice = (f" If {named} really is your server's issuer, set OAUTH_ISSUER={named} (or --issuer)."
                  if len(values) == 1 and named and named.isprintable() else "")
        raise fail("iss_wrong", named=named, issuer=issuer, advice=advice)


def parse_pasted(text: str, expected_state: str, *, issuer: str | None = None, issuer_required: bool = False) -> str:
    """The code from what a person pasted: a bare code, or the URL of the code page or of a redirect.

    Quotes and spaces that come along with a copy are dropped. A URL's `error=` is reported, its
    `state`, when present, must be ours (Doorkeeper's out-of-band page carries none), and its `iss`
    must name `issuer` (check_response_issuer).
    """
    cleaned = "".join(text.split()).strip("'\"<>`")
    if not cleaned:
        raise ValueError("empty")
    if text.strip().startswith("{"):  # Doorkeeper's out-of-band Deny answers with a JSON error, not a page
        refused = oauth_error(text)
        if refused is not None:
            raise oauth_failure("authorization", refused, "")
    looks_like_url = "://" in cleaned or cleaned.startswith("/") or "?" in cleaned or "code=" in cleaned
    if not looks_like_url:
        if not all(0x21 <= ord(ch) <= 0x7E for ch in cleaned):
            raise fail("not_a_code")
        if issuer is not None and issuer_required:
            # RFC 9207 protects the redirect response, which carries iss; a bare code carries nothing to
            # check, so it is only taken from a server that does not promise iss.
            raise fail("bare_code_unverifiable", issuer=issuer)
        return cleaned
    try:
        query = urlsplit(cleaned).query or cleaned.partition("?")[2] or cleaned
    except ValueError:
        raise fail("paste_unreadable") from None
    params = parse_qs(query, keep_blank_values=True)
    state = params.get("state")
    if state is not None and not _same_text(state[0], expected_state):
        raise fail("state_mismatch")
    if params.get("code") or params.get("error"):  # an authorization response; error ones carry iss too (RFC 9207 2)
        check_response_issuer(params, issuer, issuer_required)
    refused = oauth_error(params)
    if refused is not None:
        raise oauth_failure("authorization", refused, "")
    code = (params.get("code") or [""])[0]
    if not code:
        raise fail("no_code_in_paste", hint=NO_CODE_HINT)
    return code


def read_pasted_code(expected_state: str, *, issuer: str | None = None, issuer_required: bool = False) -> str:
    """Ask at the terminal until something usable is pasted; end of input means nobody will."""
    for _attempt in range(PROMPT_ATTEMPTS):
        say("Paste the code (or the whole address of the page showing it) and press Enter:")
        prompt()
        line = sys.stdin.readline()
        if not line:
            say()  # end the "> " prompt line
            raise fail("end_of_input")
        try:
            return parse_pasted(line, expected_state, issuer=issuer, issuer_required=issuer_required)
        except ValueError:
            say("Nothing was pasted.")
    raise fail("nothing_pasted")


def should_open_browser(settings: Settings, environ: Mapping[str, str]) -> bool:
    """Never hand a text-only terminal (no display, SSH) to a console browser such as lynx."""
    if not settings.open_browser:
        return False
    if sys.platform in ("darwin", "win32"):
        # A desktop always has a screen, but over SSH it is not the person's: `open` / start would show the page
        # on the remote machine's screen (X forwarding on Linux sets DISPLAY to the person's own, so that works).
        return not (environ.get("SSH_CONNECTION") or environ.get("SSH_TTY"))
    return bool(environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY"))


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Whatever a program started meanwhile (the browser) prints goes to stderr: stdout carries only the JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def open_in_browser(url: str, settings: Settings, environ: Mapping[str, str]) -> bool:
    """Open url where should_open_browser() allows it; True when a browser took it."""
    if not should_open_browser(settings, environ):
        return False
    import webbrowser  # ~15 ms (subprocess, shlex): only a run that opens a browser pays it

    with contextlib.suppress(Exception), _stdout_to_stderr():
        return bool(webbrowser.open(url))
    return False


def _page(title: str, text: str) -> str:
    import html  # ~3 ms (html.entities): only the loopback listener's pages need it

    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body style='font-family:sans-serif;margin:3em'><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(text)}</p></body></html>")


class LoopbackListener:
    """Catches the browser's redirect on 127.0.0.1 (RFC 8252 section 7.3), one request at a time."""

    def __init__(self, redirect_uri: str) -> None:
        # ~80 ms (email, http.client, mimetypes...): measured with -X importtime; only --loopback pays it
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        parts = urlsplit(redirect_uri)
        host = parts.hostname or "127.0.0.1"
        bind_host = "127.0.0.1" if host == "localhost" else host
        self.path = parts.path or "/"
        listener = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # a browser's idle pre-connection must not hold anything up

            def do_GET(self) -> None:
                status, page = listener.handle(self.path, self.headers.get("Host"))
                body = page.encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                try:
                    self.wfile.write(body)
                    self.wfile.flush()
                finally:
                    if listener.result is not None:
                        listener.replied.set()  # the run may end now without cutting this page off

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the query holds the code
                log.debug("loopback listener answered a request")

        class Server(ThreadingHTTPServer):
            # One thread a connection: browsers open speculative connections that send nothing.
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
            timeout = 1

            def handle_error(self, request: Any, client_address: Any) -> None:
                log.debug("the loopback listener could not answer a request", exc_info=True)

        try:
            self.server = Server((bind_host, parts.port or 0), Handler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise fail("port_in_use", port=parts.port, host=bind_host) from None
            raise fail("cannot_listen", host=bind_host, port=parts.port, problem=exc.strerror or exc) from None
        port = self.server.server_address[1]
        shown_host = f"[{host}]" if ":" in host else host
        self.redirect_uri = f"http://{shown_host}:{port}{self.path}"
        self.expected_state = ""
        self.expected_issuer: str | None = None  # None checks no iss (check_response_issuer)
        self.issuer_required = False
        self.pushed = False  # the authorization request went by PAR: see pushed_request_lost
        self.result: str | FetchMemosError | None = None
        self.pasted = False
        self.replied = threading.Event()
        self.decided = threading.Lock()  # one connection a thread: the first authorization response is final

    @property
    def host(self) -> str:
        """The Host a browser sends to our redirect URI: 127.0.0.1:PORT or [::1]:PORT."""
        return urlsplit(self.redirect_uri).netloc

    def handle(self, request_path: str, host: str | None) -> tuple[int, str]:
        """Decide on one request: accept our code, report an error, or refuse a stranger's request.

        A Host other than our own address is refused: a web page can make the browser send requests here under
        another name (DNS rebinding), and a browser sent by the server always names the redirect URI's host.
        """
        if (host or "").lower() != self.host.lower():
            log.debug("refused a request for another host")
            return 400, _page("Not accepted", "This address only receives the authorization redirect.")
        parts = urlsplit(request_path)
        if parts.path != self.path:
            return 404, _page("Not found", "This address only receives the authorization redirect.")
        with self.decided:
            if self.result is not None:
                return 409, _page("Already complete", "fetch_memos already received an authorization response; "
                                                      "this one was ignored. Return to the terminal.")
            return self._decide(parts.query)

    def _decide(self, query: str) -> tuple[int, str]:
        """The first authorization response that belongs to this run: it sets the result, once."""
        params = parse_qs(query)
        state = (params.get("state") or [""])[0]
        lost = not state and self.pushed and pushed_request_lost(params)  # its state was lost with it
        if not lost and (not state or not _same_text(state, self.expected_state)):
            log.debug("refused a redirect whose state is missing or wrong")
            return 400, _page("Not accepted", "This request does not belong to the authorization in progress "
                                              "(its state is missing or wrong), so it was ignored.")
        try:
            check_response_issuer(params, self.expected_issuer, self.issuer_required)
        except AuthorizationError as exc:
            self.result = exc
            return 400, _page("Not accepted", "This response does not name the expected authorization server "
                                              "(RFC 9207 iss), so it was refused. Return to the terminal.")
        refused = oauth_error(params)
        if refused is not None:
            self.result = oauth_failure("redirect", refused, "")
            return 200, _page("Authorization failed", f"The server said: {refused.error}. You can close this tab and "
                                                      "return to the terminal.")
        code = (params.get("code") or [""])[0]
        if not code:
            return 400, _page("Not accepted", "The redirect carried no code.")
        self.result = code
        return 200, _page("Authorized", "fetch_memos received the authorization. You can close this tab.")

    def wait(self, timeout: float, read_terminal: bool) -> str:
        """Wait for the redirect; meanwhile a URL pasted at the terminal (from another machine's browser) works too."""
        import queue  # these two, 2-5 ms together, only while a loopback listener waits
        import selectors

        selector = selectors.DefaultSelector()
        selector.register(self.server.socket, selectors.EVENT_READ, "server")
        typed: queue.Queue[str] | None = None
        if read_terminal and sys.platform == "win32":
            # Windows selects on sockets only: a thread reads the terminal and hands over each line.
            typed = queue.Queue()

            def read_terminal_lines(lines: queue.Queue[str]) -> None:
                for line in iter(sys.stdin.readline, ""):
                    lines.put(line)

            threading.Thread(target=read_terminal_lines, args=(typed,), name="fetch_memos-terminal",
                             daemon=True).start()
        elif read_terminal:
            selector.register(sys.stdin, selectors.EVENT_READ, "terminal")

        def take(line: str) -> None:
            if not line:  # end of input: keep waiting for the browser
                return
            with contextlib.suppress(ValueError), self.decided:
                if self.result is None:  # the browser's redirect arrived first: it stands
                    self.pasted = True
                    self.result = parse_pasted(line, self.expected_state, issuer=self.expected_issuer,
                                               issuer_required=self.issuer_required)

        deadline = time.monotonic() + timeout
        try:
            while self.result is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise fail("login_timeout", timeout=timeout)
                for key, _events in selector.select(min(remaining, 0.2)):
                    if key.data == "server":
                        self.server.handle_request()  # hands the connection to a thread
                    else:
                        line = sys.stdin.readline()
                        if not line:
                            selector.unregister(sys.stdin)
                        take(line)
                while typed is not None and not typed.empty() and self.result is None:
                    take(typed.get_nowait())
        finally:
            selector.close()
            if self.result is not None and not self.pasted:
                # The handler thread is still writing the "Authorized" page; ending the run now would cut it off
                # in the browser. Five seconds is ample for a local page and bounds a browser that stopped reading.
                self.replied.wait(5)
            if read_terminal and not self.pasted:
                say()  # end the open "> " prompt line before anything else is printed
        if isinstance(self.result, FetchMemosError):
            raise self.result
        return self.result

    def close(self) -> None:
        self.server.server_close()


def show_authorization_url(url: str, *, opened: bool) -> None:
    """The URL is printed in every mode, also when a browser was opened: the person may want it elsewhere."""
    say("Opened your browser to authorize fetch_memos." if opened
        else "To authorize fetch_memos, open this URL in a browser, log in and press Authorize:")
    say()
    say(f"    {url}")
    say()


# ---------------------------------------------------------------------------------------------
# 8. The device grant (RFC 8628): a code the person enters on any device, while we poll; authorize() picks a grant.
# ---------------------------------------------------------------------------------------------

DEVICE_INTERVAL = 5.0  # RFC 8628 section 3.2: the polling interval when the server names none
DEVICE_MIN_INTERVAL = 1.0  # a server's interval of 0 must not turn polling into a busy loop
SLOW_DOWN_STEP = 5.0  # section 3.5: slow_down adds 5 s "for this and all subsequent requests"
DEVICE_POLL_RETRIES = 3  # consecutive connection errors or 5xx answers tolerated while polling


class Clock(NamedTuple):
    """The time the device flow waits by: the one thing tests replace (DEVICE_CLOCK, or a DevicePoller's clock)."""

    now: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


DEVICE_CLOCK = Clock()


class DeviceAuthorization(NamedTuple):
    """The device authorization response (RFC 8628 section 3.2); the device code is a secret."""

    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str
    expires_in: float | None
    interval: float

    def __repr__(self) -> str:
        return f"DeviceAuthorization(user_code={self.user_code!r}, verification_uri={self.verification_uri!r}, ...)"


PollError = OAuthError  # an error the token endpoint answered a poll with (RFC 8628 section 3.5)


def _json_object(response: requests.Response) -> dict[str, Any] | None:
    try:
        answer = response.json()
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def _seconds_field(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e9:
        return None
    return float(value)


def _device_endpoint_error(response: requests.Response, answer: dict[str, Any] | None, url: str,
                           settings: Settings) -> FetchMemosError:
    """What a refused device authorization request means for the person (RFC 8628 section 3.2, RFC 6749 5.2)."""
    status = response.status_code
    if status >= 500:
        return fail("endpoint_down", endpoint="device authorization endpoint", url=url, answered=answered(response))
    refused = oauth_error(answer)
    if refused is None:
        return fail("device_endpoint_missing" if status == 404 else "device_endpoint_not_json", url=url, status=status)
    return oauth_failure("device_authorization", refused, url, has_secret=settings.has_credentials,
                         signs=settings.signs_assertions)


def _verification_url(value: object) -> str:
    """An http(s) URL fit to print and to hand to a browser, or "" (a server must not make us open file:// or
    print escape sequences)."""
    if not isinstance(value, str) or not value or not value.isprintable() or " " in value or len(value) > 2000:
        return ""
    try:
        parts = urlsplit(value)
    except ValueError:
        return ""
    return value if parts.scheme in ("http", "https") and parts.hostname else ""


def request_device_authorization(session: MemoSession, settings: Settings) -> DeviceAuthorization:
    """Ask for a device code and a user code (RFC 8628 section 3.1), with client authentication as configured."""
    url = settings.device_authorization_url
    if not url:
        raise fail("no_device_endpoint", where="(no device_authorization_endpoint in its metadata)"
                   if settings.metadata_fetched_at else "that fetch_memos can see (without OAUTH_ISSUER no metadata "
                                                        "is fetched)")
    # Section 3.1 and django-oauth-toolkit want client_id in the body even when HTTP Basic authenticates.
    response = session.post_form(url, {"client_id": settings.client_id, "scope": " ".join(settings.scope)})
    answer = _json_object(response)
    if response.status_code != 200 or answer is None or "error" in answer:
        raise _device_endpoint_error(response, answer, url, settings)
    device_code = answer.get("device_code")
    if not isinstance(device_code, str) or not device_code:
        raise fail("device_answer_lacks", url=url, lacks="a device_code")
    remember_secret(device_code)
    user_code = answer.get("user_code")
    if not isinstance(user_code, str) or not user_code.strip() or not user_code.isprintable() or len(user_code) > 64:
        raise fail("device_answer_lacks", url=url, lacks="a usable user_code")
    verification_uri = _verification_url(answer.get("verification_uri"))
    complete = _verification_url(answer.get("verification_uri_complete"))
    if not (verification_uri or complete):
        raise fail("device_no_verification_uri", url=url)
    interval = _seconds_field(answer.get("interval"))
    log.debug("device authorization at %s: interval %s s, valid for %s s", url, _printable(answer.get("interval")),
              _printable(answer.get("expires_in")))
    return DeviceAuthorization(
        device_code=device_code,
        user_code=user_code.strip(),
        verification_uri=verification_uri or complete,
        verification_uri_complete=complete,
        expires_in=_seconds_field(answer.get("expires_in")) or None,
        interval=DEVICE_INTERVAL if interval is None else max(interval, DEVICE_MIN_INTERVAL),
    )


def readable_user_code(code: str) -> str:
    """RFC 8628 section 6.1: a code the server sent unformatted is grouped (WDJBMJHT -> WDJB-MJHT) to read at a
    glance; one the server formatted itself is shown as sent."""
    if not (code.isascii() and code.isalnum()) or len(code) < 6:
        return code
    # Groups of four when the length divides by four or not by three (a last short group), else of three:
    # 8 -> 4-4, 9 -> 3-3-3, 10 -> 4-4-2, 12 -> 4-4-4. Short codes (under 6) are read whole.
    size = 4 if len(code) % 4 == 0 or len(code) % 3 else 3
    return "-".join(code[i:i + size] for i in range(0, len(code), size))


def show_device_code(grant: DeviceAuthorization, *, opened: bool) -> None:
    """The URL, then the code set apart, then what to do: the order a person needs them in."""
    url = grant.verification_uri_complete or grant.verification_uri
    say("Opened your browser to authorize fetch_memos; this page can be opened on any other device too:" if opened
        else "To authorize fetch_memos, open this page in a browser, on this or any other device:")
    say()
    say(f"    {url}")
    say()
    shown = readable_user_code(grant.user_code)
    say("The code is already filled in there; check that the page shows this code:" if grant.verification_uri_complete
        else "and enter this code:")
    say()
    say(f"    {shown}")
    say()
    if shown != grant.user_code:
        # Section 6.1 has servers ignore only the punctuation they added themselves; this dash is ours.
        say("(The dash is only there to make it easier to read: type the code without it.)")
    if grant.verification_uri_complete and grant.verification_uri != grant.verification_uri_complete:
        say(f"Typing the address by hand? {grant.verification_uri} asks for the code instead.")
    say("Log in if asked, and approve access for fetch_memos.")


def duration(seconds: float) -> str:
    """The one way a span of time is said: "1 h 5 min", "4 min 59 s", "2 min", "30 s"."""
    span = max(0, int(seconds + 0.5))
    if span >= 3600:
        return f"{span // 3600} h {span % 3600 // 60} min"
    if span >= 60:
        return f"{span // 60} min {span % 60} s" if span % 60 else f"{span // 60} min"
    return f"{span} s"


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no stream, or a closed one
        return False


class WaitingLine:
    """The one line that says we are waiting and how long the code stays valid.

    On a terminal it is redrawn in place with the time left (no new line per poll); otherwise it
    is printed once, so a log collects no progress noise.
    """

    def __init__(self, in_place: bool, stream: Any = None, *, until_timeout: bool = False) -> None:
        self.in_place = in_place
        self.stream = stream
        self.until_timeout = until_timeout  # OAUTH_LOGIN_TIMEOUT ends the wait before the code expires
        self._shown = ""  # the text on the open line; "" when no line is open

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(text)
        stream.flush()

    def _text(self, left: float) -> str:
        if self.until_timeout:  # never claim a shorter life for the code than the server gave it
            return f"Waiting for the approval for {duration(left)} (OAUTH_LOGIN_TIMEOUT)."
        return f"Waiting for the approval; the code is valid for {duration(left)}."

    def start(self, left: float) -> None:
        if not self.in_place:
            self._write(self._text(left) + "\n")
            return
        self.update(left)

    def update(self, left: float) -> None:
        if not self.in_place:
            return
        text = self._text(left)
        if text == self._shown:
            return
        self._write("\r" + text + " " * max(0, len(self._shown) - len(text)))
        self._shown = text

    def end(self) -> None:
        if self._shown:
            self._write("\n")
            self._shown = ""


class DevicePoller:
    """Polling the token endpoint (RFC 8628 sections 3.4-3.5) as a small state machine.

    Each poll is one token request. Between polls it waits `interval`; slow_down lengthens that
    for the rest of the flow; a connection error or a 5xx is retried after a doubled wait (3.5:
    "reduce their polling frequency"), a bounded number of times. It stops when the code's
    lifetime or the run's login timeout, whichever is first, has passed.
    """

    def __init__(self, poll: Callable[[], dict[str, Any] | PollError], *, interval: float,
                 code_lifetime: float | None, login_timeout: float, clock: Clock | None = None,
                 on_tick: Callable[[float], None] | None = None, retries: int = DEVICE_POLL_RETRIES,
                 token_url: str = "") -> None:
        self.poll = poll
        self.token_url = token_url  # named in the messages of the errors polling can end with
        self.interval = interval
        self.code_lifetime = code_lifetime
        self.login_timeout = login_timeout
        clock = clock or DEVICE_CLOCK
        self.now = clock.now
        self.sleep = clock.sleep
        self.on_tick = on_tick or (lambda _left: None)
        self.retries = retries
        self.polls = 0

    def lifetime(self) -> float:
        """Seconds this run will wait for the approval."""
        if self.code_lifetime is None:
            return self.login_timeout
        return min(self.code_lifetime, self.login_timeout)

    @property
    def until_timeout(self) -> bool:
        """Whether OAUTH_LOGIN_TIMEOUT, not the code's lifetime, ends the wait."""
        return self.code_lifetime is None or self.login_timeout < self.code_lifetime

    def _expired(self) -> FetchMemosError:
        if self.until_timeout:
            return fail("device_wait_ended", timeout=self.login_timeout)
        return fail("device_code_expired")

    def _wait(self, seconds: float, deadline: float) -> None:
        """Sleep until the next poll is due, in steps of at most a second so the waiting line can count down."""
        until = min(self.now() + seconds, deadline)
        while (step := until - self.now()) > 0:
            self.on_tick(deadline - self.now())
            self.sleep(min(step, 1.0))

    def run(self) -> dict[str, Any]:
        """Poll until the token arrives, or raise what ended the flow."""
        deadline = self.now() + self.lifetime()
        wait = self.interval
        failures = 0
        while True:
            self._wait(wait, deadline)
            self.polls += 1
            try:
                answer = self.poll()
            except TransientServerError as exc:
                failures += 1
                if failures > self.retries:
                    raise fail("poll_gave_up", problem=str(exc).rstrip("."), failures=failures) from None
                log.debug("poll %d failed (%s); waiting longer before the next", self.polls, exc)
                wait = self.interval * 2 ** failures
            else:
                failures = 0
                log.debug("poll %d: %s", self.polls, answer.error if isinstance(answer, PollError) else "a token")
                if not isinstance(answer, PollError):
                    return answer
                if answer.error == "slow_down":
                    self.interval += SLOW_DOWN_STEP
                elif answer.error != "authorization_pending":  # section 3.5: any other error stops polling
                    raise oauth_failure("device_poll", answer, self.token_url)
                wait = self.interval
            if self.now() >= deadline:
                raise self._expired()


def poll_device_token(session: MemoSession, settings: Settings, device_code: str) -> dict[str, Any] | PollError:
    """One token request with the device code (RFC 8628 section 3.4): the token, or the error answered."""
    from oauthlib.oauth2 import DeviceClient
    from oauthlib.oauth2.rfc6749.parameters import parse_token_response

    url = settings.token_url
    # oauthlib (3.2.0 on) writes the body; client_id in it even with HTTP Basic, as in the device request (3.1).
    body = DeviceClient(settings.client_id).prepare_request_body(device_code, include_client_id=True)
    try:
        response = session.post_form(url, dict(parse_qsl(body)))
    except ServerError as exc:  # post_form reports connection trouble this way: nothing was answered
        raise fail("poll_unreachable", problem=exc) from None
    if response.status_code >= 500:
        raise fail("poll_server_down", url=url, answered=answered(response))
    answer = _json_object(response)
    if answer is None:
        raise fail("poll_not_json", url=url, status=response.status_code)
    refused = oauth_error(answer)
    if refused is not None:
        return refused
    if response.status_code != 200 or not answer.get("access_token"):
        raise fail("poll_no_token", url=url, status=response.status_code)
    try:
        # oauthlib's own parser, so expires_at and the granted scope come out as after a code exchange.
        answer_text = sane_token_answer(response).text
        return run_token_request(lambda: parse_token_response(answer_text, scope=list(settings.scope)))
    except Exception as exc:  # noqa: BLE001 - mapped to our errors, or re-raised
        raise token_request_error(exc, "device_poll", settings) from None


def authorize_with_device(session: MemoSession, settings: Settings, environ: Mapping[str, str]) -> dict[str, Any]:
    """The device grant: show the URL and the code, poll until the person approved, take the token."""
    grant = request_device_authorization(session, settings)
    opened = open_in_browser(grant.verification_uri_complete or grant.verification_uri, settings, environ)
    show_device_code(grant, opened=opened)
    poller = DevicePoller(lambda: poll_device_token(session, settings, grant.device_code), interval=grant.interval,
                          code_lifetime=grant.expires_in, login_timeout=settings.login_timeout,
                          on_tick=lambda left: line.update(left), token_url=settings.token_url)
    line = WaitingLine(in_place=_is_terminal(sys.stderr), until_timeout=poller.until_timeout)
    line.start(poller.lifetime())
    try:
        token = poller.run()
    except KeyboardInterrupt:
        raise  # main() ends the open line ("\n") before it says the run was interrupted
    except BaseException:
        line.end()  # the error message gets a line of its own
        raise
    line.end()
    return session.take_new_token(token)


def check_token_folder(settings: Settings) -> None:
    """Before a person logs in: the token can be saved where OAUTH_TOKEN_FILE says (else the login is wasted).

    A real file is created and removed: os.access says yes to root and knows nothing of read-only mounts.
    """
    path = settings.token_file
    probe = path.with_name(f".{path.name}.probe-{os.getpid()}")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise fail("token_folder_unwritable", path=path, problem=exc.strerror or exc) from None


def check_server(session: MemoSession, settings: Settings) -> None:
    """Before the browser: the token endpoint answers, and a confidential client's credentials are accepted.

    One token request with a code that cannot be valid (RFC 6749 section 5.2): a server that checks the client
    first answers invalid_client (401) for bad credentials and invalid_grant for good ones (Doorkeeper needs the
    registered redirect_uri for that, which this carries). Anything else tells nothing, and the run goes on.
    Only a run that is about to send a person to log in pays this one request; a warm run never does.
    """
    url = settings.token_url
    try:
        response = session.post_form(url, {
            "grant_type": "authorization_code", "code": secrets.token_urlsafe(32),
            "redirect_uri": session.redirect_uri, "code_verifier": secrets.token_urlsafe(48)})
    except ServerError as exc:  # refused, DNS, timeout: the wire's words, and which setting points there
        setting = endpoint_setting(settings, "token_url")
        if settings.server_url == DEFAULT_SERVER_URL and settings.source("token_url") == "default":
            setting += ", still the example's default"
        raise fail("server_unreachable", problem=str(exc), setting=setting) from None
    if response.status_code == 404:
        raise not_found(settings, "token_url", "token endpoint", url)
    refused = oauth_error(response.content)
    if settings.has_credentials and refused is not None and refused.error == "invalid_client":
        raise oauth_failure("token", refused, url, signs=settings.signs_assertions)
    log.debug("the token endpoint answered a made-up code with %s %s", response.status_code,
              refused.error if refused else "")


def paste_and_exchange(session: MemoSession, settings: Settings) -> dict[str, Any]:
    """The out-of-band code grant: the person pastes the code, and may paste again when the server rejects it.

    A mistyped, doubly pasted or stale code costs only another paste: the same authorization request (state,
    PKCE verifier) stays valid, so a code the person copies again from the same page still fits it.
    """
    check_server(session, settings)
    url, state = session.authorization_url(settings.authorize_url)
    show_authorization_url(url, opened=False)
    attempts_left = PROMPT_ATTEMPTS
    rejected: AuthorizationError | None = None
    while True:
        attempts_left -= 1
        try:
            code = read_pasted_code(state, issuer=settings.issuer, issuer_required=settings.issuer_required)
        except AuthorizationError as exc:
            if rejected is not None and exc.what in ("end_of_input", "nothing_pasted"):
                raise rejected from None  # the person gave up on pasting again: the rejection is what happened
            raise
        remember_secret(code)
        try:
            return session.exchange_code(code)
        except AuthorizationError as exc:
            if exc.what != "code_rejected" or not attempts_left:
                raise
            rejected = exc
            say(str(fail("paste_again", left=attempts_left, left_word="try" if attempts_left == 1 else "tries")))


def read_code(session: MemoSession, settings: Settings, environ: Mapping[str, str]) -> str:
    """The code caught by the loopback listener (or pasted there from a browser on another machine)."""
    listener = LoopbackListener(settings.redirect_uri)
    try:
        session.redirect_uri = listener.redirect_uri
        check_server(session, settings)
        url, state = session.authorization_url(settings.authorize_url)
        listener.expected_state = state
        listener.pushed = session.pushed
        listener.expected_issuer = settings.issuer
        listener.issuer_required = settings.issuer_required
        show_authorization_url(url, opened=open_in_browser(url, settings, environ))
        say(f"Waiting for the browser on {listener.redirect_uri} ... If the browser runs on another machine, "
            "paste the address it ends up on here and press Enter:")
        prompt()
        return listener.wait(settings.login_timeout, read_terminal=True)
    finally:
        listener.close()


def authorize(session: MemoSession, settings: Settings, environ: Mapping[str, str]) -> dict[str, Any]:
    """Get a token from a person: the device grant when chosen, else the code grant (pasted or loopback)."""
    check_token_folder(settings)
    if settings.par_required and settings.par == "off" and not settings.device_flow:
        raise fail("par_required")
    session.start_grant()
    if settings.device_flow:  # the device authorization request checks the server and the client itself
        token = authorize_with_device(session, settings, environ)
    elif settings.is_oob:
        token = paste_and_exchange(session, settings)
    else:
        code = read_code(session, settings, environ)
        remember_secret(code)
        token = session.exchange_code(code)
    say("Authorized.")
    return token


def person_can_authorize(settings: Settings, stdin: Any) -> bool:
    """A person can be asked to authorize: one is at this terminal, or the device flow was chosen.

    The device flow needs nothing typed here (the code goes to stderr), so choosing it explicitly
    lets a run without a terminal authorize too.
    """
    return settings.device_flow or (stdin is not None and stdin.isatty())


# ---------------------------------------------------------------------------------------------
# 9. Commands: fetch (the default), --status, --logout.
# ---------------------------------------------------------------------------------------------

def needs_person(reason: str) -> AuthorizationError:
    """The one message for "authorizing is needed, and no person is at a terminal"."""
    return fail("needs_person", reason=reason)


class Terminal(NamedTuple):
    """Whether a person can be asked to authorize (see person_can_authorize); without one, nothing waits."""

    can_authorize: bool  # a person at this terminal, or the device flow chosen (which needs none)
    environ: Mapping[str, str]


def authorize_again(terminal: Terminal, reason: str) -> None:
    """Say why the stored token is not used, or stop when no person is here to authorize anew."""
    if not terminal.can_authorize:
        raise needs_person(reason)
    say(f"{reason} Authorizing again.")


def usable_stored_token(settings: Settings, store: TokenStore, terminal: Terminal) -> dict[str, Any] | None:
    """The stored token for these settings' server and client (the store picks it); otherwise say why and return None.

    Grants of other servers stay where they are, so a mistyped setting costs nothing: putting it right finds the
    grant again. Without a person to authorize anew this raises instead.
    """
    token = store.load()
    if token is None:
        others = store.other_servers()
        if others:
            reason = f"it was issued by {', '.join(others)}, but the configuration now points at {settings.server_url}"
            if not terminal.can_authorize:
                raise needs_person(f"the stored token cannot be used: {reason}.")
            say(f"No token stored for {settings.server_url} yet ({reason}; {store.path} keeps it for when the "
                "settings point there again).")
        return None
    added = scope_added(token, settings)
    if added:
        authorize_again(terminal, f"Not using the stored token: {added}.")
        return None
    return token


def api_json(response: requests.Response, url: str) -> Any:
    """The API's JSON, or a ServerError that says what came instead."""
    status = response.status_code
    if status == 401:
        raise fail("api_rejected_token", url=url)
    if status == 403:
        raise fail("api_forbidden", url=url)
    if status >= 400:
        raise fail("api_failed", url=url, answered=answered(response))
    if not response.content.strip():
        raise fail("api_empty", url=url, status=status)
    try:
        return response.json()
    except ValueError:
        raise fail("api_not_json", url=url, status=status,
                   content_type=_printable(response.headers.get("Content-Type", "unknown type"), 100)) from None


def call_api(session: MemoSession) -> Any:
    url = session.settings.api_url
    return api_json(session.get_with_one_refresh(url), url)


def step_up_words(asked: StepUpRequired, settings: Settings) -> tuple[str, str]:
    """(what the API asks for, a note when the scope lacks openid) in words, for one line."""
    wants = [f"acr_values={asked.acr_values}"] if asked.acr_values else []
    if asked.max_age is not None:
        wants.append(f"a login at most {asked.max_age} s old (max_age={asked.max_age})")
    note = ("; acr_values and max_age are OpenID Connect parameters, which a server may ignore or refuse without "
            "openid in OAUTH_SCOPE, and it lacks openid" if "openid" not in settings.scope else "")
    return " and ".join(wants) or "a stronger login", note


def call_api_stepping_up(session: MemoSession, terminal: Terminal) -> Any:
    """call_api, and on an RFC 9470 challenge one new authorization with what the API asks for, then one retry.

    Never a loop: a second challenge after stepping up is an error.
    """
    try:
        return call_api(session)
    except StepUpRequired as asked:
        settings = session.settings
        url = settings.api_url
        what, note = step_up_words(asked, settings)
        if not terminal.can_authorize:
            raise fail("step_up_needs_person", url=url, asked=what, note=note) from None
        say(f"The API asks for a stronger login: {what}; authorizing again with it{note}.")
        stepped = settings._replace(acr_values=asked.acr_values or settings.acr_values,
                                    max_age=asked.max_age if asked.max_age is not None else settings.max_age)
        session.settings = session.oauth.settings = stepped
        try:
            authorize(session, stepped, terminal.environ)
        except FetchMemosError as exc:
            if not note:
                raise
            # A server may refuse the parameters outright without openid: the one line says why they were sent.
            raise type(exc)(f"{str(exc).rstrip('.')}; the API asked for {what} (RFC 9470){note}.",
                            what=exc.what) from None
    try:
        return call_api(session)
    except StepUpRequired:
        raise fail("step_up_refused", url=url, asked=what, note=note) from None


def get_memos(settings: Settings, store: TokenStore, terminal: Terminal) -> Any:
    """Get the memos, authorizing first when there is no usable token and a person is here."""
    session = MemoSession(settings, store)
    try:
        token = usable_stored_token(settings, store, terminal)
        if token is None:
            if not terminal.can_authorize:
                raise needs_person("no token is stored yet.")
            authorize(session, settings, terminal.environ)
        else:
            session.use(token)
        try:
            return call_api_stepping_up(session, terminal)
        except DeadGrant as exc:
            authorize_again(terminal, str(exc))
            session.use({})
            authorize(session, settings, terminal.environ)
            return call_api_stepping_up(session, terminal)
        finally:
            session.keep_nonces()
    finally:
        session.close()


def print_json(data: Any) -> None:
    """UTF-8, not escaped, whatever the locale: stdout is for `| jq`, which gets the data exactly; a terminal gets
    the controls and bidi characters escaped (terminal_json)."""
    write_stdout(json.dumps(data, ensure_ascii=False, indent=2) + "\n", escape=terminal_json)


def write_stdout(text: str, *, escape: Callable[[str], str] | None = None) -> None:
    """The one writer of stdout, in UTF-8 whatever the locale; `escape` applies on a terminal only. A reader that
    stopped reading (`| head -1`) is no error: the rest goes to /dev/null, so neither this nor Python's flush at
    exit says anything."""
    try:
        sys.stdout.flush()
        if escape is not None and sys.stdout.isatty():
            text = escape(text)
        stream = getattr(sys.stdout, "buffer", None)  # None: a stream with no bytes under it (a test's StringIO)
        stream.write(text.encode("utf-8")) if stream else sys.stdout.write(text)
        sys.stdout.flush() if stream is None else stream.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def command_fetch(settings: Settings, store: TokenStore, terminal: Terminal) -> int:
    print_json(get_memos(settings, store, terminal))
    return 0


def _when(timestamp: float) -> str:
    """A moment as local time and how far away; a file can hold any number, so one no calendar has is said as is."""
    try:
        moment = _dt.datetime.fromtimestamp(timestamp).astimezone()
    except (ValueError, OverflowError, OSError):  # before year 1, after 9999, or beyond the C library's time_t
        return f"{timestamp!r} (not a date)"
    delta = int(timestamp - time.time())
    human = duration(abs(delta))
    relative = f"in {human}" if delta >= 0 else f"{human} ago"
    return f"{moment:%Y-%m-%d %H:%M:%S %Z} ({relative})"


def endpoint_lines(settings: Settings) -> list[str]:
    """The issuer, and each endpoint with where it came from (a setting, the metadata, or the default)."""
    if settings.issuer_via:
        fetched = (f"metadata cached {_when(settings.metadata_fetched_at)}" if settings.metadata_fetched_at
                   else "metadata not fetched yet; the next run fetches it")
        lines = [f"Issuer:        {settings.issuer} (named by the API's resource metadata {settings.issuer_via}, "
                 f"RFC 9728; {fetched})"]
    elif settings.issuer_explicit:
        fetched = (f"metadata cached {_when(settings.metadata_fetched_at)}" if settings.metadata_fetched_at
                   else "metadata not fetched yet; the next run fetches it")
        lines = [f"Issuer:        {settings.issuer} (OAUTH_ISSUER; {fetched})"]
    else:
        lines = [f"Issuer:        {settings.issuer} (from OAUTH_SERVER_URL; no metadata is fetched)"]
    labels = {"explicit": "set explicitly", "metadata": "from the metadata", "default": "default"}
    for row in ENDPOINTS:
        url = getattr(settings, row.field)
        source = settings.source(row.field)
        if source == "default" and settings.issuer_explicit:
            source_text = "default; not in the metadata" if settings.metadata_fetched_at else "default for now"
        else:
            source_text = labels[source]
        lines.append(f"{row.title:<15}{url or 'none'} ({source_text}; {row.variable})")
    return lines


def registration_lines(settings: Settings) -> list[str]:
    """The client this script registered itself (RFC 7591), and how to forget it."""
    if settings.client_registered_at is None:
        return []
    when = _when(settings.client_registered_at)
    return [f"Registered:    client {settings.client_id} registered at {settings.issuer} {when} (RFC 7591; kept in "
            f"{ClientRegistrations(settings.token_file).path}; --logout --forget-client drops it)"]


def other_grant_lines(store: TokenStore) -> list[str]:
    """The other servers the token file holds grants for: used when the settings point there again."""
    others = store.other_servers()
    return [f"Also stored:   grants for {', '.join(others)} (used when the settings point there)"] if others else []


def command_status(settings: Settings, store: TokenStore, terminal: Terminal) -> int:
    """What is stored, without any secret and without touching the network."""
    token = store.load()
    if token is None:  # exit 3, as `gh auth status` says "not logged in" with a failure
        write_stdout(terminal_text("\n".join([f"No token stored in {store.path}. Run fetch_memos.py to authorize.",
                                              *registration_lines(settings), *endpoint_lines(settings),
                                              *other_grant_lines(store)])) + "\n")
        return 3
    meta = token.get(META_KEY) or {}
    if not settings.client_id:  # --status runs without CLIENT_ID: judge the token by its own
        settings = settings._replace(client_id=meta.get("client_id", ""))
    scope = token.get("scope")
    scope_text = " ".join(scope) if isinstance(scope, list) else str(scope or " ".join(settings.scope))
    lines = [
        f"Token file:    {store.path}",
        f"Server:        {meta.get('server_url') or settings.server_url + ' (assumed: written by an older version)'}",
        f"Client id:     {meta.get('client_id') or settings.client_id}",
        f"Scope:         {scope_text}",
    ]
    expires_at = token.get("expires_at")
    if isinstance(expires_at, (int, float)):
        state = "expires" if expires_at > time.time() else "expired"
        lines.append(f"Access token:  {state} {_when(expires_at)}")
    else:
        lines.append("Access token:  expiry unknown")
    lines.append(f"Refresh token: {'stored (refreshed automatically)' if token.get('refresh_token') else 'none'}")
    dpop = meta.get("dpop") or {}
    if dpop.get("jwk"):  # the key's RFC 7638 thumbprint (the token's cnf.jkt), never the key
        lines.append(f"DPoP:          bound to the key with thumbprint {jwk_thumbprint(dpop['jwk'])} (RFC 9449)")
    lines += registration_lines(settings) + endpoint_lines(settings) + other_grant_lines(store)
    added = scope_added(token, settings)
    if added:
        lines.append(f"Note:          the next run authorizes again: {added}.")
    write_stdout(terminal_text("\n".join(lines)) + "\n")  # the scope and the endpoints came from a server
    return 0


def revoke_tokens(session: MemoSession, settings: Settings) -> str | None:
    """Revoke the refresh token, then the access token; the error code when the access token could not be.

    Raises (the caller keeps the file) for anything else that means the grant may live on.
    """
    refresh_revoked = False
    for kind in ("refresh_token", "access_token"):
        value = session.token.get(kind)
        if not value:
            continue
        response = session.post_form(settings.revoke_url, {"token": value, "token_type_hint": kind}, extras=False)
        if response.status_code == 200:
            refresh_revoked = refresh_revoked or kind == "refresh_token"
            continue
        if response.status_code == 404:
            raise fail("client_kept", problem=not_found(settings, "revoke_url", "revocation endpoint",
                                                        settings.revoke_url))
        refused = oauth_error(response.content)
        error = refused.error if refused else ""
        if kind == "access_token" and error == "unsupported_token_type" and (
                refresh_revoked or not session.token.get("refresh_token")):
            return error  # section 2.2.1: the grant is gone; this token only lives until it expires
        if refused is None:  # "401" is how OAUTH_ERRORS names a bare 401: the client was not authenticated
            refused = OAuthError("401" if response.status_code == 401 else "")
        failure = oauth_failure("revocation", refused, settings.revoke_url, has_secret=settings.has_credentials,
                         signs=settings.signs_assertions,
                                answered=answered(response), code=f" ({error})" if error else "")
        if isinstance(failure, ConfigError):
            raise fail("client_kept", problem=failure)
        session.endpoint_failed("revoke_url")
        raise failure
    return None


def command_logout(settings: Settings, store: TokenStore, terminal: Terminal) -> int:
    """Revoke this server's grant (RFC 7009), then forget it; it stays stored if revocation did not happen.

    Doorkeeper only revokes a token that is still usable: the access token must not have expired.
    And after a refresh it keeps the previous refresh token alive until the new access token is
    first used. So: refresh if needed, use the access token once, then revoke. The refresh token
    goes first: revoking it ends the grant (section 2.1), the access token then only where the
    server can (section 2.2.1 lets it refuse with unsupported_token_type).
    """
    token = store.load()
    if token is None:
        say(f"No token stored in {store.path}; nothing to revoke.")
        forget_registration(settings)
        return 0
    session = MemoSession(settings, store, token)
    try:
        dead = False
        try:
            try:
                session.get_with_one_refresh(settings.api_url)  # retires any previous refresh token (see above)
            except DeadGrant:
                dead = True  # the refresh failed; what is held may still work at the server, so revoke it anyway
            still_valid = revoke_tokens(session, settings)
        except ServerError as exc:  # down, unreachable, failing: say plainly that nothing ended
            raise fail("logout_failed", problem=str(exc), path=store.path) from None
        except ConfigError as exc:
            if not (settings.forget_client and registration_unknown(settings, exc)):
                raise
            still_valid, dead = None, True  # the server forgot the client we registered: no grant of it lives on
        kept = store.remove()  # this grant only: the file, and its lock, go with the last one
        removed = (f"its token removed from {store.path} (which keeps the grants for {', '.join(kept)})" if kept
                   else f"{store.path} removed")
        if still_valid is not None:
            expires_at = session.token.get("expires_at")
            until = _when(expires_at) if isinstance(expires_at, (int, float)) else "its expiry (not known)"
            say(f"Logged out: the grant was revoked at {settings.server_url} and {removed}. The server "
                f"cannot revoke access tokens ({still_valid}), so the last access token stays valid until {until}.")
        elif dead:
            say(f"The grant was already dead at the server; revoked what was held, and {removed}.")
        else:
            say(f"Logged out: the grant was revoked at {settings.server_url} and {removed}.")
        forget_registration(settings)
        return 0
    finally:
        session.close()


CLIENT_REFUSALS = ("client_rejected", "client_secret_missing", "client_kept")


def registration_unknown(settings: Settings, exc: FetchMemosError) -> bool:
    """The server refused the client that fetch_memos registered itself: it has most likely forgotten it."""
    return settings.client_registered_at is not None and exc.what in CLIENT_REFUSALS


def forget_registration(settings: Settings) -> None:
    """--logout keeps a registered client (the next login reuses it); --forget-client drops it here. The server
    may keep it: RFC 7592's deletion needs a registration access token, which fetch_memos does not keep."""
    if settings.client_registered_at is None:
        return
    if not settings.forget_client:
        say(f"The client registration ({settings.client_id}) is kept for the next login; --logout --forget-client "
            "drops it.")
    elif ClientRegistrations(settings.token_file).forget(settings.issuer):
        say(f"Forgot the client registration {settings.client_id} at {settings.issuer}; the next run registers "
            "anew.")


# ---------------------------------------------------------------------------------------------
# 10. main(): parse flags, run one command, turn our exceptions into one line and an exit code.
# ---------------------------------------------------------------------------------------------

def _settings_help() -> str:
    import textwrap

    lines = ["configuration (a flag beats the environment, which beats .env beside the script):"]
    for key, setting in SETTINGS.items():
        lines.append(f"  {key}" + (f" / {setting.flag}" if setting.flag else ""))
        lines.extend(f"      {line}" for line in textwrap.wrap(setting.describe(), 76))
    return "\n".join(lines)


EPILOG = """\

first run:
  It prints a URL. Open it, log in, press Authorize; the server shows a code. Paste the code
  (or the address of that page) at the prompt. With a loopback redirect (--loopback) the
  script catches the browser's redirect itself. With --device (RFC 8628) it shows a URL and a
  code to enter on any device, and waits. Later runs reuse and refresh the token.

output:
  stdout carries only the API's JSON (UTF-8), so `python fetch_memos.py | jq .` works;
  prompts and messages go to stderr. No token or secret is ever printed.

"""

def _exit_codes_help() -> str:
    import textwrap  # ~1 ms; only --help wraps text

    lines = ["exit codes:"]
    for code, meaning in EXIT_CODES.items():
        wrapped = textwrap.wrap(meaning, 86)
        lines.append(f"  {code:<4} {wrapped[0]}")
        lines.extend(f"       {line}" for line in wrapped[1:])
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """Builds the long epilog (every setting, wrapped) only when help is shown, not on every run."""

    def format_help(self) -> str:
        self.epilog = _settings_help() + "\n\n" + EPILOG + "\n" + _exit_codes_help()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fetch_memos.py",
        description="Fetch your memos from an OAuth 2.0 protected API (Doorkeeper, django-oauth-toolkit, ...) "
                    "and print them as JSON.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(command="fetch")
    commands = parser.add_mutually_exclusive_group()
    commands.add_argument("--status", dest="command", action="store_const", const="status",
                          help="show the stored token (no secrets) and exit: 0 with a token stored, 3 with none "
                               "(as `gh auth status`); needs no CLIENT_ID")
    commands.add_argument("--logout", dest="command", action="store_const", const="logout",
                          help="revoke the grant at the server (RFC 7009) and delete the token file")
    parser.add_argument("--forget-client", action="store_true",
                        help="with --logout: also forget the client fetch_memos registered itself (RFC 7591); "
                             "the next run registers anew")
    parser.add_argument("--env-file", metavar="PATH", help="read settings from this file instead of .env beside "
                                                           "the script")
    for key, setting in SETTINGS.items():
        if not setting.flag:
            continue
        if setting.switch:
            parser.add_argument(setting.flag, action="store_true", default=None,
                                help=setting.describe().replace("set to 1 to ", ""))
        else:
            parser.add_argument(setting.flag, metavar=key, help=f"{setting.describe()} [{key}]")
    parser.add_argument("--loopback", metavar="PORT", nargs="?", const=0, type=int,
                        help="catch the browser's redirect on http://127.0.0.1:PORT/callback (RFC 8252) instead "
                             "of pasting a code; without PORT a free port is chosen")
    parser.add_argument("--no-browser", action="store_true",
                        help="with a loopback redirect or the device flow, only print the URL")
    parser.add_argument("--debug", action="store_true", help="log each request to stderr (never secrets)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = terminal_text(record.getMessage())
        record.args = None
        return True


def configure_logging(debug: bool) -> None:
    """--debug shows our own and urllib3's request lines; requests-oauthlib's logs print secrets, so never those."""
    if not debug:
        return
    if any(isinstance(h, logging.StreamHandler) for h in log.handlers):
        return  # main() called again in one process
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RedactingFilter())
    handler.setFormatter(logging.Formatter("fetch_memos: debug: %(name)s: %(message)s"))
    for name in ("fetch_memos", "urllib3"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
    for name in ("requests_oauthlib", "oauthlib"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Command(NamedTuple):
    run: Callable[[Settings, TokenStore, Terminal], int]
    uses_network: bool  # False: endpoints come from the cache or the settings, never a request (--status)


# The parser's dest="command" names one of these.
COMMANDS: dict[str, Command] = {
    "fetch": Command(command_fetch, uses_network=True),
    "status": Command(command_status, uses_network=False),
    "logout": Command(command_logout, uses_network=True),
}


# The packages of requirements.txt, by the name they are imported as (all imported lazily, inside functions).
REQUIRED_MODULES = ("requests", "requests_oauthlib", "oauthlib", "dotenv", "urllib3")


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run one command; the only place that prints errors and decides the exit code."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.forget_client and args.command != "logout":
        parser.error("--forget-client goes with --logout")
    debug = args.debug
    try:
        settings = load_settings(args, environ)
        configure_logging(settings.debug)
        remember_secret(settings.client_secret)
        terminal = Terminal(can_authorize=person_can_authorize(settings, sys.stdin), environ=environ)
        command = COMMANDS[args.command]
        settings = resolve_endpoints(settings, fetch=command.uses_network)
        settings = registered_client(settings, register=args.command == "fetch")
        if not settings.client_id and args.command == "logout":  # nothing registered: no client to log out
            raise (fail("no_registration", issuer=settings.issuer) if settings.issuer_explicit else
                   fail("no_resource_metadata", api=settings.api_url))
        store = TokenStore(settings.token_file, grant_key(settings.token_url, settings.client_id, settings.api_url))
        try:
            return command.run(settings, store, terminal)
        except ConfigError as exc:
            if not registration_unknown(settings, exc) or settings.forget_client:
                raise
            raise fail("registration_forgotten", issuer=settings.issuer, client_id=settings.client_id,
                       path=ClientRegistrations(settings.token_file).path) from None
    except FetchMemosError as exc:
        print(f"fetch_memos: {terminal_text(str(exc))}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\nfetch_memos: interrupted.", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: one redacted line unless --debug asks for the traceback
        missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
        if missing and missing.partition(".")[0] in REQUIRED_MODULES:  # imported lazily, so missing only now
            print(f"fetch_memos: {fail('packages_missing', package=missing.partition('.')[0])}", file=sys.stderr,
                  flush=True)
            return 2
        if debug:
            import traceback  # only a bug under --debug needs it

            print(redact(traceback.format_exc()), file=sys.stderr)
        print(f"fetch_memos: unexpected error: {terminal_text(f'{type(exc).__name__}: {exc}')} (run with --debug for "
              "details).", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
