"""Try fetch_memos.py against a local demo Doorkeeper server, without touching your .env or token.

    tests/demo            (installs what it needs, then runs this)

Starts the Rails + Devise + Doorkeeper test server on 127.0.0.1:3801 with a demo user and a
demo OAuth application, runs the script twice (first run: you log in in the browser and paste
the code; second run: the stored token is reused, no questions), and stops the server.
The script reads neither your .env (it gets `--env-file` of its own, empty) nor any OAUTH_*, CLIENT_* or
MEMOS_* variable of your shell: the demo's settings are all it sees, and your token file is never touched
(the demo's lives in a temporary folder).
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers.doorkeeper import DoorkeeperServer, ServerError

REPO = Path(__file__).resolve().parent.parent


def own_environment() -> dict[str, str]:
    """The shell's environment without any setting of fetch_memos.py (a person's OAUTH_DEVICE_FLOW=1 or
    OAUTH_ISSUER would turn the demo into another run)."""
    sys.path.insert(0, str(REPO))
    import fetch_memos

    return {key: value for key, value in os.environ.items() if key not in fetch_memos.SETTINGS}


def port_in_use(port: int) -> str:
    """"" when the demo server can listen on the port; else why not, in words (Ruby would print a backtrace)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            return "already in use" if exc.errno == errno.EADDRINUSE else f"not available ({exc.strerror})"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=3801, help="port for the demo server (default 3801)")
    parser.add_argument("script_args", nargs="*", help="extra arguments for fetch_memos.py (after --)")
    args = parser.parse_args(argv)

    busy = port_in_use(args.port)
    if busy:
        print(f"demo: port {args.port} on 127.0.0.1 is {busy}; choose another with tests/demo --port PORT.",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="fetch-memos-demo-") as folder:
        server = DoorkeeperServer(Path(folder) / "server", port=args.port)
        try:
            server.start()
        except ServerError as exc:
            print(f"demo: the demo server did not start: {exc}", file=sys.stderr)
            return 1
        try:
            env = own_environment()
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
            empty = Path(folder) / "demo.env"
            empty.write_text("")
            command = [sys.executable, str(REPO / "fetch_memos.py"), "--env-file", str(empty), *args.script_args]
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
