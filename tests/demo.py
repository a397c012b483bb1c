"""Try fetch_memos.py against a local demo Doorkeeper server, without touching your .env or token.

    tests/demo            (installs what it needs, then runs this)

Starts the Rails + Devise + Doorkeeper test server on 127.0.0.1:3801 with a demo user and a
demo OAuth application, runs the script twice (first run: you log in in the browser and paste
the code; second run: the stored token is reused, no questions), and stops the server.
The demo's credentials reach the script as environment variables, which override .env, so a
.env you already have is neither read for these values nor changed. Its token file lives in a
temporary folder, not beside the script.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers.doorkeeper import DoorkeeperServer, ServerError

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=3801, help="port for the demo server (default 3801)")
    parser.add_argument("script_args", nargs="*", help="extra arguments for fetch_memos.py (after --)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fetch-memos-demo-") as folder:
        server = DoorkeeperServer(Path(folder) / "server", port=args.port)
        try:
            server.start()
        except ServerError as exc:
            print(f"demo: the demo server did not start: {exc}", file=sys.stderr)
            return 1
        try:
            env = dict(os.environ)
            env.update({
                "CLIENT_ID": server.client_id,
                "CLIENT_SECRET": server.client_secret,
                "OAUTH_SERVER_URL": server.base_url,
                "OAUTH_AUTHORIZE_URL": server.authorize_endpoint,
                "OAUTH_TOKEN_URL": server.token_endpoint,
                "OAUTH_REVOKE_URL": server.revoke_endpoint,
                "MEMOS_API_URL": server.memos_url,
                "OAUTH_SCOPE": "read",
                "OAUTH_REDIRECT_URI": "urn:ietf:wg:oauth:2.0:oob",
                "OAUTH_TOKEN_FILE": str(Path(folder) / "demo_token.pickle"),
            })
            print(f"Demo Doorkeeper server running at {server.base_url}", file=sys.stderr)
            print(f"Log in in the browser as  {server.email}  with password  {server.password}", file=sys.stderr)
            print("(This machine has no browser? Open the URL anywhere that reaches this port.)\n", file=sys.stderr)
            command = [sys.executable, str(REPO / "fetch_memos.py"), *args.script_args]
            first = subprocess.run(command, env=env, check=False)
            if first.returncode != 0:
                return first.returncode
            print("\nRunning it again: the stored token is reused, nothing to paste.", file=sys.stderr)
            return subprocess.run(command, env=env, check=False).returncode
        except KeyboardInterrupt:
            return 130
        finally:
            server.stop()
            print("Demo server stopped.", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
