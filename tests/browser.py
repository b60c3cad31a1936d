"""A headless Chromium driven over the DevTools protocol, for the report page's browser test.

Only the standard library: a minimal WebSocket client (RFC 6455: one handshake, masked text frames out,
unmasked frames in) is all the protocol needs, so the test adds no dependency. Chromium itself comes from
Debian (`apt-get install chromium`; .ci/run installs it where apt is available); without it the test skips.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--mute-audio", "--remote-debugging-port=0")


def find_chromium() -> str | None:
    return next((path for name in BINARIES if (path := shutil.which(name))), None)


class WebSocket:
    def __init__(self, url: str, timeout: float):
        parts = urlparse(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        self.reader = self.sock.makefile("rb")
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        status = self.reader.readline()
        if b" 101 " not in status:
            raise ConnectionError(f"DevTools refused the WebSocket: {status!r}")
        while self.reader.readline() not in (b"\r\n", b""):
            pass

    def send(self, text: str) -> None:
        payload, mask = text.encode(), os.urandom(4)
        n = len(payload)
        header = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
                                  if n < 1 << 16 else bytes([0x80 | 127]) + struct.pack(">Q", n))
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def receive(self) -> str:
        message = b""
        while True:
            first, second = self._read(2)
            n = second & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            opcode = first & 0x0F
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the connection")
            if opcode in (0x9, 0xA):  # ping / pong: not part of a message
                continue
            message += payload
            if first & 0x80:
                return message.decode()

    def _read(self, n: int) -> bytes:
        data = self.reader.read(n)
        if len(data) < n:
            raise ConnectionError("DevTools connection ended")
        return data

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class Browser:
    """One headless Chromium with one page; `call` sends a DevTools command and returns its result, keeping the
    events that arrive meanwhile in `events`."""

    def __init__(self, profile: Path, timeout: float = 30.0):
        self.timeout = timeout
        binary = find_chromium()
        if binary is None:
            raise FileNotFoundError("no chromium binary on PATH")
        profile.mkdir(parents=True, exist_ok=True)
        (profile / "DevToolsActivePort").unlink(missing_ok=True)  # an earlier browser's port
        self.process = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", "--window-size=1400,1000",
                                         "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        try:
            port = self._port(profile / "DevToolsActivePort")
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout).read())
            page = next(t for t in targets if t["type"] == "page")
            self.ws = WebSocket(page["webSocketDebuggerUrl"], timeout)
        except BaseException:
            self.quit()
            raise
        self.next_id, self.events = 0, []

    def _port(self, file: Path) -> int:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with status {self.process.returncode}")
            lines = file.read_text().split() if file.is_file() else []
            if lines:
                return int(lines[0])
            time.sleep(0.1)
        raise TimeoutError("chromium did not open its DevTools port")

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.receive())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str) -> dict:
        for i, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(i)
        while True:
            message = json.loads(self.ws.receive())
            if message.get("method") == method:
                return message
            self.events.append(message)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def settle(self, expression: str, expected, timeout: float = 5.0):
        """The expression's value once it equals `expected`, or its last value after `timeout` seconds: events a
        click causes (a hash change) run after the click returns."""
        deadline = time.monotonic() + timeout
        while (value := self.evaluate(expression)) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return value

    def click(self, selector: str) -> None:
        """A real mouse click at the middle of the element (scrolled into view first)."""
        box = self.evaluate(f"(function () {{ var e = document.querySelector({json.dumps(selector)}); "
                            "e.scrollIntoView({block: 'center'}); var r = e.getBoundingClientRect(); "
                            "return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        params = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"]))
        return path

    def quit(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the renderer and helpers go with it
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
