"""Floor 2 for bench.py: the same fetch through requests_oauthlib.OAuth2Session.

Builds an OAuth2Session from the stored token and does one GET, printing the JSON as
fetch_memos.py prints it. Same token file (OAUTH_TOKEN_FILE), server (OAUTH_SERVER_URL) and
client id (CLIENT_ID) as the script. This is the floor the warm-run target is measured against.
"""

from __future__ import annotations

import json
import os
import pickle
import sys

from requests_oauthlib import OAuth2Session


def main() -> int:
    with open(os.environ["OAUTH_TOKEN_FILE"], "rb") as handle:
        token = pickle.load(handle)  # the bench's own file: plain dicts only
    url = os.environ["OAUTH_SERVER_URL"].rstrip("/") + "/api/memos/"
    os.environ.setdefault("OAUTHLIB_INSECURE_TRANSPORT", "1")  # the test server is plain http on loopback
    with OAuth2Session(os.environ["CLIENT_ID"], token=token) as session:
        response = session.get(url, timeout=10)
    response.raise_for_status()
    sys.stdout.buffer.write((json.dumps(response.json(), ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
