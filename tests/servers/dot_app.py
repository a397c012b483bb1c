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
                      bad token instead of DOT's default bare 403

Prints ``READY http://127.0.0.1:PORT`` on stdout once it accepts connections.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from datetime import timedelta
from urllib.parse import parse_qsl, urlencode

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
BEARER_CHALLENGE = os.environ.get("BEARER_CHALLENGE", "") in ("1", "true", "yes")
ACCESS_LOG = os.path.join(STATE_DIR, "access.log")

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
}

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
        "SCOPES": {"read": "Read your memos", "write": "Write memos"},
        "DEFAULT_SCOPES": ["read"],
        "REQUEST_APPROVAL_PROMPT": "force",
        # Strict where a client could cut corners: S256 only, bearer tokens only in the header.
        "COMPLIANT_BCP_RFC9700_PKCE_METHOD": True,
        "COMPLIANT_BCP_RFC9700_ACCESS_TOKEN_TRANSPORT": True,
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
    get_grant_model,
    get_id_token_model,
    get_refresh_token_model,
)
from oauth2_provider.views.generic import (  # noqa: E402
    ReadWriteScopedProtectedResourceMetadataView,
    ReadWriteScopedResourceView,
)

AccessToken = get_access_token_model()
Application = get_application_model()
Grant = get_grant_model()
IDToken = get_id_token_model()
RefreshToken = get_refresh_token_model()

_log_lock = threading.Lock()


def _redact(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, "[REDACTED]" if k.lower() in SECRET_KEYS else v) for k, v in pairs]


class AccessLogMiddleware:
    """Append one JSON line per request to $STATE_DIR/access.log (never tokens or secrets)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        auth = request.META.get("HTTP_AUTHORIZATION", "").strip()
        entry = {
            "t": time.time(),
            "method": request.method,
            "path": request.path,
            "query": urlencode(_redact(parse_qsl(request.META.get("QUERY_STRING", ""), keep_blank_values=True))),
            "status": response.status_code,
            "remote_port": _int_or_none(request.META.get("REMOTE_PORT")),
            "grant_type": None,
            "auth": auth.split(None, 1)[0].lower() if auth else None,
            # Names (not values) of form fields, so tests can tell client_secret_post from Basic.
            "body_keys": [],
        }
        if request.method == "POST" and request.content_type == "application/x-www-form-urlencoded":
            with contextlib.suppress(OSError, ValueError, SuspiciousOperation):  # unreadable body: log the rest
                entry["body_keys"] = sorted(request.POST.keys())
                if request.path == "/o/token/":
                    entry["grant_type"] = request.POST.get("grant_type")
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
    }
    return JsonResponse({"deleted": counts})


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
    return JsonResponse(
        {
            "access_tokens": access,
            "refresh_tokens": refresh,
            "grants": Grant.objects.count(),
            "active_access_tokens": sum(1 for t in access if not t["expired"]),
            "active_refresh_tokens": sum(1 for r in refresh if not r["revoked"]),
        }
    )


urlpatterns = [
    path("", home),
    path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")),
    path("accounts/login/", LoginView.as_view(template_name="registration/login.html"), name="login"),
    path("accounts/logout/", LogoutView.as_view(next_page="/"), name="logout"),
    # Bearer-token API: no cookies involved, so no CSRF check (else POST gets Django's CSRF 403 page).
    path("api/memos/", csrf_exempt((MemosChallengeView if BEARER_CHALLENGE else MemosView).as_view())),
    path("__test__/age_tokens", admin_age_tokens),
    path("__test__/reset", admin_reset),
    path("__test__/tokens", admin_tokens),
]


def seed() -> None:
    """Create (or refresh) the demo user and the confidential authorization-code client."""
    user_model = get_user_model()
    user, _ = user_model.objects.get_or_create(username=DEMO_USERNAME, defaults={"email": "demo@example.test"})
    user.set_password(DEMO_PASSWORD)
    user.save()
    redirect_uris = [DEFAULT_REDIRECT_URI] + [u for u in EXTRA_REDIRECT_URIS if u != DEFAULT_REDIRECT_URI]
    app = Application.objects.filter(client_id=CLIENT_ID).first() or Application(client_id=CLIENT_ID)
    app.name = "fetch_memos test client"
    app.user = user
    app.client_type = Application.CLIENT_CONFIDENTIAL
    app.authorization_grant_type = Application.GRANT_AUTHORIZATION_CODE
    app.redirect_uris = " ".join(redirect_uris)
    app.client_secret = CLIENT_SECRET  # plain here; ClientSecretField hashes it on save
    app.hash_client_secret = True
    app.skip_authorization = False
    app.algorithm = ""
    app.save()


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
    call_command("migrate", verbosity=0, interactive=False)
    seed()
    app = get_wsgi_application()
    httpd = ThreadedWSGIServer((HOST, PORT), _Handler, ipv6=False)
    httpd.set_app(app)
    port = httpd.server_address[1]
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
