"""Run the Doorkeeper test server in the foreground, for a person trying the client by hand.

    python tests/servers/run_doorkeeper.py --port 3801 --state-dir /tmp/memo-server

Prints the base URL, the client id/secret and the demo login; Ctrl-C stops the server.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from servers.doorkeeper import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_EMAIL,
    DEFAULT_PASSWORD,
    OOB_REDIRECT_URI,
    SWITCHES,
    DoorkeeperServer,
    ServerError,
    ruby_stack_available,
)


def main(argv: list[str] | None = None) -> int:
    """Parse options, start the server, wait for Ctrl-C (or SIGTERM), stop it."""
    parser = argparse.ArgumentParser(description="Real OAuth 2.0 server (Rails + Devise + Doorkeeper) on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=3801, help="port on 127.0.0.1 (default 3801)")
    parser.add_argument("--state-dir", type=Path, help="folder for the SQLite db and logs (default: a new temp dir)")
    parser.add_argument("--ttl", type=int, default=7200, help="access token lifetime in seconds (default 7200)")
    parser.add_argument(
        "--no-previous-refresh-token",
        action="store_true",
        help="drop the previous_refresh_token column: old tokens die at once on refresh",
    )
    parser.add_argument("--client-id", default=DEFAULT_CLIENT_ID)
    parser.add_argument("--client-secret", default=DEFAULT_CLIENT_SECRET)
    parser.add_argument("--email", default=DEFAULT_EMAIL)
    parser.add_argument("--password", default=DEFAULT_PASSWORD)
    parser.add_argument(
        "--redirect-uri",
        action="append",
        default=[],
        help="extra allowed redirect URI, e.g. http://127.0.0.1:8765/callback (repeatable)",
    )
    switches = parser.add_argument_group("switches that mimic stricter servers (see doorkeeper_app.rb)")
    for name, (metavar, help_text) in SWITCHES.items():
        kind = {"metavar": metavar} if metavar else {"action": "store_true"}
        switches.add_argument("--" + name.replace("_", "-"), help=help_text, **kind)
    args = parser.parse_args(argv)

    ok, reason = ruby_stack_available()
    if not ok:
        print(f"cannot start: {reason}", file=sys.stderr)
        return 2

    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="doorkeeper-"))
    server = DoorkeeperServer(
        state_dir,
        access_token_ttl=args.ttl,
        previous_refresh_token=not args.no_previous_refresh_token,
        client_id=args.client_id,
        client_secret=args.client_secret,
        redirect_uris=args.redirect_uri,
        port=args.port,
        email=args.email,
        password=args.password,
        **{name: getattr(args, name) for name in SWITCHES},
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.start()
    except ServerError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        redirects = ", ".join([OOB_REDIRECT_URI, *args.redirect_uri])
        print(f"Doorkeeper server ready in {server.boot_seconds:.1f} s")
        print(f"  base URL      {server.base_url}")
        print(f"  authorize     {server.authorize_endpoint}")
        print(f"  token         {server.token_endpoint}")
        print(f"  API           {server.memos_url}")
        print(f"  client id     {server.client_id}")
        print(f"  client secret {server.client_secret}")
        if server.public_client_id:
            print(f"  public client {server.public_client_id} (no secret)")
        if server.metadata_url:
            print(f"  issuer        {server.issuer}")
            print(f"  metadata      {server.metadata_url}")
        print(f"  redirect URIs {redirects}")
        print(f"  login         {server.email} / {server.password}")
        print(f"  state dir     {server.state_dir} (access.log, rails.log)")
        print(f"  token TTL     {args.ttl} s; previous_refresh_token column: {not args.no_previous_refresh_token}")
        print("Ctrl-C to stop.", flush=True)
        while server.running:
            time.sleep(0.5)
        print("server exited", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
