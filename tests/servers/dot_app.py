"""Single-file django-oauth-toolkit authorization + resource server for the test suite.

Why: the client must be proven against a real, independently written OAuth 2.0 server
(not a mock), and DOT is one that runs from PyPI packages alone.  Everything lives in this
file: settings, urls, views, seeding and the HTTP server, so the tests only need
``python tests/servers/dot_app.py`` with a few environment variables:

    PORT              TCP port on 127.0.0.1 (0 or unset: an ephemeral port)
    STATE_DIR         directory for the SQLite db and access.log (required)
    ACCESS_TOKEN_TTL  access-token lifetime in seconds (default 3600)
    CLIENT_ID / CLIENT_SECRET   the seeded confidential client
    DEMO_USERNAME / DEMO_PASSWORD   the seeded resource owner
    REDIRECT_URIS     extra redirect URIs (whitespace or comma separated), added to
                      http://127.0.0.1/callback
    EXIT_WITH_PARENT  "0" keeps the server running after its parent exits (default: it exits too)
    BEARER_CHALLENGE  "1": the API answers 401 + WWW-Authenticate (RFC 6750/9728) on a
                      bad token instead of DOT's default bare 403; the challenge names DOT's own
                      RFC 9728 document, /o/.well-known/oauth-protected-resource
    RESOURCE_IS_API   "1": that document's ``resource`` is the API's URL (DOT's
                      OAUTH2_PROTECTED_RESOURCE_IDENTIFIER), as RFC 9728 section 3.3 needs for a
                      client to use it; unset, DOT's default: the URL it is mounted under (<base>/o)

Seeded beside the confidential client (each DOT application has ONE grant type):
    PUBLIC_CLIENT_ID          public authorization-code client, no secret (PKCE; client_id in the body)
    DEVICE_CLIENT_ID / DEVICE_CLIENT_SECRET   confidential device-code client (RFC 8628)
    PUBLIC_DEVICE_CLIENT_ID   public device-code client

Switches (unset = DOT's behaviour as before):
    STRICT            "1": the strict profile: ISS=on (unless ISS says otherwise), the metadata
                      advertises "none" among the token endpoint auth methods (the public client)
                      and no implicit/password grants.  RFC 8414 metadata at
                      /o/.well-known/oauth-authorization-server and S256-only PKCE are DOT's
                      (and this app's) defaults in every profile.
    ISS               RFC 9207 ``iss`` in authorization responses: "off" (default), "on" (DOT's
                      COMPLIANT_BCP_RFC9700_AUTHZ_RESPONSE_ISS), "wrong" (a different issuer's
                      value) or "omit" (none sent); for on/wrong/omit the metadata says
                      authorization_response_iss_parameter_supported: true.
    WRONG_ISS         the value ISS=wrong sends (default: this server's issuer + "/mix-up")
    NARROW_SCOPES     scopes never granted (space separated): the token response's ``scope`` says
                      what was granted; if nothing asked is left, the default scope ``read``
    REVOKE_ACCESS_TOKENS  "0": /o/revoke_token/ answers 400 unsupported_token_type (RFC 7009
                      2.2.1) for an access token; refresh tokens are still revoked
    REQUIRE_RESOURCE  "1": token requests of the authorization_code and device_code grants
                      without RFC 8707 ``resource`` get 400 invalid_target; or a space-separated
                      list of grant types to require it for (e.g. "authorization_code refresh_token")
    DEVICE_FLOW_INTERVAL  RFC 8628 polling interval in seconds (DOT's default 5)
    DEVICE_EXPIRES_IN device_code lifetime in seconds (DOT/oauthlib always say 1800)
    DEVICE_URI_COMPLETE  "1": also send verification_uri_complete (<base>/o/device/?user_code=...)
    SLOW_DOWN         N: the first N polls of each device_code get 400 slow_down (DOT never sends it)
    EXPIRE_ON_POLL    "1": a poll after the device_code's expiry gets 400 expired_token (RFC 8628 3.5).
                      DOT itself notices expiry only when the user code is entered at /o/device/;
                      until then its polls keep answering authorization_pending.
    ADVERTISE_DEVICE  "1": the metadata carries device_authorization_endpoint (DOT's has none)

Refusing a refresh whose ``scope`` asks for more than was granted (400 invalid_scope) is DOT's
own behaviour (oauthlib's refresh grant), so it needs no switch.

Access log ($STATE_DIR/access.log): one JSON object per request, written when the response is
ready, with the keys of AccessEntry (tests/servers/harness.py): started / finished (epoch seconds),
method, path and query (secrets, and the user code in DOT's /o/device-confirm/<client_id>/<user_code>
paths, redacted), status,
remote_port, auth (Authorization scheme), grant_type, body_keys (form field names),
client_auth ("basic" | "post" | "none" at the client-authenticating endpoints, else null),
params (non-secret parameters from the query and the form: scope, resource, prompt,
token_type_hint, iss, client_id, grant_type, response_type, redirect_uri, state,
code_challenge_method, action; a repeated one as a list), secret_params (names of secret parameters
present: code, code_verifier, client_secret, device_code, refresh_token, token, user_code, ...),
error (the OAuth error code answered, in a JSON body or an error redirect) and response
(non-secret parts of the answer: JSON error/scope/token_type/expires_in/interval and key names;
for a redirect its target without query, and its iss/error/state and key names).

Prints ``READY http://127.0.0.1:PORT`` on stdout once it accepts connections.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import threading
import time
from datetime import timedelta
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import django
from django.conf import settings

HOST = "127.0.0.1"
STATE_DIR = os.path.abspath(os.environ.get("STATE_DIR") or os.path.join(os.getcwd(), "dot-state"))
PORT = int(os.environ.get("PORT") or 0)
ACCESS_TOKEN_TTL = int(os.environ.get("ACCESS_TOKEN_TTL") or 3600)
CLIENT_ID = os.environ.get("CLIENT_ID") or "fetch-memos-test"
CLIENT_SECRET = os.environ.get("CLIENT_SECRET") or "fetch-memos-test-secret"
DEMO_USERNAME = os.environ.get("DEMO_USERNAME") or "demo"
DEMO_PASSWORD = os.environ.get("DEMO_PASSWORD") or "demo-password"
DEFAULT_REDIRECT_URI = "http://127.0.0.1/callback"
EXTRA_REDIRECT_URIS = (os.environ.get("REDIRECT_URIS") or "").replace(",", " ").split()


def _flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value in ("1", "true", "yes", "on")


BEARER_CHALLENGE = _flag("BEARER_CHALLENGE")
RESOURCE_IS_API = _flag("RESOURCE_IS_API")
ACCESS_LOG = os.path.join(STATE_DIR, "access.log")
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
PUBLIC_CLIENT_ID = os.environ.get("PUBLIC_CLIENT_ID") or "fetch-memos-public"
DEVICE_CLIENT_ID = os.environ.get("DEVICE_CLIENT_ID") or "fetch-memos-device"
DEVICE_CLIENT_SECRET = os.environ.get("DEVICE_CLIENT_SECRET") or "fetch-memos-device-secret"
PUBLIC_DEVICE_CLIENT_ID = os.environ.get("PUBLIC_DEVICE_CLIENT_ID") or "fetch-memos-device-public"

STRICT = _flag("STRICT")
ISS_MODE = (os.environ.get("ISS") or ("on" if STRICT else "off")).strip().lower()
if ISS_MODE in ("1", "true", "yes"):
    ISS_MODE = "on"
if ISS_MODE in ("0", "false", "no", ""):
    ISS_MODE = "off"
if ISS_MODE not in ("off", "on", "wrong", "omit"):
    sys.exit(f"dot_app: ISS must be off, on, wrong or omit, not {ISS_MODE!r}")
WRONG_ISS = os.environ.get("WRONG_ISS") or ""  # empty: the real issuer + "/mix-up", known once bound
NARROW_SCOPES = frozenset((os.environ.get("NARROW_SCOPES") or "").split())
REVOKE_ACCESS_TOKENS = _flag("REVOKE_ACCESS_TOKENS", default=True)
_require = (os.environ.get("REQUIRE_RESOURCE") or "").strip()
if _require.lower() in ("", "0", "false", "no"):
    REQUIRE_RESOURCE: frozenset[str] = frozenset()
elif _require.lower() in ("1", "true", "yes"):
    REQUIRE_RESOURCE = frozenset({"authorization_code", DEVICE_GRANT})
else:
    REQUIRE_RESOURCE = frozenset(_require.replace(",", " ").split())
DEVICE_FLOW_INTERVAL = int(os.environ.get("DEVICE_FLOW_INTERVAL") or 5)
DEVICE_EXPIRES_IN = int(os.environ.get("DEVICE_EXPIRES_IN") or 1800)
DEVICE_URI_COMPLETE = _flag("DEVICE_URI_COMPLETE")
SLOW_DOWN = int(os.environ.get("SLOW_DOWN") or 0)
ADVERTISE_DEVICE = _flag("ADVERTISE_DEVICE")
EXPIRE_ON_POLL = _flag("EXPIRE_ON_POLL")

# Query/form keys whose values must never reach the access log.
SECRET_KEYS = {
    "access_token",
    "refresh_token",
    "token",
    "code",
    "code_verifier",
    "client_secret",
    "password",
    "csrfmiddlewaretoken",
    "assertion",
    "device_code",
    "user_code",
}

# Parameters whose values the access log keeps, so tests can assert what the client sent.
LOGGED_PARAMS = (
    "scope",
    "resource",
    "prompt",
    "token_type_hint",
    "iss",
    "client_id",
    "grant_type",
    "response_type",
    "redirect_uri",
    "state",
    "code_challenge",
    "code_challenge_method",
    "action",
)
# Endpoints where a client authenticates (RFC 6749 2.3): the log says how it did.
CLIENT_ENDPOINTS = ("/o/token/", "/o/revoke_token/", "/o/introspect/", "/o/device-authorization/")

LOGIN_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in</title></head>
<body>
<h1>Sign in</h1>
{% if form.errors %}<p class="errornote">Your username and password didn't match.</p>{% endif %}
<form method="post" action="{{ request.path }}">
{% csrf_token %}
<p><label for="id_username">Username</label> {{ form.username }}</p>
<p><label for="id_password">Password</label> {{ form.password }}</p>
<input type="hidden" name="next" value="{{ next }}">
<p><button type="submit" name="login">Log in</button></p>
</form>
</body></html>
"""

