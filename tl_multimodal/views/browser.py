"""Render saved pages in headless Chromium and check them: console errors, network requests, images that
fail to load, links to files that do not exist; a screenshot of each.

Chromium is driven through its DevTools protocol over a pipe (``--remote-debugging-pipe``: JSON
messages ending in a NUL byte on file descriptors 3 and 4), so nothing beyond Chromium itself is needed.

    with Chromium() as browser:
        check = browser.check("site/index.html", screenshot="index.png")
    check.problems        # [] when the page is clean
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

#: URL schemes a page may load from without touching the network.
LOCAL_SCHEMES = ("file", "data", "about", "blob", "chrome-error")

_PAGE_FACTS = """(() => {
  const imgs = Array.from(document.images);
  return JSON.stringify({
    title: document.title,
    text: document.body ? document.body.innerText : "",
    links: Array.from(document.querySelectorAll("a[href]")).map(a => a.href),
    images: imgs.map(i => i.currentSrc || i.src),
    broken_images: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.currentSrc || i.src),
    scripts: Array.from(document.scripts).map(s => s.src).filter(s => s),
    stylesheets: Array.from(document.querySelectorAll("link[rel=stylesheet]")).map(l => l.href),
  });
})()"""


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable on ``PATH``, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass(repr=False)
class PageCheck:
    """What Chromium saw on one page.

    Attributes:
        path: The page.
        title: Its ``<title>``.
        text: The rendered text (``innerText``).
        console: Console errors, uncaught exceptions and the browser's log errors (a failed load).
        warnings: Console and log warnings (not counted as problems: headless Chromium's own, such
            as WebGL's software fallback, land here).
        requests: Every URL the page requested.
        network: The requested URLs that are not local (not ``file:``, ``data:``, ...).
        failed: Requests that failed (a missing file, blocked).
        broken_images: ``<img>`` elements that did not load.
        links: Every link's URL; ``dead_links`` the ``file:`` ones whose file does not exist, and
            external links (anything but ``file:`` and in-page anchors).
        screenshot: The PNG written, or None.
        value: What the ``evaluate`` expression gave (JSON-able), or None.
    """

    path: Path
    title: str = ""
    text: str = ""
    console: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    network: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    dead_links: list[str] = field(default_factory=list)
    screenshot: Path | None = None
    value: Any = None

    @property
    def problems(self) -> list[str]:
        """Everything wrong with the page, one line each (empty: clean)."""
        return ([f"console: {m}" for m in self.console] + [f"network request: {u}" for u in self.network]
                + [f"failed request: {u}" for u in self.failed] + [f"broken image: {u}" for u in self.broken_images]
                + [f"dead link: {u}" for u in self.dead_links])

    def to_dataframe(self):
        """One row per problem: page, problem."""
        import pandas as pd

        return pd.DataFrame({"page": [str(self.path)] * len(self.problems), "problem": self.problems})

    def __repr__(self) -> str:
        return (f"PageCheck({self.path.name}: {len(self.requests)} requests, {len(self.links)} links, "
                f"{len(self.problems)} problems{': ' + self.problems[0] if self.problems else ''})")


def _dead(url: str) -> bool:
    parts = urlparse(url)
    if parts.scheme != "file":
        return True
    return not Path(unquote(parts.path)).exists()


class Chromium:
    """A headless Chromium driven over ``--remote-debugging-pipe`` (use as a context manager).

    Args:
        executable: The browser (default: :func:`find_chromium`).
        width, height: The window size (screenshots are this size, or the page's full height).
        timeout: Seconds to wait for a page to load.

    Raises:
        FileNotFoundError: No Chromium found.
    """

    def __init__(self, executable: str | None = None, width: int = 1280, height: int = 900, timeout: float = 60.0):
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise FileNotFoundError("no chromium on PATH (apt-get install chromium)")
        self.width, self.height, self.timeout = width, height, timeout
        self._id = 0
        self._buffer = b""
        self.proc = None

    def __enter__(self) -> "Chromium":
        self._profile = tempfile.mkdtemp(prefix="tlmm-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire():  # in the child: fd 3 reads commands, fd 4 writes answers (dup2 makes them inheritable)
            r, w = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(r, 3)
            os.dup2(w, 4)

        args = [self.executable, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
                "--disable-background-networking", "--disable-component-update", "--mute-audio",
                "--disable-dev-shm-usage", f"--user-data-dir={self._profile}",
                f"--window-size={self.width},{self.height}", "about:blank"]
        self.proc = subprocess.Popen(args, close_fds=False, preexec_fn=wire,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._send("Browser.close", wait=False)
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._to_browser)
            os.close(self._from_browser)
            shutil.rmtree(self._profile, ignore_errors=True)

    # ------------------------------------------------------------------ the protocol
    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the pipe (it crashed or was killed)")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def _send(self, method: str, params: dict | None = None, session: str | None = None, wait: bool = True,
              events: list | None = None) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        if not wait:
            return {}
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"chromium {method}: {reply['error']}")
                return reply.get("result", {})
            if events is not None:
                events.append(reply)

    def _pump_until(self, events: list, done, deadline: float) -> None:
        while not any(done(e) for e in events):
            events.append(self._read(deadline))

    # ------------------------------------------------------------------ pages
    def check(self, page: str | Path, screenshot: str | Path | None = None, javascript: bool = True,
              settle: float = 0.3, evaluate: str | None = None) -> PageCheck:
        """Open a saved page (``file://``) and report what went wrong on it.

        Args:
            page: The HTML file.
            screenshot: Where to write a PNG of the whole page (default: none).
            javascript: Run the page's scripts (``False``: what a reader without JavaScript sees).
            settle: Seconds to wait after the load event for scripts that render late.
            evaluate: A JavaScript expression evaluated on the page once loaded (its value in ``.value``).

        Returns:
            A :class:`PageCheck`.
        """
        path = Path(page).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"page {path} does not exist")
        events: list[dict] = []
        target = self._send("Target.createTarget", {"url": "about:blank"}, events=events)["targetId"]
        session = self._send("Target.attachToTarget", {"targetId": target, "flatten": True}, events=events)["sessionId"]
        for method in ("Page.enable", "Runtime.enable", "Log.enable", "Network.enable"):
            self._send(method, session=session, events=events)
        if not javascript:
            self._send("Emulation.setScriptExecutionDisabled", {"value": True}, session=session, events=events)
        self._send("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                          "deviceScaleFactor": 1, "mobile": False},
                   session=session, events=events)
        events.clear()
        self._send("Page.navigate", {"url": path.as_uri()}, session=session, events=events)
        deadline = time.monotonic() + self.timeout
        self._pump_until(events, lambda e: e.get("method") == "Page.loadEventFired" and e.get("sessionId") == session,
                         deadline)
        end = time.monotonic() + settle
        while time.monotonic() < end:  # late console messages and requests (rendering scripts)
            self._send("Runtime.evaluate", {"expression": "1"}, session=session, events=events)
            time.sleep(0.05)
        self._send("Emulation.setScriptExecutionDisabled", {"value": False}, session=session, events=events)
        facts = json.loads(self._send("Runtime.evaluate", {"expression": _PAGE_FACTS, "returnByValue": True},
                                      session=session, events=events)["result"]["value"])
        check = PageCheck(path=path, title=facts["title"], text=facts["text"], links=facts["links"],
                          broken_images=facts["broken_images"])
        self._read_events(check, [e for e in events if e.get("sessionId") == session])
        if evaluate is not None:
            check.value = self._send("Runtime.evaluate", {"expression": evaluate, "returnByValue": True},
                                     session=session, events=events)["result"].get("value")
        check.dead_links = sorted({u for u in check.links if not u.split("#")[0] == path.as_uri() and _dead(u.split("#")[0])})
        if screenshot is not None:
            shot = self._send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                              session=session, events=events)
            import base64

            check.screenshot = Path(screenshot)
            check.screenshot.write_bytes(base64.b64decode(shot["data"]))
        self._send("Target.closeTarget", {"targetId": target}, events=events)
        return check

    @staticmethod
    def _read_events(check: PageCheck, events: list[dict]) -> None:
        for e in events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Network.requestWillBeSent":
                url = p["request"]["url"]
                check.requests.append(url)
                if url.split(":", 1)[0] not in LOCAL_SCHEMES:
                    check.network.append(url)
            elif method == "Network.loadingFailed":
                check.failed.append(f"{p.get('errorText', '')} ({p.get('requestId')})")
            elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
                (check.warnings if p["type"] == "warning" else check.console).append(f"{p['type']}: {text}")
            elif method == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                check.console.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
            elif method == "Log.entryAdded" and p["entry"].get("level") in ("error", "warning"):
                entry = p["entry"]
                (check.warnings if entry["level"] == "warning" else check.console).append(f"{entry['level']}: {entry.get('text')} {entry.get('url', '')}".strip())
