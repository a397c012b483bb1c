"""The mistakes a person makes, tried as a person would (the script in a pseudo-terminal) against the real
Doorkeeper test server (issue 15, item 10): each ends with one line naming what to fix, before the person is
sent to the browser, or costs only another paste.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from conftest import Client, People, secrets_of
from runner import Replies, assert_clean, assert_fails, assert_json, token_requests
from servers.doorkeeper import DoorkeeperServer

pytestmark = [pytest.mark.doorkeeper, pytest.mark.timeout(120)]


@pytest.fixture
def client(rotation: DoorkeeperServer, people: People, tmp_path: Path) -> Client:
    return Client(rotation, tmp_path / "client", people(rotation))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_server_that_is_down_is_one_line_before_any_url(client: Client) -> None:
    down = f"http://127.0.0.1:{closed_port()}"
    result = client.run(env=client.env(OAUTH_SERVER_URL=down))
    line = assert_fails(result, 1, f"cannot reach {down}/oauth/token: connection refused",
                        f"check OAUTH_SERVER_URL={down}", only=True)
    assert "No browser was sent there" in line
    assert result.authorize_urls == []


def test_the_default_server_url_left_in_place_is_named(client: Client) -> None:
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", 3801)) == 0:
            pytest.skip("something listens on the default port 3801")
    result = client.run(env=client.env(OAUTH_SERVER_URL=None))
    assert_fails(result, 1, "http://localhost:3801/oauth/token", "OAUTH_SERVER_URL=http://localhost:3801",
                 "still the example's default", only=True)
    assert result.authorize_urls == []


def test_a_server_url_with_an_extra_path_is_a_configuration_error(client: Client) -> None:
    mark = client.server.log_mark()
    wrong = client.server.base_url + "/oauth"
    result = client.run(env=client.env(OAUTH_SERVER_URL=wrong))
    assert_fails(result, 2, f"the token endpoint {wrong}/oauth/token answered 404 Not Found",
                 f"check OAUTH_SERVER_URL={wrong}", only=True)
    assert result.authorize_urls == []
    assert [e["status"] for e in client.server.access_log(since=mark)] == [404]


def test_a_wrong_secret_is_one_line_before_the_browser(client: Client) -> None:
    mark = client.server.log_mark()
    result = client.run(env=client.env(CLIENT_SECRET="wrong-secret-5678"))
    assert_fails(result, 2, "rejected the client credentials (invalid_client)", "CLIENT_ID and CLIENT_SECRET",
                 only=True)
    assert result.authorize_urls == []
    assert [(e["grant_type"], e["status"]) for e in token_requests(client.server, mark)] == [
        ("authorization_code", 401)]  # SERVER-FACTS: with the registered redirect_uri, 401 for a wrong secret
    assert_clean(result, ["wrong-secret-5678", client.server.client_secret])


# A read-only folder stops only a person who is not root (root writes anywhere; CI runs as root): there, a file
# where the folder should be stands in for it, as it stops everyone.
UNWRITABLE = ["missing", "a-file-in-the-way"] + ([] if os.geteuid() == 0 else ["read-only"])


@pytest.mark.parametrize("kind", UNWRITABLE)
def test_an_unwritable_token_folder_is_one_line_before_any_request(client: Client, tmp_path: Path, kind) -> None:
    folder = tmp_path / "tokens"
    if kind == "read-only":
        folder.mkdir()
        folder.chmod(0o500)
    elif kind == "a-file-in-the-way":
        folder.write_text("not a folder")
    mark = client.server.log_mark()
    result = client.run(env=client.env(OAUTH_TOKEN_FILE=str(folder / "token.pickle")))
    path = folder / "token.pickle"
    said = (f"cannot read the token file {path}: Not a directory" if kind == "a-file-in-the-way"
            else f"cannot write the token file {path}")
    assert_fails(result, 2, said, "OAUTH_TOKEN_FILE", only=True)
    assert result.authorize_urls == []
    assert client.server.access_log(since=mark) == []


def test_a_mistyped_code_costs_only_another_paste(client: Client) -> None:
    mark = client.server.log_mark()
    result = client.run(person=lambda url: Replies(["not-the-code-1234", client.person.authorize]))
    assert_json(result)
    assert "did not accept that code" in result.stderr and "2 more tries" in result.stderr
    assert len(result.authorize_urls) == 1  # one trip to the browser
    assert [(e["grant_type"], e["status"]) for e in token_requests(client.server, mark)] == [
        ("authorization_code", 400), ("authorization_code", 400), ("authorization_code", 200)]  # probe first
    assert_clean(result, secrets_of(client), typed=result.typed)
