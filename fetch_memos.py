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

The file reads top to bottom in the order a run meets things: settings, token store,
authorization, session, commands, main().
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import errno
import functools
import json
import logging
import os
import pickle
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:  # the HTTP stack is imported lazily so that --help and --status stay instant
    import requests
    from requests_oauthlib import OAuth2Session

__version__ = "1.0.0"

log = logging.getLogger("fetch_memos")

OOB_REDIRECT_URI = "urn:ietf:wg:oauth:2.0:oob"
DEFAULT_SERVER_URL = "http://localhost:3801"
DEFAULT_TOKEN_FILE_NAME = "oauth_token.pickle"
SCRIPT_DIR = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------
# Errors: each one the script reports is a class carrying its exit code; main() prints it.
# ---------------------------------------------------------------------------------------------


class FetchMemosError(Exception):
    """An expected failure: main() prints its message as one line and exits with its code."""

    exit_code = 1


class ServerError(FetchMemosError):
    """The server or the API failed: unreachable, timed out, 5xx, 4xx from the API, bad body."""

    exit_code = 1


class ConfigError(FetchMemosError):
    """Usage or configuration is wrong, including client credentials the server rejects."""

    exit_code = 2


class AuthorizationError(FetchMemosError):
    """Authorization failed, or needs a person and none is at the terminal."""

    exit_code = 3


class DeadGrant(AuthorizationError):
    """The stored grant no longer works (revoked, expired, or the server forgot it)."""


# Secrets seen during the run; every log record and error message passes through redact().
_SECRETS: set[str] = set()


def remember_secret(*values: object) -> None:
    """Register values that must never be printed (tokens, client secret, code, PKCE verifier)."""
    for value in values:
        if isinstance(value, str) and len(value) >= 4:
            _SECRETS.add(value)


def redact(text: str) -> str:
    """Replace every known secret in text: the last line of defence for messages and logs."""
    for value in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(value, "[redacted]")
    return text


def warn(message: str) -> None:
    """A warning does not stop the run; it still goes to stderr, never stdout."""
    print(f"fetch_memos: warning: {redact(message)}", file=sys.stderr, flush=True)


def say(message: str = "") -> None:
    """Prompts and progress go to stderr, so that stdout carries only the API's JSON."""
    print(redact(message), file=sys.stderr, flush=True)


