"""A real HTTP proxy for the proxy rules: Debian's tinyproxy, started on a free 127.0.0.1 port, logging each request.

    with Tinyproxy(folder) as proxy:
        env["HTTPS_PROXY"] = proxy.url
        ...
        proxy.requests()   # ["CONNECT memos.example:443", "GET http://127.0.0.1:4000/oauth/token", ...]

tinyproxy (not a proxy of our own) because the rule under test is what requests does with a real proxy's
CONNECT and absolute-form requests; it is one small Debian package (tests/setup.sh installs it) and starts in
milliseconds. Its log at LogLevel Info has one "Request (file descriptor N): METHOD TARGET HTTP/1.1" line per
request that went through it; only the method and target are kept (never headers: they may hold a token).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from servers.harness import free_port

if TYPE_CHECKING:  # typing.Self is 3.11+; annotations are lazy, so 3.10 never evaluates it
    from typing import Self

_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\S+) (\S+) HTTP/")


def tinyproxy_available() -> tuple[bool, str]:
    path = shutil.which("tinyproxy") or ("/usr/bin/tinyproxy" if os.path.exists("/usr/bin/tinyproxy") else None)
    return (True, "") if path else (False, "tinyproxy is not installed (Debian package tinyproxy: tests/setup.sh)")


class Tinyproxy:
    """tinyproxy in the foreground with a config and log of its own under `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port: int | None = None
        self.log_path = folder / "tinyproxy.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Self:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = self.folder / "tinyproxy.conf"
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Timeout 30", f'LogFile "{self.log_path}"',
                 "LogLevel Info", "MaxClients 50", "Allow 127.0.0.1", "DisableViaHeader Yes"]
        config.write_text("\n".join(lines) + "\n")
        with open(self.folder / "tinyproxy.stderr", "wb") as err:
            self._proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(config)], stdin=subprocess.DEVNULL,
                                          stdout=err, stderr=err, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tinyproxy did not start: {(self.folder / 'tinyproxy.stderr').read_text()}")
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def requests(self) -> list[str]:
        """"METHOD TARGET" of every request that went through, in order."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [f"{method} {target}" for method, target in _REQUEST.findall(text)]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
