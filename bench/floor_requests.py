"""Floor 1 for bench.py: the least a fetch can cost with requests.

One requests.get with the stored bearer token, the JSON printed as fetch_memos.py prints it.
It reads the same token file (OAUTH_TOKEN_FILE) and server (OAUTH_SERVER_URL) as the script.
No refresh, no checks beyond the status: this is what the script is compared against, not a client.
"""

from __future__ import annotations

import json
import os
import pickle
import sys

import requests


def main() -> int:
    with open(os.environ["OAUTH_TOKEN_FILE"], "rb") as handle:
        token = pickle.load(handle)  # the bench's own file: plain dicts only
    url = os.environ["OAUTH_SERVER_URL"].rstrip("/") + "/api/memos/"
    response = requests.get(url, headers={"Authorization": f"Bearer {token['access_token']}"}, timeout=10)
    response.raise_for_status()
    sys.stdout.buffer.write((json.dumps(response.json(), ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