# DOT's own base.html pulls a stylesheet through {% static %}; this minimal copy keeps
# DOT's authorize.html (which extends it) while avoiding staticfiles entirely.
BASE_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{% block title %}Authorize{% endblock title %}</title></head>
<body><div class="container">{% block content %}{% endblock content %}</div></body></html>
"""

settings.configure(
    DEBUG=False,
    SECRET_KEY="dot-test-server-not-secret",
    ALLOWED_HOSTS=["127.0.0.1", "localhost", "[::1]"],
    ROOT_URLCONF=__name__,
    USE_TZ=True,
    TIME_ZONE="UTC",
    INSTALLED_APPS=[
        "django.contrib.auth",
        "django.contrib.contenttypes",
        "django.contrib.sessions",
        "oauth2_provider",
    ],
    MIDDLEWARE=[
        f"{__name__}.AccessLogMiddleware",
        f"{__name__}.SwitchesMiddleware",
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.common.CommonMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
    ],
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.path.join(STATE_DIR, "db.sqlite3"),
            # Threaded server + SQLite: wait for locks instead of failing, and take the
            # write lock up front so concurrent token requests serialise cleanly.
            "OPTIONS": {
                "timeout": 20,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
        }
    },
    TEMPLATES=[
        {
            "BACKEND": "django.template.backends.django.DjangoTemplates",
            "OPTIONS": {
                "context_processors": [
                    "django.template.context_processors.request",
                    "django.contrib.auth.context_processors.auth",
                ],
                "loaders": [
                    (
                        "django.template.loaders.locmem.Loader",
                        {
                            "registration/login.html": LOGIN_TEMPLATE,
                            "oauth2_provider/base.html": BASE_TEMPLATE,
                        },
                    ),
                    "django.template.loaders.app_directories.Loader",
                ],
            },
        }
    ],
    # Fast hasher: DOT hashes client secrets (PBKDF2 by default costs ~0.3 s per token call).
    PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],
    LOGIN_URL="/accounts/login/",
    LOGIN_REDIRECT_URL="/",
    DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    LOGGING={
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"},
            "null": {"class": "logging.NullHandler"},
        },
        "loggers": {
            # access.log has every request; keep the per-request console lines out of stderr
            "django.server": {"handlers": ["null"], "propagate": False},
            "django.request": {"handlers": ["stderr"], "level": "ERROR", "propagate": False},
        },
    },
    OAUTH2_PROVIDER={
        "ACCESS_TOKEN_EXPIRE_SECONDS": ACCESS_TOKEN_TTL,
        "ROTATE_REFRESH_TOKEN": True,
        "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": 0,
        "PKCE_REQUIRED": True,
        "SCOPES": {
            "read": "Read your memos",
            "write": "Write memos",
            "offline_access": "Keep access while you are away (refresh tokens)",
        },
        "DEFAULT_SCOPES": ["read"],
        "REQUEST_APPROVAL_PROMPT": "force",
        # Strict where a client could cut corners: S256 only, bearer tokens only in the header.
        "COMPLIANT_BCP_RFC9700_PKCE_METHOD": True,
        "COMPLIANT_BCP_RFC9700_ACCESS_TOKEN_TRANSPORT": True,
        # RFC 9207; "wrong"/"omit" start from DOT's real iss and tamper with it (SwitchesMiddleware).
        "COMPLIANT_BCP_RFC9700_AUTHZ_RESPONSE_ISS": ISS_MODE != "off",
        "OAUTH2_SERVER_CLASS": f"{__name__}.TestOAuthServer",
        "OAUTH2_VALIDATOR_CLASS": f"{__name__}.TestValidator",
        "DEVICE_FLOW_INTERVAL": DEVICE_FLOW_INTERVAL,
        # The verification URIs need the bound port: main() fills them in before the first request.
        "OAUTH_DEVICE_VERIFICATION_URI": None,
        "OAUTH_DEVICE_VERIFICATION_URI_COMPLETE": None,
        **(
            {
                "COMPLIANT_BCP_RFC9700_IMPLICIT_GRANT": True,
                "COMPLIANT_BCP_RFC9700_PASSWORD_GRANT": True,
                "OAUTH2_TOKEN_ENDPOINT_AUTH_METHODS_SUPPORTED": ["client_secret_basic", "client_secret_post", "none"],
            }
            if STRICT
            else {}
        ),
    },
)
django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.contrib.auth.views import LoginView, LogoutView  # noqa: E402
from django.core.exceptions import SuspiciousOperation  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.db.models import F  # noqa: E402
from django.http import HttpRequest, HttpResponse, JsonResponse  # noqa: E402
from django.urls import include, path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402
from django.views.decorators.http import require_GET, require_POST  # noqa: E402
from oauth2_provider.models import (  # noqa: E402
    get_access_token_model,
    get_application_model,
    get_device_grant_model,
    get_grant_model,
    get_id_token_model,
    get_refresh_token_model,
)
from oauth2_provider.oauth2_validators import OAuth2Validator  # noqa: E402
from oauth2_provider.settings import oauth2_settings  # noqa: E402
from oauth2_provider.views import DeviceAuthorizationView, OAuthServerMetadataView  # noqa: E402
from oauth2_provider.views.generic import (  # noqa: E402
    ReadWriteScopedProtectedResourceMetadataView,
    ReadWriteScopedResourceView,
)
from oauthlib.oauth2 import DeviceApplicationServer, Server  # noqa: E402
from oauthlib.oauth2.rfc6749.errors import UnsupportedTokenTypeError  # noqa: E402

AccessToken = get_access_token_model()
Application = get_application_model()
DeviceGrant = get_device_grant_model()
Grant = get_grant_model()
IDToken = get_id_token_model()
RefreshToken = get_refresh_token_model()

_log_lock = threading.Lock()
_polls_lock = threading.Lock()
_polls: dict[str, int] = {}  # sha256(device_code) -> polls answered slow_down so far
BASE_URL = ""  # http://127.0.0.1:PORT, set by main() once the socket is bound


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def _redact(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, "[REDACTED]" if k.lower() in SECRET_KEYS else v) for k, v in pairs]


# DOT puts the user code in the path of its confirm and status pages.
_USER_CODE_IN_PATH = re.compile(r"(/o/device-(?:confirm|grant-status)/[^/]+/)[^/?#]+")


def _redact_path(path: str) -> str:
    return _USER_CODE_IN_PATH.sub(r"\1[REDACTED]", path)


class TestValidator(OAuth2Validator):
    """DOT's validator, plus NARROW_SCOPES (RFC 6749 3.3: the server MAY grant less than asked)."""

    def save_bearer_token(self, token, request, *args, **kwargs):
        # One place for every grant (code, device, refresh): the dict saved here is the response.
        if NARROW_SCOPES and "scope" in token:
            kept = [s for s in token["scope"].split() if s not in NARROW_SCOPES] or ["read"]
            token["scope"] = " ".join(kept)
            request.scopes = kept
        return super().save_bearer_token(token, request, *args, **kwargs)


