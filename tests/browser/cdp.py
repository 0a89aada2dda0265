"""Drive Debian's headless Chromium over the DevTools protocol with aiohttp's WebSocket client.

No browser download and no extra dependency: `Chromium.launch()` starts `/usr/bin/chromium`
with `--remote-debugging-port=0`, reads the DevTools URL from its stderr, and talks JSON over one
WebSocket ("flat" sessions: every command to a page carries that page's `sessionId`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

__all__ = ["CHROMIUM", "Chromium", "DevToolsError", "Page"]

#: Debian's package; never a downloaded browser build.
CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None
)

_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--remote-debugging-port=0",
)
_LISTENING = re.compile(rb"DevTools listening on (ws://\S+)")


class DevToolsError(RuntimeError):
    """A command failed, or a page script threw."""


class Chromium:
    """One headless browser process and its DevTools connection."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        http: aiohttp.ClientSession,
        ws: aiohttp.ClientWebSocketResponse,
        profile: str,
    ) -> None:
        self._process = process
        self._http = http
        self._ws = ws
        self._profile = profile
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._reader = asyncio.create_task(self._read())
        self._stderr = asyncio.create_task(self._drain_stderr())

    @classmethod
    async def launch(cls, executable: str | None = None, *, timeout: float = 30.0) -> Chromium:
        executable = executable or CHROMIUM
        if executable is None:
            raise RuntimeError("no chromium executable")
        profile = tempfile.mkdtemp(prefix="walcast-chromium-")
        process = await asyncio.create_subprocess_exec(
            executable,
            *_FLAGS,
            f"--user-data-dir={profile}",
            "about:blank",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stderr is not None
        try:
            url = await asyncio.wait_for(_devtools_url(process.stderr), timeout)
        except BaseException:
            process.kill()
            await process.wait()
            shutil.rmtree(profile, ignore_errors=True)
            raise
        http = aiohttp.ClientSession()
        ws = await http.ws_connect(url, max_msg_size=0)
        return cls(process, http, ws, profile)

    async def _drain_stderr(self) -> None:
        assert self._process.stderr is not None
        while await self._process.stderr.read(65536):
            pass

    async def _read(self) -> None:
        async for message in self._ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                continue
            data = orjson.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                for listener in list(self._listeners):
                    listener(data)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(DevToolsError("the browser closed the DevTools connection"))

    async def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        command_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = future
        command: dict[str, Any] = {"id": command_id, "method": method, "params": params}
        if session is not None:
            command["sessionId"] = session
        await self._ws.send_str(orjson.dumps(command).decode())
        answer = await future
        if "error" in answer:
            raise DevToolsError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    def listen(self, listener: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def new_page(self, width: int = 1280, height: int = 900) -> Page:
        target = await self.send("Target.createTarget", url="about:blank")
        attached = await self.send(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        page = Page(self, attached["sessionId"])
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        return page

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.send("Browser.close"), 5)
        await self._ws.close()
        await self._http.close()
        try:
            await asyncio.wait_for(self._process.wait(), 10)
        except TimeoutError:
            self._process.kill()
            await self._process.wait()
        for task in (self._reader, self._stderr):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        shutil.rmtree(self._profile, ignore_errors=True)


async def _devtools_url(stderr: asyncio.StreamReader) -> str:
    while True:
        line = await stderr.readline()
        if not line:
            raise RuntimeError("chromium exited before printing its DevTools URL")
        match = _LISTENING.search(line)
        if match:
            return match.group(1).decode()


class Page:
    """One tab, attached with a flat session."""

    def __init__(self, browser: Chromium, session: str) -> None:
        self._browser = browser
        self.session = session
        self.console: list[str] = []
        browser.listen(self._on_event)

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("sessionId") != self.session:
            return
        if event.get("method") == "Runtime.consoleAPICalled":
            args = event["params"].get("args", [])
            self.console.append(" ".join(str(a.get("value", a.get("description"))) for a in args))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        return await self._browser.send(method, self.session, **params)

    async def navigate(self, url: str, timeout: float = 20.0) -> None:
        """Load `url` and wait for its load event."""
        loaded = asyncio.get_running_loop().create_future()

        def on_event(event: dict[str, Any]) -> None:
            if (
                event.get("sessionId") == self.session
                and event.get("method") == "Page.loadEventFired"
                and not loaded.done()
            ):
                loaded.set_result(None)

        stop = self._browser.listen(on_event)
        try:
            answer = await self.send("Page.navigate", url=url)
            if answer.get("errorText"):
                raise DevToolsError(f"navigation to {url} failed: {answer['errorText']}")
            await asyncio.wait_for(loaded, timeout)
        finally:
            stop()

    async def evaluate(self, expression: str, timeout: float = 15.0) -> Any:
        """The JSON value of `expression` (awaited if it is a promise); page errors raise."""
        answer = await asyncio.wait_for(
            self.send(
                "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
            ),
            timeout,
        )
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise DevToolsError(f"page script failed: {text}")
        return answer["result"].get("value")

    async def screenshot(self) -> bytes:
        """The viewport as PNG bytes."""
        answer = await self.send("Page.captureScreenshot", format="png")
        return base64.b64decode(answer["data"])