def prompt() -> None:
    """The "> " the person types after; the line stays open for their answer."""
    print("> ", end="", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# 1. Settings: defaults, then .env, then the environment, then flags; validated here, once.
# ---------------------------------------------------------------------------------------------

# Every setting: (environment variable, flag, help). The flag's dest is the lower-case name.
SETTINGS_HELP: dict[str, tuple[str, str]] = {
    "CLIENT_ID": ("--client-id", "the OAuth application's client id (required)"),
    "CLIENT_SECRET": ("", "the application's client secret (required; .env or environment only, "
                          "never a flag, because other users can read a command line)"),
    "OAUTH_SERVER_URL": ("--server-url", f"the authorization server (default {DEFAULT_SERVER_URL})"),
    "OAUTH_AUTHORIZE_URL": ("--authorize-url", "authorization endpoint (default <server>/oauth/authorize)"),
    "OAUTH_TOKEN_URL": ("--token-url", "token endpoint (default <server>/oauth/token)"),
    "OAUTH_REVOKE_URL": ("--revoke-url", "revocation endpoint, RFC 7009 (default <server>/oauth/revoke)"),
    "MEMOS_API_URL": ("--api-url", "the protected JSON API (default <server>/api/memos/)"),
    "OAUTH_SCOPE": ("--scope", "space-separated scopes to ask for (default read)"),
    "OAUTH_REDIRECT_URI": ("--redirect-uri", f"redirect URI registered for the app (default {OOB_REDIRECT_URI}; "
                                             "a http://127.0.0.1:PORT/... URI catches the redirect itself)"),
    "OAUTH_TOKEN_FILE": ("--token-file", f"where the token is kept (default {DEFAULT_TOKEN_FILE_NAME} beside "
                                         "the script; a relative path is relative to the current folder)"),
    "OAUTH_TIMEOUT": ("--timeout", "seconds each HTTP request may take (default 10)"),
    "OAUTH_LOGIN_TIMEOUT": ("--login-timeout", "seconds to wait for the browser's redirect (default 300)"),
    "OAUTH_ALLOW_INSECURE_HTTP": ("--allow-insecure-http", "set to 1 to allow plain http to a host that is "
                                                           "not this machine (tokens then cross the network "
                                                           "unencrypted)"),
}


@dataclass(frozen=True)
class Settings:
    """Everything a run needs to know, validated; nothing after this re-checks it."""

    client_id: str
    client_secret: str
    server_url: str
    authorize_url: str
    token_url: str
    revoke_url: str
    api_url: str
    scope: tuple[str, ...]
    redirect_uri: str
    token_file: Path
    timeout: float
    login_timeout: float
    allow_insecure_http: bool
    open_browser: bool = True
    debug: bool = False

    @property
    def is_oob(self) -> bool:
        return self.redirect_uri == OOB_REDIRECT_URI

    @property
    def uses_plain_http(self) -> bool:
        urls = (self.authorize_url, self.token_url, self.revoke_url, self.api_url)
        return any(url.lower().startswith("http://") for url in urls)


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


def _check_url(name: str, value: str, allow_insecure_http: bool) -> str:
    try:
        parts = _split_url(value)
    except ValueError as exc:
        raise ConfigError(f"{name}={value!r} is not a valid URL ({exc}).") from None
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


def _check_redirect_uri(value: str) -> str:
    if value == OOB_REDIRECT_URI:
        return value
    try:
        parts = _split_url(value)
    except ValueError as exc:
        raise ConfigError(f"OAUTH_REDIRECT_URI={value!r} is not a valid URL ({exc}).") from None
    if parts.scheme != "http" or not is_loopback_host(parts.hostname):
        raise ConfigError(
            f"OAUTH_REDIRECT_URI={value!r} is not supported: use {OOB_REDIRECT_URI} (copy and paste) or a "
            "loopback address such as http://127.0.0.1:8765/callback (RFC 8252)."
        )
    return value


def _positive_seconds(name: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a number of seconds.") from None
    if not 0 < seconds <= 3600:
        raise ConfigError(f"{name}={value!r} must be more than 0 and at most 3600 seconds.")
    return seconds


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def read_env_file(path: Path) -> dict[str, str]:
    """Values from a .env file, without touching os.environ (the tests import this module)."""
    try:
        from dotenv import dotenv_values

        # No ${VAR} interpolation: a secret may contain "$", and values must mean what they say.
        values = dotenv_values(path, interpolate=False, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; save it as UTF-8.") from None
    return {key: value for key, value in values.items() if value is not None}


def warn_if_others_can_read(env_file: Path, values: Mapping[str, str]) -> None:
    """A .env holding the client secret should be 0600. OpenSSH refuses such a key file; we only warn, on each run
    until it is fixed, and never change the file (it is the person's)."""
    if sys.platform == "win32" or not values.get("CLIENT_SECRET", "").strip():
        return  # Windows: ACLs decide, and st_mode cannot tell
    try:
        mode = env_file.stat().st_mode
    except OSError:
        return
    if mode & 0o044:
        warn(f"{env_file} holds the client secret and other users can read it (mode {mode & 0o777:o}); "
             f"make it private: chmod 600 {env_file}")


def load_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Merge defaults < .env < environment < flags, then validate everything in one place."""
    env_file = Path(args.env_file) if args.env_file else SCRIPT_DIR / ".env"
    merged: dict[str, str] = {}
    if args.env_file and not env_file.is_file():
        raise ConfigError(f"--env-file {env_file} does not exist.")
    from_file = read_env_file(env_file) if env_file.is_file() else {}
    merged.update(from_file)
    merged.update({key: environ[key] for key in SETTINGS_HELP if key in environ})
    for key, (flag, _help) in SETTINGS_HELP.items():
        value = getattr(args, flag[2:].replace("-", "_"), None) if flag else None
        if value is not None and value is not False:
            merged[key] = "1" if value is True else str(value)

    def get(key: str, default: str = "") -> str:
        return merged.get(key, default).strip()

    for key in ("CLIENT_ID", "CLIENT_SECRET"):
        if not get(key):
            where = "is empty" if key in merged else "is not set"
            raise ConfigError(
                f"{key} {where}. Copy .env.example to .env beside fetch_memos.py and fill in the client "
                "credentials of your OAuth application (or set the environment variable)."
            )
    allow_insecure = _truthy(get("OAUTH_ALLOW_INSECURE_HTTP", "0"))
    server_url = _check_url("OAUTH_SERVER_URL", get("OAUTH_SERVER_URL") or DEFAULT_SERVER_URL, allow_insecure)
    base = server_url.rstrip("/")
    urls = {
        "OAUTH_AUTHORIZE_URL": base + "/oauth/authorize",
        "OAUTH_TOKEN_URL": base + "/oauth/token",
        "OAUTH_REVOKE_URL": base + "/oauth/revoke",
        "MEMOS_API_URL": base + "/api/memos/",
    }
    for key, default in urls.items():
        urls[key] = _check_url(key, get(key) or default, allow_insecure)

    redirect_uri = _check_redirect_uri(get("OAUTH_REDIRECT_URI") or OOB_REDIRECT_URI)
    if getattr(args, "loopback", None) is not None:
        redirect_uri = f"http://127.0.0.1:{args.loopback}/callback"
    scope = tuple((get("OAUTH_SCOPE") or "read").replace(",", " ").split())
    if not scope:
        raise ConfigError(f"OAUTH_SCOPE={get('OAUTH_SCOPE')!r} names no scope; set it to e.g. read.")
    try:
        token_file = Path(get("OAUTH_TOKEN_FILE")).expanduser() if get("OAUTH_TOKEN_FILE") else (
            SCRIPT_DIR / DEFAULT_TOKEN_FILE_NAME)
    except RuntimeError as exc:  # ~user that does not exist
        raise ConfigError(f"OAUTH_TOKEN_FILE={get('OAUTH_TOKEN_FILE')!r}: {exc}.") from None
    if from_file:  # after validation: a run stopped by a configuration error says only that
        warn_if_others_can_read(env_file, from_file)
    return Settings(
        client_id=get("CLIENT_ID"),
        client_secret=get("CLIENT_SECRET"),
        server_url=server_url,
        authorize_url=urls["OAUTH_AUTHORIZE_URL"],
        token_url=urls["OAUTH_TOKEN_URL"],
        revoke_url=urls["OAUTH_REVOKE_URL"],
        api_url=urls["MEMOS_API_URL"],
        scope=scope,
        redirect_uri=redirect_uri,
        token_file=token_file.absolute(),
        timeout=_positive_seconds("OAUTH_TIMEOUT", get("OAUTH_TIMEOUT") or "10"),
        login_timeout=_positive_seconds("OAUTH_LOGIN_TIMEOUT", get("OAUTH_LOGIN_TIMEOUT") or "300"),
        allow_insecure_http=allow_insecure,
        open_browser=not getattr(args, "no_browser", False),
        debug=bool(getattr(args, "debug", False)),
    )


# ---------------------------------------------------------------------------------------------
# 2. Token store: the only code that opens the token file.
# ---------------------------------------------------------------------------------------------

MAX_TOKEN_FILE_BYTES = 64 * 1024
META_KEY = "fetch_memos"  # our keys, beside the token fields the server sent


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


class BadTokenFile(Exception):
    """The file is not a token this script can use; the store sets it aside."""


MAX_MEMO_INDEX = 4096  # a token needs a few dozen memo slots


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
                        not isinstance(arg, int) or arg > MAX_MEMO_INDEX):
                    raise BadTokenFile("it is damaged (an out-of-range memo index)")
    except (ValueError, TypeError) as exc:
        raise BadTokenFile(f"it is damaged or truncated ({exc})") from None


# Calls, extension-registry and buffer opcodes, and Python 2 byte strings: no token ever needs them.
_REFUSED_OPCODES = frozenset({"REDUCE", "INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID",
                              "NEWOBJ_EX", "BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER",
                              "STRING", "BINSTRING", "SHORT_BINSTRING"})


def parse_token_bytes(data: bytes) -> dict[str, Any]:
    """Turn the file's bytes into a token dict, or raise BadTokenFile; never runs code from the file."""
    import io

    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise BadTokenFile(f"it is {len(data)} bytes, far more than a token")
    _check_opcodes(data)
    try:
        obj = _TokenUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise BadTokenFile(f"it is not a token file ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - a damaged pickle can fail in many ways, all meaning "not a token"
        raise BadTokenFile(f"it is damaged or truncated ({type(exc).__name__})") from None
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
    return token


class TokenStore:
    """The pickle file holding one token dict, plus a lock file beside it that serialises refreshes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self._lock_depth = 0
        self._lock_file: Any = None
        self._last_saved: dict[str, Any] | None = None

    def load(self) -> dict[str, Any] | None:
        """The stored token, or None when there is none; a bad file is set aside, never deleted."""
        try:
            with open(self.path, "rb") as handle:
                mode = os.fstat(handle.fileno()).st_mode
                data = handle.read(MAX_TOKEN_FILE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(
                f"cannot read the token file {self.path}: {exc.strerror or exc}. Fix its permissions, or "
                "point OAUTH_TOKEN_FILE elsewhere."
            ) from None
        try:
            token = parse_token_bytes(data)
        except BadTokenFile as exc:
            aside = self.set_aside()
            warn(f"the token file {self.path} was not usable: {exc}. It was set aside as {aside}.")
            return None
        # Windows has ACLs, not these bits (its st_mode says 0o666 for any writable file): nothing true to say there.
        if mode & 0o077 and sys.platform != "win32":
            with contextlib.suppress(OSError):
                os.chmod(self.path, 0o600)
                warn(f"the token file {self.path} was readable by other users (mode {mode & 0o777:o}); "
                     "it is now 0600.")
        remember_secret(token.get("access_token"), token.get("refresh_token"))
        return token

    def save(self, token: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        """Write atomically (temp file, fsync, rename) with mode 0600, so a crash leaves old or new, never half."""
        record = {key: value for key, value in token.items() if key != META_KEY}
        record[META_KEY] = dict(meta, saved_at=time.time())
        if self._last_saved is not None and _same_token(self._last_saved, record):
            return
        data = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
        directory = self.path.parent
        tmp = directory / f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        with self.locked():
            self._remove_stale_temp_files()
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    with os.fdopen(fd, "wb") as handle:
                        handle.write(data)
                        handle.flush()
                        os.fsync(handle.fileno())
                    os.replace(tmp, self.path)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                with contextlib.suppress(OSError):
                    dir_fd = os.open(directory, os.O_RDONLY)
                    try:
                        os.fsync(dir_fd)
                    finally:
                        os.close(dir_fd)
            except OSError as exc:
                raise TokenNotSaved(f"the token could not be saved to {self.path}: {exc.strerror or exc}") from None
        self._last_saved = record

    def _remove_stale_temp_files(self) -> None:
        """A run killed while saving leaves its temp file, which holds a token: remove it once its writer is gone."""
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            if sys.platform == "win32":
                # os.kill(pid, 0) there would send CTRL_C_EVENT (= 0) or terminate the process, not probe it:
                # a writer holds its temp file for milliseconds, so one a minute old is stale.
                with contextlib.suppress(OSError):
                    if time.time() - stale.stat().st_mtime > 60:
                        stale.unlink()
                continue
            try:
                pid = int(stale.name[len(self.path.name) + 2:].split(".")[0])
                os.kill(pid, 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    stale.unlink()
            except (ValueError, OSError):
                continue

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def set_aside(self, label: str = "bad") -> Path:
        """Keep a file we will not use under a new name instead of deleting it: nothing is lost."""
        stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.{label}-{stamp}-{secrets.token_hex(2)}")
        try:
            os.replace(self.path, aside)
            with contextlib.suppress(OSError):
                os.chmod(aside, 0o600)  # it may still hold tokens
        except OSError as exc:
            raise ConfigError(f"the token file {self.path} is not usable and could not be set aside: "
                              f"{exc.strerror or exc}. Move it away by hand.") from None
        return aside

    @contextlib.contextmanager
    def locked(self, wait: float = 60.0) -> Iterator[None]:
        """An exclusive lock across runs; the kernel drops it when a run dies, so it never goes stale."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        try_lock, unlock = _file_lock_functions()
        handle = None
        if try_lock is not None:
            try:
                handle = open(self.lock_path, "a+b")  # noqa: SIM115 - held for the duration of the lock
                with contextlib.suppress(OSError):
                    os.chmod(self.lock_path, 0o600)
            except OSError as exc:
                log.debug("no lock file at %s (%s); continuing without a lock", self.lock_path, exc)
        if handle is not None:
            deadline = time.monotonic() + wait
            while True:
                try:
                    try_lock(handle.fileno())
                    break
                except OSError as exc:
                    if exc.errno not in _LOCK_BUSY:
                        raise
                    if time.monotonic() > deadline:
                        handle.close()
                        raise ServerError(f"another fetch_memos run has held {self.lock_path} for over "
                                          f"{wait:g} s; try again when it has finished.") from None
                    time.sleep(0.02)
        self._lock_depth = 1
        try:
            yield
        finally:
            self._lock_depth = 0
            if handle is not None:
                with contextlib.suppress(OSError):
                    unlock(handle.fileno())
                handle.close()


# What a non-blocking lock attempt raises while another run holds the lock (msvcrt: EACCES or EDEADLOCK).
_LOCK_BUSY = {errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, getattr(errno, "EDEADLOCK", errno.EDEADLK)}


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


class TokenNotSaved(FetchMemosError):
    """Saving failed; the caller decides whether the run can still succeed."""

    exit_code = 1


def _same_token(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a.get("access_token") == b.get("access_token") and a.get("refresh_token") == b.get("refresh_token")


def token_meta(settings: Settings) -> dict[str, Any]:
    """What we record beside a token: the token is only ever sent back where it came from."""
    return {"version": 1, "server_url": settings.server_url, "token_url": settings.token_url,
            "api_url": settings.api_url, "client_id": settings.client_id, "scope": list(settings.scope)}


def token_mismatch(token: Mapping[str, Any], settings: Settings) -> str | None:
    """Why a stored token must not be used with these settings, or None when it may."""
    meta = token.get(META_KEY)
    if not meta:  # written by the original script, which only knew one server: adopt it
        return None
    if meta.get("token_url") != settings.token_url or _origin(meta.get("api_url", "")) != _origin(settings.api_url):
        return f"it was issued by {meta.get('server_url')}, but the configuration now points at {settings.server_url}"
    if meta.get("client_id") != settings.client_id:
        return "it was issued to a different CLIENT_ID"
    return None


def _origin(url: str) -> tuple[str, str, int | None]:
    try:
        parts = urlsplit(url)
        return parts.scheme, (parts.hostname or ""), parts.port
    except ValueError:  # not a URL we could have written: it matches nothing
        return "", url, None


# ---------------------------------------------------------------------------------------------
# 3. Authorization: build the URL (PKCE S256, state), get the code (paste or loopback), exchange it.
# ---------------------------------------------------------------------------------------------

PROMPT_ATTEMPTS = 3


def _same_text(a: str, b: str) -> bool:
    """Constant-time comparison that also takes non-ASCII text (compare_digest refuses it as str)."""
    return secrets.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


def _raise_authorization_error(error: str, description: str) -> None:
    """Report an error the authorization endpoint sent back (RFC 6749 section 4.1.2.1)."""
    detail = f" ({description})" if description else ""
    if error == "access_denied":
        raise AuthorizationError(f"authorization was denied at the server{detail}; run again and press "
                                 "Authorize to allow access.")
    raise AuthorizationError(f"the server refused the authorization: {error}{detail}.")


def parse_pasted(text: str, expected_state: str) -> str:
    """The code from what a person pasted: a bare code, or the URL of the code page or of a redirect.

    Quotes and spaces that come along with a copy are dropped. A URL's `error=` is reported, and its
    `state`, when present, must be ours (Doorkeeper's out-of-band page carries none).
    """
    cleaned = "".join(text.split()).strip("'\"<>`")
    if not cleaned:
        raise ValueError("empty")
    if text.strip().startswith("{"):  # Doorkeeper's out-of-band Deny answers with a JSON error, not a page
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            _raise_authorization_error(answer["error"], str(answer.get("error_description") or ""))
    looks_like_url = "://" in cleaned or cleaned.startswith("/") or "?" in cleaned or "code=" in cleaned
    if not looks_like_url:
        if not all(0x21 <= ord(ch) <= 0x7E for ch in cleaned):
            raise AuthorizationError("that does not look like an authorization code; paste the code the "
                                     "server showed, or the whole address of that page.")
        return cleaned
    try:
        query = urlsplit(cleaned).query or cleaned.partition("?")[2] or cleaned
    except ValueError:
        raise AuthorizationError("that is neither a code nor an address that can be read; paste the code the "
                                 "server showed, or the whole address of that page.") from None
    params = parse_qs(query, keep_blank_values=True)
    if params.get("error") and params["error"][0]:
        _raise_authorization_error(params["error"][0], (params.get("error_description") or [""])[0])
    state = params.get("state")
    if state is not None and not _same_text(state[0], expected_state):
        raise AuthorizationError("the pasted URL belongs to a different authorization request (its state "
                                 "does not match); run again and use the URL this run printed.")
    code = (params.get("code") or [""])[0]
    if not code:
        raise AuthorizationError("the pasted URL has no code in it; paste the code the server showed.")
    return code


def read_pasted_code(expected_state: str) -> str:
    """Ask at the terminal until something usable is pasted; end of input means nobody will."""
    for _attempt in range(PROMPT_ATTEMPTS):
        say("Paste the code (or the whole address of the page showing it) and press Enter:")
        prompt()
        line = sys.stdin.readline()
        if not line:
            say()  # end the "> " prompt line
            raise AuthorizationError("no code was entered (end of input); run again to authorize.")
        try:
            return parse_pasted(line, expected_state)
        except ValueError:
            say("Nothing was pasted.")
    raise AuthorizationError("no code was entered; run again to authorize.")


def should_open_browser(settings: Settings, environ: Mapping[str, str]) -> bool:
    """Never hand a text-only terminal (no display, SSH) to a console browser such as lynx."""
    if not settings.open_browser:
        return False
    if sys.platform in ("darwin", "win32"):
        # A desktop always has a screen, but over SSH it is not the person's: `open` / start would show the page
        # on the remote machine's screen (X forwarding on Linux sets DISPLAY to the person's own, so that works).
        return not (environ.get("SSH_CONNECTION") or environ.get("SSH_TTY"))
    return bool(environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY"))


class LoopbackListener:
    """Catches the browser's redirect on 127.0.0.1 (RFC 8252 section 7.3), one request at a time."""

    def __init__(self, redirect_uri: str) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        parts = urlsplit(redirect_uri)
        host = parts.hostname or "127.0.0.1"
        bind_host = "127.0.0.1" if host == "localhost" else host
        self.path = parts.path or "/"
        listener = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # a browser's idle pre-connection must not hold anything up

            def do_GET(self) -> None:
                status, page = listener.handle(self.path)
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
                raise ConfigError(f"port {parts.port} on {bind_host} is already in use, so the browser's redirect "
                                  "cannot be caught there; free it or choose another port with --loopback=PORT "
                                  "(and register that redirect URI).") from None
            raise ConfigError(f"cannot listen on {bind_host}:{parts.port}: {exc.strerror or exc}.") from None
        port = self.server.server_address[1]
        shown_host = f"[{host}]" if ":" in host else host
        self.redirect_uri = f"http://{shown_host}:{port}{self.path}"
        self.expected_state = ""
        self.result: str | FetchMemosError | None = None
        self.pasted = False
        self.replied = threading.Event()

    def handle(self, request_path: str) -> tuple[int, str]:
        """Decide on one request: accept our code, report an error, or refuse a stranger's request."""
        parts = urlsplit(request_path)
        if parts.path != self.path:
            return 404, _page("Not found", "This address only receives the authorization redirect.")
        params = parse_qs(parts.query)
        state = (params.get("state") or [""])[0]
        if not state or not _same_text(state, self.expected_state):
            log.debug("refused a redirect whose state is missing or wrong")
            return 400, _page("Not accepted", "This request does not belong to the authorization in progress "
                                              "(its state is missing or wrong), so it was ignored.")
        if params.get("error"):
            error = params["error"][0]
            description = (params.get("error_description") or [""])[0]
            if error == "access_denied":
                self.result = AuthorizationError("authorization was denied in the browser; run again and press "
                                                 "Authorize to allow access.")
            else:
                detail = f" ({description})" if description else ""
                self.result = AuthorizationError(f"the server refused the authorization: {error}{detail}.")
            return 200, _page("Authorization failed", f"The server said: {error}. You can close this tab and "
                                                      "return to the terminal.")
        code = (params.get("code") or [""])[0]
        if not code:
            return 400, _page("Not accepted", "The redirect carried no code.")
        self.result = code
        return 200, _page("Authorized", "fetch_memos received the authorization. You can close this tab.")

    def wait(self, timeout: float, read_terminal: bool) -> str:
        """Wait for the redirect; meanwhile a URL pasted at the terminal (from another machine's browser) works too."""
        import queue
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
            self.pasted = True
            with contextlib.suppress(ValueError):
                self.result = parse_pasted(line, self.expected_state)

        deadline = time.monotonic() + timeout
        try:
            while self.result is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AuthorizationError(f"no authorization arrived within {timeout:.0f} s; run again "
                                             "(or raise OAUTH_LOGIN_TIMEOUT).")
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
                self.replied.wait(5)
            if read_terminal and not self.pasted:
                say()  # end the open "> " prompt line before anything else is printed
        if isinstance(self.result, FetchMemosError):
            raise self.result
        return self.result

    def close(self) -> None:
        self.server.server_close()


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


def _page(title: str, text: str) -> str:
    import html

    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body style='font-family:sans-serif;margin:3em'><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(text)}</p></body></html>")


def show_authorization_url(url: str, *, opened: bool) -> None:
    """The URL is printed in every mode, also when a browser was opened: the person may want it elsewhere."""
    say("Opened your browser to authorize fetch_memos." if opened
        else "To authorize fetch_memos, open this URL in a browser, log in and press Authorize:")
    say()
    say(f"    {url}")
    say()


def authorize(session: MemoSession, settings: Settings, environ: Mapping[str, str]) -> dict[str, Any]:
    """Run the authorization code grant with a person: get a code one way or the other, then exchange it."""
    if settings.is_oob:
        url, state = session.authorization_url(settings.authorize_url)
        show_authorization_url(url, opened=False)
        code = read_pasted_code(state)
    else:
        listener = LoopbackListener(settings.redirect_uri)
        try:
            session.redirect_uri = listener.redirect_uri
            url, state = session.authorization_url(settings.authorize_url)
            listener.expected_state = state
            opened = False
            if should_open_browser(settings, environ):
                import webbrowser

                with contextlib.suppress(Exception), _stdout_to_stderr():
                    opened = webbrowser.open(url)
            show_authorization_url(url, opened=opened)
            say(f"Waiting for the browser on {listener.redirect_uri} ... If the browser runs on another machine, "
                "paste the address it ends up on here and press Enter:")
            prompt()
            code = listener.wait(settings.login_timeout, read_terminal=True)
        finally:
            listener.close()
    remember_secret(code)
    token = session.exchange_code(code)
    say("Authorized.")
    return token


# ---------------------------------------------------------------------------------------------
# 4. Session: OAuth2Session with auto refresh wired to the token store; decides when to refresh.
# ---------------------------------------------------------------------------------------------

RETRY_ATTEMPTS = 2  # extra tries of an idempotent API GET after a connection error or a 502/503/504
RETRY_BACKOFF = 0.5  # seconds, doubling


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


@functools.cache
def _oauth2_session_class() -> type:
    """The OAuth2Session subclass, built on first use so that --help and --status never import the HTTP stack."""
    from requests_oauthlib import OAuth2Session

    class RefreshingSession(OAuth2Session):
        """Routes requests-oauthlib's auto refresh through MemoSession.refresh()."""

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
        todo += [current.__cause__, current.__context__, getattr(current, "reason", None)]
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


def _nothing_was_sent(exc: Exception) -> bool:
    """True when the request cannot have reached the server, so nothing can have been used up there."""
    import requests
    from urllib3.exceptions import NewConnectionError

    return isinstance(exc, requests.exceptions.ConnectTimeout) or any(
        isinstance(c, (NewConnectionError, socket.gaierror, ConnectionRefusedError)) for c in _causes(exc))


def _check_token_response(response: requests.Response) -> requests.Response:
    """Report what the token endpoint really said before oauthlib parses it.

    oauthlib turns an HTML error page into "Missing access token parameter", which hides
    the real cause; a JSON error body is left to oauthlib, which names the OAuth error.
    """
    content_type = response.headers.get("Content-Type", "")
    is_json = "json" in content_type.lower()
    if response.status_code >= 500:
        raise ServerError(f"the token endpoint {response.url} answered {response.status_code} "
                          f"{response.reason or ''}".rstrip() + "; try again later.")
    if not is_json:
        kind = "an HTML page" if "html" in content_type.lower() else (
            "an empty body" if not response.content else f"a {content_type or 'untyped'} body")
        raise ServerError(f"the token endpoint {response.url} answered {response.status_code} with {kind}, not a "
                          "token; check OAUTH_TOKEN_URL (or OAUTH_SERVER_URL).")
    return response


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
        import requests
        from urllib3.util.retry import Retry

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
        self.oauth.register_compliance_hook("access_token_response", _check_token_response)
        self.oauth.register_compliance_hook("refresh_token_response", _check_token_response)
        # Idempotent GETs are retried on connection errors and 502/503/504; a token POST never is
        # (a code is single-use and a refresh token rotates). One adapter keeps one connection pool,
        # so a refresh and the API call share one TCP connection.
        retry = Retry(total=RETRY_ATTEMPTS, connect=RETRY_ATTEMPTS, read=RETRY_ATTEMPTS, status=RETRY_ATTEMPTS,
                      other=0, allowed_methods=frozenset({"GET"}), status_forcelist=(502, 503, 504),
                      backoff_factor=RETRY_BACKOFF, raise_on_status=False, respect_retry_after_header=False)
        adapter = requests.adapters.HTTPAdapter(max_retries=retry)
        self.oauth.mount("http://", adapter)
        self.oauth.mount("https://", adapter)
        self.oauth.headers["User-Agent"] = f"fetch_memos/{__version__}"
        if token is not None:
            self.use(token)

    # -- the token this session sends ----------------------------------------------------------

    def use(self, token: Mapping[str, Any]) -> None:
        """Hold this token; requests-oauthlib sees it as expired refresh_margin() seconds early."""
        self.token = dict(token)
        remember_secret(self.token.get("access_token"), self.token.get("refresh_token"))
        session_copy = {key: value for key, value in self.token.items() if key != META_KEY}
        if isinstance(session_copy.get("expires_at"), (int, float)):
            session_copy["expires_at"] = session_copy["expires_at"] - refresh_margin(session_copy)
        self.oauth.token = session_copy

    def _token_updated(self, token: dict) -> None:
        """requests-oauthlib's token_updater: refresh() has already saved it and taken it into use."""

    def _save(self, token: Mapping[str, Any]) -> None:
        try:
            self.store.save(token, token_meta(self.settings))
        except TokenNotSaved as exc:
            # The run can still succeed; say so, since the next run cannot reuse this token.
            warn(f"{exc}. The next run will have to authorize again.")

    # -- getting tokens ------------------------------------------------------------------------

    def authorization_url(self, authorize_url: str) -> tuple[str, str]:
        state = secrets.token_urlsafe(24)
        with _oauthlib_transport(self.settings):
            url, state = self.oauth.authorization_url(authorize_url, state=state)
        remember_secret(self.oauth._code_verifier)
        return url, state

    @property
    def redirect_uri(self) -> str:
        return self.oauth.redirect_uri

    @redirect_uri.setter
    def redirect_uri(self, value: str) -> None:
        self.oauth.redirect_uri = value

    def exchange_code(self, code: str) -> dict[str, Any]:
        """Trade the code for a token (PKCE verifier and HTTP Basic client auth); never retried."""
        url = self.settings.token_url
        try:
            with _oauthlib_transport(self.settings):
                token = _granted(lambda: self.oauth.fetch_token(
                    url, code=code, client_secret=self.settings.client_secret, timeout=self.settings.timeout))
        except Exception as exc:  # noqa: BLE001 - mapped to our errors, or re-raised
            raise _token_request_error(exc, url, self.settings, during="exchange") from None
        token = dict(token)
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
                raise DeadGrant("the stored token has expired and came without a refresh token.")
            url = self.settings.token_url
            try:
                with _oauthlib_transport(self.settings):
                    token = _granted(lambda: self.oauth.plain_refresh(refresh_token, timeout=self.settings.timeout,
                                                                      auth=self._client_auth()))
                token.setdefault("refresh_token", refresh_token)  # RFC 6749 section 6: kept unless replaced
            except Exception as exc:  # noqa: BLE001 - mapped to our errors, or re-raised
                raise _token_request_error(exc, url, self.settings, during="refresh") from None
            log.debug("refreshed the token at %s", url)
            self.use(token)
            self._save(token)
        return self.oauth.token

    # -- using tokens --------------------------------------------------------------------------

    def get(self, url: str) -> requests.Response:
        """GET with the bearer token; requests-oauthlib refreshes first when the token is (nearly) expired.

        One budget of RETRY_ATTEMPTS extra tries covers urllib3's retries (connection errors and
        502/503/504, before the headers arrive) and ours (a body that breaks off after them).
        """
        import requests

        adapter = self.oauth.get_adapter(url)
        configured = adapter.max_retries
        spent = 0
        try:
            while True:
                left = RETRY_ATTEMPTS - spent
                adapter.max_retries = configured.new(total=left, connect=left, read=left, status=left)
                try:
                    with _oauthlib_transport(self.settings):
                        response = self.oauth.get(url, timeout=self.settings.timeout, stream=True)
                    spent += len(response.raw.retries.history) if response.raw.retries else 0
                    response.content  # noqa: B018 - read the body now, so a break in it is retried too
                    break
                except requests.exceptions.ChunkedEncodingError as exc:
                    if spent >= RETRY_ATTEMPTS:
                        raise ServerError(_describe_request_error(exc, url, self.settings.timeout) + ".") from None
                    spent += 1
                    time.sleep(RETRY_BACKOFF * 2 ** (spent - 1))
                except FetchMemosError:
                    raise
                except requests.exceptions.RetryError:
                    raise ServerError(f"{url} kept failing after {RETRY_ATTEMPTS + 1} tries; "
                                      "try again later.") from None
                except requests.exceptions.RequestException as exc:
                    raise ServerError(_describe_request_error(exc, url, self.settings.timeout) + ".") from None
        finally:
            adapter.max_retries = configured
        log.debug("GET %s -> %s", url, response.status_code)
        return response

    def get_with_one_refresh(self, url: str) -> requests.Response:
        """One GET, and after a rejected token exactly one refresh and one retry.

        A 401 never triggers requests-oauthlib's refresh. Some servers (django-oauth-toolkit)
        answer 403 with no challenge for a dead token, so a 403 that does not name
        insufficient_scope is treated the same way.
        """
        response = self.get(url)
        if response.status_code == 401 or (response.status_code == 403 and not _insufficient_scope(response)):
            log.debug("the API rejected the token (%s); refreshing once", response.status_code)
            self.refresh()
            response = self.get(url)
        return response

    def _client_auth(self) -> Any:
        import requests

        return requests.auth.HTTPBasicAuth(self.settings.client_id, self.settings.client_secret)

    def post_form(self, url: str, data: Mapping[str, str]) -> requests.Response:
        """A client-authenticated POST that carries no bearer token (used for revocation)."""
        import requests

        try:
            with _oauthlib_transport(self.settings):
                return self.oauth.post(url, data=dict(data), timeout=self.settings.timeout, withhold_token=True,
                                       auth=self._client_auth())
        except requests.exceptions.RequestException as exc:
            raise ServerError(_describe_request_error(exc, url, self.settings.timeout) + ".") from None

    def close(self) -> None:
        self.oauth.close()


def _granted(token_request: Any) -> dict[str, Any]:
    """The token a request returned, also when the server granted other scopes than asked.

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


def _token_request_error(exc: Exception, url: str, settings: Settings, during: str) -> Exception:
    """One place that says what a failed token request means for the person."""
    import requests
    from oauthlib.oauth2.rfc6749 import errors as oauth_errors

    if isinstance(exc, FetchMemosError):
        return exc
    if isinstance(exc, requests.exceptions.RequestException):
        what = _describe_request_error(exc, url, settings.timeout)
        if during == "refresh" and not _nothing_was_sent(exc):
            return ServerError(f"{what} while refreshing the token. The stored token was kept; run again "
                               "(if the server had already used it up, you will be asked to authorize again).")
        return ServerError(what + ".")
    if isinstance(exc, (oauth_errors.InvalidClientError, oauth_errors.UnauthorizedClientError)):
        return ConfigError(f"the server at {url} rejected the client credentials ({exc.error}); check CLIENT_ID "
                           "and CLIENT_SECRET in .env.")
    if isinstance(exc, oauth_errors.InvalidGrantError):
        if during == "refresh":
            return DeadGrant("the stored authorization is no longer valid (revoked, expired, or unknown to the "
                             "server).")
        return AuthorizationError("the server did not accept the code: it is wrong, expired or already used. "
                                  "Run again to get a new one.")
    if isinstance(exc, oauth_errors.OAuth2Error):
        description = f": {exc.description.rstrip('.')}" if exc.description else ""
        if exc.error in ("missing_token", "missing_token_type"):
            return ServerError(f"the token endpoint {url} answered without a token{description}.")
        if exc.error in ("server_error", "temporarily_unavailable"):
            return ServerError(f"the token endpoint {url} failed ({exc.error}); try again later.")
        return AuthorizationError(f"the token request to {url} failed: {exc.error}{description}.")
    if isinstance(exc, ValueError):  # oauthlib's complaints about malformed token fields
        return ServerError(f"the token endpoint {url} sent a malformed token ({exc}).")
    return exc


# ---------------------------------------------------------------------------------------------
# 5. Commands: fetch (the default), --status, --logout.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Terminal:
    """Whether a person can answer prompts; without one, nothing may wait for input."""

    interactive: bool
    environ: Mapping[str, str]


def stored_token(settings: Settings, store: TokenStore, terminal: Terminal) -> dict[str, Any] | None:
    """The stored token if it may be used with these settings; otherwise say why and return None."""
    token = store.load()
    if token is None:
        return None
    reason = token_mismatch(token, settings)
    if reason:
        if not terminal.interactive:
            raise AuthorizationError(f"the stored token cannot be used: {reason}. Authorizing needs a person at a "
                                     "terminal: run fetch_memos.py interactively once.")
        aside = store.set_aside("other-server")  # about to authorize anew: keep the old token, never overwrite it
        say(f"Not using the stored token: {reason}. It was kept as {aside}.")
        return None
    return token


def need_person(terminal: Terminal, reason: str) -> None:
    if not terminal.interactive:
        raise AuthorizationError(f"{reason} Authorizing needs a person at a terminal: run fetch_memos.py "
                                 "interactively once.")
    say(f"{reason} Authorizing again.")


def fetch_memos(settings: Settings, store: TokenStore, terminal: Terminal) -> Any:
    """Get the memos, authorizing first when there is no usable token and a person is here."""
    session = MemoSession(settings, store)
    try:
        token = stored_token(settings, store, terminal)
        if token is None:
            if not terminal.interactive:
                raise AuthorizationError("no token is stored yet, and authorizing needs a person at a terminal: "
                                         "run fetch_memos.py interactively once.")
            authorize(session, settings, terminal.environ)
        else:
            session.use(token)
        try:
            return call_api(session)
        except DeadGrant as exc:
            need_person(terminal, str(exc))
            session.use({})
            authorize(session, settings, terminal.environ)
            return call_api(session)
    finally:
        session.close()


def _insufficient_scope(response: requests.Response) -> bool:
    return "insufficient_scope" in response.headers.get("WWW-Authenticate", "")


def call_api(session: MemoSession) -> Any:
    url = session.settings.api_url
    return api_json(session.get_with_one_refresh(url), url)


def api_json(response: requests.Response, url: str) -> Any:
    """The API's JSON, or a ServerError that says what came instead."""
    status = response.status_code
    if status == 401:
        raise ServerError(f"the API at {url} rejected a freshly refreshed token (401); check MEMOS_API_URL and the "
                          "server's token settings.")
    if status == 403:
        raise ServerError(f"the API at {url} refused access (403 Forbidden): the account or the token's scope lacks "
                          "permission (check OAUTH_SCOPE, then --logout and run again).")
    if status >= 400:
        raise ServerError(f"the API at {url} answered {status} {response.reason or ''}".rstrip() + ".")
    if not response.content.strip():
        raise ServerError(f"the API at {url} answered {status} with an empty body instead of JSON.")
    try:
        return response.json()
    except ValueError:
        content_type = response.headers.get("Content-Type", "unknown type")
        raise ServerError(f"the API at {url} answered {status} with {content_type}, not JSON.") from None


def print_json(data: Any) -> None:
    """UTF-8, not escaped, whatever the locale: stdout is for `| jq`."""
    text = json.dumps(data, ensure_ascii=False, indent=2) + "\n"
    try:
        sys.stdout.flush()
        sys.stdout.buffer.write(text.encode("utf-8"))
        sys.stdout.buffer.flush()
    except BrokenPipeError:  # `| head` closed the pipe: not an error; keep Python quiet at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def command_fetch(settings: Settings, store: TokenStore, terminal: Terminal) -> int:
    print_json(fetch_memos(settings, store, terminal))
    return 0


def _when(timestamp: float) -> str:
    moment = _dt.datetime.fromtimestamp(timestamp).astimezone()
    delta = int(timestamp - time.time())
    span = abs(delta)
    human = f"{span // 3600} h {span % 3600 // 60} min" if span >= 3600 else (
        f"{span // 60} min {span % 60} s" if span >= 60 else f"{span} s")
    relative = f"in {human}" if delta >= 0 else f"{human} ago"
    return f"{moment:%Y-%m-%d %H:%M:%S %Z} ({relative})"


def command_status(settings: Settings, store: TokenStore, terminal: Terminal) -> int:
    """What is stored, without any secret and without touching the network."""
    token = store.load()
    if token is None:
        print(f"No token stored in {store.path}. Run fetch_memos.py to authorize.")
        return 0
    meta = token.get(META_KEY) or {}
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
    mismatch = token_mismatch(token, settings)
    if mismatch:
        lines.append(f"Note:          not usable with the current settings: {mismatch}.")
    print("\n".join(lines))
    return 0


def command_logout(settings: Settings, store: TokenStore, terminal: Terminal) -> int:
    """Revoke the grant (RFC 7009), then remove the file; the file stays if revocation did not happen.

    Doorkeeper only revokes a token that is still usable: the access token must not have expired.
    And after a refresh it keeps the previous refresh token alive until the new access token is
    first used. So: refresh if needed, use the access token once, then revoke.
    """
    token = store.load()
    if token is None:
        say(f"No token stored in {store.path}; nothing to revoke.")
        return 0
    session = MemoSession(settings, store, token)
    try:
        mismatch = token_mismatch(token, settings)
        if mismatch:
            raise ConfigError(f"the stored token cannot be revoked with the current settings: {mismatch}. Point the "
                              "settings back at that server, or delete the file by hand.")
        try:
            session.get_with_one_refresh(settings.api_url)  # retires any previous refresh token (see above)
        except DeadGrant:
            store.remove()
            say(f"The grant was already dead at the server; removed {store.path}.")
            return 0
        for kind in ("refresh_token", "access_token"):
            value = session.token.get(kind)
            if not value:
                continue
            response = session.post_form(settings.revoke_url, {"token": value, "token_type_hint": kind})
            if response.status_code in (401, 403) and "invalid_client" in response.text:
                raise ConfigError(f"the server at {settings.revoke_url} rejected the client credentials; check "
                                  "CLIENT_ID and CLIENT_SECRET. The token file was kept.")
            if response.status_code != 200:
                raise ServerError(f"revoking at {settings.revoke_url} failed with {response.status_code} "
                                  f"{response.reason or ''}".rstrip() + "; the token file was kept.")
        store.remove()
        say(f"Logged out: the grant was revoked at {settings.server_url} and {store.path} removed.")
        return 0
    finally:
        session.close()


# ---------------------------------------------------------------------------------------------
# 6. main(): parse flags, run one command, turn our exceptions into one line and an exit code.
# ---------------------------------------------------------------------------------------------

def _settings_help() -> str:
    import textwrap

    lines = ["configuration (a flag beats the environment, which beats .env beside the script):"]
    for key, (flag, text) in SETTINGS_HELP.items():
        lines.append(f"  {key}" + (f" / {flag}" if flag else ""))
        lines.extend(f"      {line}" for line in textwrap.wrap(text, 76))
    return "\n".join(lines)


EPILOG = """\

first run:
  It prints a URL. Open it, log in, press Authorize; the server shows a code. Paste the code
  (or the address of that page) at the prompt. With a loopback redirect (--loopback) the
  script catches the browser's redirect itself. Later runs reuse and refresh the token.

output:
  stdout carries only the API's JSON (UTF-8), so `python fetch_memos.py | jq .` works;
  prompts and messages go to stderr. No token or secret is ever printed.

exit codes:
  0    success
  1    the server or the API failed (unreachable, timeout, 5xx, 4xx from the API, not JSON)
  2    usage or configuration error (missing variable, bad URL, http to a remote host,
       client credentials rejected)
  3    authorization failed or needs a person (bad/expired code, denied, state mismatch,
       end of input, dead grant or no token without a terminal)
  130  interrupted
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fetch_memos.py",
        description="Fetch your memos from an OAuth 2.0 protected API (Doorkeeper, django-oauth-toolkit, ...) "
                    "and print them as JSON.",
        epilog=_settings_help() + "\n\n" + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_mutually_exclusive_group()
    commands.add_argument("--status", action="store_true", help="show the stored token (no secrets) and exit")
    commands.add_argument("--logout", action="store_true",
                          help="revoke the grant at the server (RFC 7009) and delete the token file")
    parser.add_argument("--env-file", metavar="PATH", help="read settings from this file instead of .env beside "
                                                           "the script")
    for key, (flag, text) in SETTINGS_HELP.items():
        if not flag:
            continue
        if key == "OAUTH_ALLOW_INSECURE_HTTP":
            parser.add_argument(flag, action="store_true", default=None, help=text.replace("set to 1 to ", ""))
        else:
            parser.add_argument(flag, metavar=key, help=f"{text} [{key}]")
    parser.add_argument("--loopback", metavar="PORT", nargs="?", const=0, type=int,
                        help="catch the browser's redirect on http://127.0.0.1:PORT/callback (RFC 8252) instead "
                             "of pasting a code; without PORT a free port is chosen")
    parser.add_argument("--no-browser", action="store_true", help="with a loopback redirect, only print the URL")
    parser.add_argument("--debug", action="store_true", help="log each request to stderr (never secrets)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
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


COMMANDS = {"status": command_status, "logout": command_logout, "fetch": command_fetch}


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run one command; the only place that prints errors and decides the exit code."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    debug = args.debug
    try:
        settings = load_settings(args, environ)
        configure_logging(settings.debug)
        remember_secret(settings.client_secret)
        store = TokenStore(settings.token_file)
        terminal = Terminal(interactive=sys.stdin is not None and sys.stdin.isatty(), environ=environ)
        command = "status" if args.status else "logout" if args.logout else "fetch"
        return COMMANDS[command](settings, store, terminal)
    except FetchMemosError as exc:
        print(f"fetch_memos: {redact(str(exc))}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\nfetch_memos: interrupted.", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: one redacted line unless --debug asks for the traceback
        if debug:
            import traceback

            print(redact(traceback.format_exc()), file=sys.stderr)
        print(f"fetch_memos: unexpected error: {redact(f'{type(exc).__name__}: {exc}')} (run with --debug for "
              "details).", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