class TestOAuthServer(Server):
    """oauthlib's all-in-one server, plus REVOKE_ACCESS_TOKENS=0."""

    def validate_revocation_request(self, request):
        super().validate_revocation_request(request)  # client authentication comes first
        if REVOKE_ACCESS_TOKENS:
            return
        client_pk = getattr(getattr(request, "client", None), "pk", None)
        if AccessToken.objects.filter(token_checksum=_sha256(request.token), application_id=client_pk).exists():
            # RFC 7009 2.2.1: a server that cannot revoke access tokens says so with this error.
            raise UnsupportedTokenTypeError(request=request)


class TestDeviceServer(DeviceApplicationServer):
    """oauthlib's device endpoint with DEVICE_EXPIRES_IN (DOT passes no expires_in: always 1800)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._expires_in = DEVICE_EXPIRES_IN


class TestDeviceAuthorizationView(DeviceAuthorizationView):
    server_class = TestDeviceServer


class TestMetadataView(OAuthServerMetadataView):
    """DOT's RFC 8414 document, plus device_authorization_endpoint when ADVERTISE_DEVICE=1."""

    def get(self, request, *args, **kwargs):
        response = super().get(request, *args, **kwargs)
        if not ADVERTISE_DEVICE or response.status_code != 200:
            return response
        data = json.loads(response.content)
        data["device_authorization_endpoint"] = request.build_absolute_uri("/o/device-authorization/")
        return JsonResponse(data)


