"""Transport rules without a server: the CA bundle setting (issue 15, TLS)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fetch_memos


def settings(tmp_path: Path, *argv: str, **environ: str) -> fetch_memos.Settings:
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    args = fetch_memos.build_parser().parse_args(["--env-file", str(env_file), *argv])
    return fetch_memos.load_settings(args, {"CLIENT_ID": "c", **environ})


def test_ca_bundle_unset_is_empty(tmp_path: Path) -> None:
    assert settings(tmp_path).ca_bundle == ""


def test_ca_bundle_flag_beats_the_environment(tmp_path: Path) -> None:
    (tmp_path / "a.pem").write_text("x")
    (tmp_path / "b.pem").write_text("x")
    chosen = settings(tmp_path, "--ca-bundle", str(tmp_path / "b.pem"), OAUTH_CA_BUNDLE=str(tmp_path / "a.pem"))
    assert chosen.ca_bundle == str(tmp_path / "b.pem")


@pytest.mark.parametrize(("make", "words"), [
    (lambda path: None, "does not exist"),
    (lambda path: path.mkdir(), "is not a file"),
])
def test_ca_bundle_must_be_a_readable_file(tmp_path: Path, make, words: str) -> None:
    target = tmp_path / "ca.pem"
    make(target)
    with pytest.raises(fetch_memos.ConfigError) as raised:
        settings(tmp_path, OAUTH_CA_BUNDLE=str(target))
    assert str(raised.value).startswith(f"OAUTH_CA_BUNDLE={str(target)!r}")
    assert words in str(raised.value)
    assert raised.value.exit_code == 2


# --- the transport's rules, one function each (issue 15) ---------------------------------------------------------


@pytest.mark.parametrize(("value", "kept"), [
    (3600, 3600), (3600.7, 3600), ("3600", 3600), (1e30, 365 * 24 * 3600), (1e11, 365 * 24 * 3600),
    (-100, None), (0, None), (float("inf"), None), (float("nan"), None), ("Infinity", None), (True, None),
    (None, None), ([], None)])
def test_sane_expires_in(value: object, kept: int | None) -> None:
    assert fetch_memos.sane_expires_in(value) == kept


def test_expires_in_text_that_is_no_number_is_refused() -> None:
    with pytest.raises(ValueError, match="could not convert"):
        fetch_memos.sane_expires_in("abc")


@pytest.mark.parametrize(("a", "b", "same"), [
    ("https://as.example/x", "https://as.example:443/y", True),
    ("http://127.0.0.1:80/a", "http://127.0.0.1/b", True),
    ("https://as.example/x", "http://as.example/x", False),
    ("https://as.example/x", "https://as.example:8443/x", False),
    ("https://as.example/x", "https://AS.example/x", True),
    ("https://as.example/x", "https://evil.example/x", False)])
def test_same_origin(a: str, b: str, same: bool) -> None:
    assert fetch_memos.same_origin(a, b) is same


def test_causes_follows_urllib3_reasons_but_not_ssl_reason_text() -> None:
    """ssl.SSLError.reason is a str (issue 15: AttributeError: 'str' object has no attribute '__cause__')."""
    import ssl

    error = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    error.reason = "WRONG_VERSION_NUMBER"
    wrapper = ConnectionError("wrapped")
    wrapper.__cause__ = error
    assert list(fetch_memos._causes(wrapper)) == [wrapper, error]


def verify_error(code: int, message: str) -> BaseException:
    import ssl

    import requests

    failure = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}")
    failure.verify_code, failure.verify_message, failure.reason = code, message, "CERTIFICATE_VERIFY_FAILED"
    outer = requests.exceptions.SSLError("wrapped")
    outer.__context__ = failure
    return outer


@pytest.mark.parametrize(("code", "message", "what", "exit_code"), [
    (18, "self-signed certificate", "tls_untrusted", 2),
    (20, "unable to get local issuer certificate", "tls_untrusted", 2),
    (64, "IP address mismatch, certificate is not valid for '127.0.0.1'.", "tls_wrong_host", 2),
    (62, "Hostname mismatch, certificate is not valid for 'a.example'.", "tls_wrong_host", 2),
    (10, "certificate has expired", "tls_expired", 1)])
def test_each_verify_code_has_its_entry(code: int, message: str, what: str, exit_code: int) -> None:
    error = fetch_memos.tls_failure(verify_error(code, message), "https://a.example:8443/oauth/token")
    assert (error.what, error.exit_code) == (what, exit_code)
    assert "a.example" in str(error) and "\\n" not in str(error)
    assert ("OAUTH_CA_BUNDLE" in str(error)) == (what == "tls_untrusted")


def test_not_tls_and_no_tls_at_all() -> None:
    import ssl

    wrong = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)")
    wrong.reason = "WRONG_VERSION_NUMBER"
    error = fetch_memos.tls_failure(wrong, "https://127.0.0.1:3801/oauth/token")
    assert error.what == "tls_not_tls" and "port 3801" in str(error)
    assert fetch_memos.tls_failure(ConnectionRefusedError(), "https://127.0.0.1:3801/") is None


@pytest.mark.parametrize(("value", "limit", "deeper"), [
    ([], 0, True), ([], 1, False), ([[]], 1, True), ([[]], 2, False), ({"a": [{}]}, 2, True), ({"a": [{}]}, 3, False),
    ([1, "x", None], 1, False), ("x", 0, False), ([{"a": 1}, [[[]]]], 3, True),
])
def test_nested_deeper_than_counts_arrays_and_objects_not_scalars(value: object, limit: int, deeper: bool) -> None:
    assert fetch_memos.nested_deeper_than(value, limit) is deeper


def test_json_nesting_is_refused_at_one_depth_on_every_python() -> None:
    """MAX_JSON_DEPTH, not the Python's recursion limit, draws the line (3.13 parses 2,000 levels; 3.11 does not)."""
    at_limit = json.loads("[" * fetch_memos.MAX_JSON_DEPTH + "]" * fetch_memos.MAX_JSON_DEPTH)
    assert not fetch_memos.nested_deeper_than(at_limit, fetch_memos.MAX_JSON_DEPTH)
    assert fetch_memos.nested_deeper_than([at_limit], fetch_memos.MAX_JSON_DEPTH)