def _oauth_error(error: str, description: str) -> JsonResponse:
    response = JsonResponse({"error": error, "error_description": description}, status=400)
    response["Cache-Control"] = "no-store"
    return response


class SwitchesMiddleware:
    """The switches that act on whole requests: SLOW_DOWN, REQUIRE_RESOURCE, ISS=wrong/omit."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.method == "POST" and request.path == "/o/token/":
            refusal = self._refuse_token_request(request)
            if refusal is not None:
                return refusal
        response = self.get_response(request)
        if request.path == "/o/authorize/" and ISS_MODE in ("wrong", "omit") and response.status_code == 302:
            response["Location"] = self._tamper_iss(response["Location"])
        return response

    @staticmethod
    def _refuse_token_request(request: HttpRequest) -> HttpResponse | None:
        with contextlib.suppress(OSError, ValueError, SuspiciousOperation):
            grant_type = request.POST.get("grant_type", "")
            if grant_type in REQUIRE_RESOURCE and not request.POST.getlist("resource"):
                return _oauth_error("invalid_target", "This server requires the resource parameter (RFC 8707).")
            device_code = request.POST.get("device_code", "")
            if SLOW_DOWN and grant_type == DEVICE_GRANT and device_code:
                key = _sha256(device_code)
                with _polls_lock:
                    seen = _polls.get(key, 0)
                    _polls[key] = seen + 1
                if seen < SLOW_DOWN:
                    return _oauth_error("slow_down", "Polling too fast; add 5 seconds to the interval (RFC 8628 3.5).")
            if EXPIRE_ON_POLL and grant_type == DEVICE_GRANT and device_code:
                # DOT marks a grant expired only when someone enters its user code; until then a
                # poll past expires_in still says authorization_pending.  is_expired() saves the mark.
                grant = DeviceGrant.objects.filter(device_code=device_code).first()
                if grant is not None and grant.status == grant.AUTHORIZATION_PENDING:
                    grant.is_expired()
        return None

    @staticmethod
    def _tamper_iss(location: str) -> str:
        parts = urlsplit(location)
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if not any(k == "iss" for k, _ in pairs):
            return location  # DOT sends iss only on success; an error redirect stays as it is
        wrong = WRONG_ISS or f"{BASE_URL}/o/mix-up"
        pairs = [(k, wrong) if k == "iss" else (k, v) for k, v in pairs if ISS_MODE != "omit" or k != "iss"]
        return urlunsplit(parts._replace(query=urlencode(pairs)))


def _form(request: HttpRequest):
    if request.method == "POST" and request.content_type == "application/x-www-form-urlencoded":
        with contextlib.suppress(OSError, ValueError, SuspiciousOperation):  # unreadable body: log the rest
            return request.POST
    return None


def _client_auth(request: HttpRequest, form) -> str | None:
    if request.path not in CLIENT_ENDPOINTS:
        return None
    if request.META.get("HTTP_AUTHORIZATION", "").strip().lower().startswith("basic "):
        return "basic"
    if form is not None and "client_secret" in form:
        return "post"
    return "none"


def _logged_params(request: HttpRequest, form) -> tuple[dict, list[str]]:
    params: dict = {}
    has: set[str] = set()
    for source in (request.GET, form):
        if source is None:
            continue
        for key in source:
            if key.lower() in SECRET_KEYS:
                has.add(key)
            elif key in LOGGED_PARAMS:
                values = source.getlist(key)
                params[key] = values[0] if len(values) == 1 else values
    return params, sorted(has)


def _logged_response(response: HttpResponse) -> tuple[dict, str | None]:
    """The non-secret parts of an answer: what the client was told, without tokens or codes."""
    if response.status_code in (301, 302, 303, 307, 308) and response.has_header("Location"):
        parts = urlsplit(response["Location"])
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        keep = {k: v for k, v in pairs if k in ("iss", "error", "state")}
        target = _redact_path(urlunsplit(parts._replace(query="", fragment="")))
        return {"location": target, **keep, "keys": sorted({k for k, _ in pairs})}, keep.get("error")
    if response.get("Content-Type", "").startswith("application/json") and not response.streaming:
        try:
            data = json.loads(response.content)
        except ValueError:
            return {}, None
        if isinstance(data, dict):
            keep = {k: data[k] for k in ("error", "scope", "token_type", "expires_in", "interval") if k in data}
            return {**keep, "keys": sorted(data)}, data.get("error") if isinstance(data.get("error"), str) else None
    return {}, None


class AccessLogMiddleware:
    """Append one JSON line per request to $STATE_DIR/access.log (never tokens or secrets)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        started = time.time()
        response = self.get_response(request)
        auth = request.META.get("HTTP_AUTHORIZATION", "").strip()
        form = _form(request)
        params, has = _logged_params(request, form)
        answer, error = _logged_response(response)
        entry = {  # the keys of AccessEntry (tests/servers/harness.py)
            "started": started,
            "finished": time.time(),
            "method": request.method,
            "path": _redact_path(request.path),
            "query": urlencode(_redact(parse_qsl(request.META.get("QUERY_STRING", ""), keep_blank_values=True))),
            "status": response.status_code,
            "remote_port": _int_or_none(request.META.get("REMOTE_PORT")),
            "grant_type": form.get("grant_type") if form is not None and request.path == "/o/token/" else None,
            "auth": auth.split(None, 1)[0].lower() if auth else None,
            # Names (not values) of form fields, so tests can tell client_secret_post from Basic.
            "body_keys": sorted(form.keys()) if form is not None else [],
            "client_auth": _client_auth(request, form),
            "params": params,
            "secret_params": has,
            "error": error,
            "response": answer,
        }
        line = json.dumps(entry, ensure_ascii=False)
        with _log_lock, open(ACCESS_LOG, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
        return response


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class _MemosMixin:
    def get(self, request, *args, **kwargs):
        body = json.dumps({"message": "ふじ"}, ensure_ascii=False)
        return HttpResponse(body.encode("utf-8"), content_type="application/json; charset=utf-8")

    def post(self, request, *args, **kwargs):
        body = json.dumps({"created": True}, ensure_ascii=False)
        return HttpResponse(body.encode("utf-8"), status=201, content_type="application/json; charset=utf-8")


class MemosView(_MemosMixin, ReadWriteScopedResourceView):
    """GET needs scope ``read``, POST ``write``; bad tokens get DOT's default bare 403."""


class MemosChallengeView(_MemosMixin, ReadWriteScopedProtectedResourceMetadataView):
    """Same resource, but bad tokens get 401 + ``WWW-Authenticate: Bearer error=...``."""


def home(request: HttpRequest) -> HttpResponse:
    who = request.user.get_username() if request.user.is_authenticated else "anonymous"
    return HttpResponse(f"DOT test server; you are {who}.\n", content_type="text/plain; charset=utf-8")


@csrf_exempt
@require_POST
def admin_age_tokens(request: HttpRequest) -> JsonResponse:
    """Move every access token's expiry N seconds into the past (simulate time passing)."""
    seconds = int(request.GET.get("seconds", "0"))
    n = AccessToken.objects.update(expires=F("expires") - timedelta(seconds=seconds))
    return JsonResponse({"aged": n, "seconds": seconds})


@csrf_exempt
@require_POST
def admin_reset(request: HttpRequest) -> JsonResponse:
    """Forget every grant and token; the seeded user, client and sessions stay."""
    counts = {
        "grants": Grant.objects.all().delete()[0],
        "refresh_tokens": RefreshToken.objects.all().delete()[0],
        "access_tokens": AccessToken.objects.all().delete()[0],
        "id_tokens": IDToken.objects.all().delete()[0],
        "device_grants": DeviceGrant.objects.all().delete()[0],
    }
    with _polls_lock:
        _polls.clear()
    return JsonResponse({"deleted": counts})


@csrf_exempt
@require_POST
def admin_expire_device_codes(request: HttpRequest) -> JsonResponse:
    """Move every device grant's expiry into the past, as time would (DOT notices it only when the
    user code is entered, or at the next poll with EXPIRE_ON_POLL=1)."""
    from django.utils import timezone

    n = DeviceGrant.objects.update(expires=timezone.now() - timedelta(seconds=1))
    return JsonResponse({"expired": n})


@require_GET
def admin_tokens(request: HttpRequest) -> JsonResponse:
    """Summary of grants/tokens for assertions; never includes token strings."""
    from django.utils import timezone

    now = timezone.now()
    access = [
        {
            "id": t.id,
            "user": t.user.get_username() if t.user_id else None,
            "application": t.application.client_id if t.application_id else None,
            "scope": t.scope,
            "expires": t.expires.isoformat(),
            "expired": t.expires <= now,
            "refresh_token_id": t.source_refresh_token_id,
        }
        for t in AccessToken.objects.select_related("user", "application").order_by("id")
    ]
    refresh = [
        {
            "id": r.id,
            "user": r.user.get_username() if r.user_id else None,
            "access_token_id": r.access_token_id,
            "revoked": r.revoked.isoformat() if r.revoked else None,
        }
        for r in RefreshToken.objects.select_related("user").order_by("id")
    ]
    device = [
        {
            "id": d.id,
            "client_id": d.client_id,
            "user": d.user.get_username() if d.user_id else None,
            "scope": d.scope,
            "status": d.status,
            "interval": d.interval,
            "expires": d.expires.isoformat(),
            "expired": d.expires <= now,
        }
        for d in DeviceGrant.objects.select_related("user").order_by("id")
    ]
    return JsonResponse(
        {
            "access_tokens": access,
            "refresh_tokens": refresh,
            "device_grants": device,
            "grants": Grant.objects.count(),
            "active_access_tokens": sum(1 for t in access if not t["expired"]),
            "active_refresh_tokens": sum(1 for r in refresh if not r["revoked"]),
        }
    )


urlpatterns = [
    path("", home),
    # Before DOT's own routes, so these (thin subclasses of DOT's views) answer at the same URLs.
    path("o/device-authorization/", TestDeviceAuthorizationView.as_view()),
    path("o/.well-known/oauth-authorization-server", TestMetadataView.as_view()),
    path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")),
    path("accounts/login/", LoginView.as_view(template_name="registration/login.html"), name="login"),
    path("accounts/logout/", LogoutView.as_view(next_page="/"), name="logout"),
    # Bearer-token API: no cookies involved, so no CSRF check (else POST gets Django's CSRF 403 page).
    path("api/memos/", csrf_exempt((MemosChallengeView if BEARER_CHALLENGE else MemosView).as_view())),
    path("__test__/age_tokens", admin_age_tokens),
    path("__test__/reset", admin_reset),
    path("__test__/tokens", admin_tokens),
    path("__test__/expire_device_codes", admin_expire_device_codes),
]


def _seed_application(client_id: str, name: str, user, *, public: bool, grant_type: str, secret: str,
                      redirect_uris: list[str]) -> None:
    app = Application.objects.filter(client_id=client_id).first() or Application(client_id=client_id)
    app.name = name
    app.user = user
    app.client_type = Application.CLIENT_PUBLIC if public else Application.CLIENT_CONFIDENTIAL
    app.authorization_grant_type = grant_type
    app.redirect_uris = " ".join(redirect_uris)
    app.client_secret = "" if public else secret  # plain here; ClientSecretField hashes it on save
    app.hash_client_secret = True
    app.skip_authorization = False
    app.algorithm = ""
    app.save()


def seed() -> None:
    """Create (or refresh) the demo user and the clients: confidential and public, code and device."""
    user_model = get_user_model()
    user, _ = user_model.objects.get_or_create(username=DEMO_USERNAME, defaults={"email": "demo@example.test"})
    user.set_password(DEMO_PASSWORD)
    user.save()
    redirect_uris = [DEFAULT_REDIRECT_URI] + [u for u in EXTRA_REDIRECT_URIS if u != DEFAULT_REDIRECT_URI]
    code = Application.GRANT_AUTHORIZATION_CODE
    _seed_application(CLIENT_ID, "fetch_memos test client", user, public=False, grant_type=code,
                      secret=CLIENT_SECRET, redirect_uris=redirect_uris)
    _seed_application(PUBLIC_CLIENT_ID, "fetch_memos public test client", user, public=True, grant_type=code,
                      secret="", redirect_uris=redirect_uris)
    _seed_application(DEVICE_CLIENT_ID, "fetch_memos device test client", user, public=False,
                      grant_type=DEVICE_GRANT, secret=DEVICE_CLIENT_SECRET, redirect_uris=[])
    _seed_application(PUBLIC_DEVICE_CLIENT_ID, "fetch_memos public device test client", user, public=True,
                      grant_type=DEVICE_GRANT, secret="", redirect_uris=[])


def configure_base_url(base_url: str) -> None:
    """Settings that need the bound port, applied before the first request builds DOT's oauthlib server."""
    global BASE_URL
    BASE_URL = base_url
    provider = settings.OAUTH2_PROVIDER
    provider["OAUTH_DEVICE_VERIFICATION_URI"] = f"{base_url}/o/device/"
    if RESOURCE_IS_API:
        provider["OAUTH2_PROTECTED_RESOURCE_IDENTIFIER"] = f"{base_url}/api/memos/"
    if DEVICE_URI_COMPLETE:
        provider["OAUTH_DEVICE_VERIFICATION_URI_COMPLETE"] = f"{base_url}/o/device/?user_code={{user_code}}"
    oauth2_settings.reload()


class _Handler(WSGIRequestHandler):
    """Django's HTTP/1.1 keep-alive handler, plus REMOTE_PORT for the access log."""

    def get_environ(self):
        env = super().get_environ()
        env["REMOTE_PORT"] = str(self.client_address[1])
        return env


def _exit_with_parent() -> None:
    """Die when the process that started us does (a crashed pytest must not leave servers behind)."""
    parent = os.getppid()
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)


def main() -> int:
    if os.environ.get("EXIT_WITH_PARENT", "1") == "1":
        threading.Thread(target=_exit_with_parent, daemon=True).start()
    os.makedirs(STATE_DIR, exist_ok=True)
    httpd = ThreadedWSGIServer((HOST, PORT), _Handler, ipv6=False)
    port = httpd.server_address[1]
    configure_base_url(f"http://{HOST}:{port}")
    call_command("migrate", verbosity=0, interactive=False)
    seed()
    httpd.set_app(get_wsgi_application())
    print(f"READY http://{HOST}:{port}", flush=True)
    try:
        httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
