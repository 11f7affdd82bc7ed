"""`minillm serve` in a child process for the tests: started on a free port (the server picks it,
`--port 0`, and prints it), used, and always stopped (SIGTERM, then SIGKILL if it hangs)."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

START_SECONDS = 120


class Server:
    """A running server: its base URL, its process, what it printed on stderr, and its --api-key."""

    def __init__(self, process: subprocess.Popen, log_path: str, url: str, api_key: str | None = None):
        self.process, self.log_path, self.url, self.api_key = process, log_path, url, api_key

    @property
    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def request(self, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
        """(status, headers, parsed JSON body or text) of one plain HTTP request, with the server's API
        key unless `headers` bring an Authorization of their own."""
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        key = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **key, **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as response:
                status, got, text = response.status, dict(response.headers), response.read().decode()
        except urllib.error.HTTPError as e:
            status, got, text = e.code, dict(e.headers), e.read().decode()
        try:
            return status, got, json.loads(text)
        except ValueError:
            return status, got, text

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (the server drains), wait; SIGKILL if it does not end. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@contextlib.contextmanager
def running_server(model, *flags, env=None):
    """Start `minillm serve -m MODEL --port 0 FLAGS...`, wait until /health answers, yield a Server; stop it."""
    api_key = str(flags[list(flags).index("--api-key") + 1]) if "--api-key" in flags else None
    log = tempfile.NamedTemporaryFile("w", prefix="minillm-serve-", suffix=".log", delete=False)
    process = subprocess.Popen([sys.executable, "-m", "minillm", "serve", "-m", str(model), "--port", "0",
                                *map(str, flags)], stdout=subprocess.DEVNULL, stderr=log,
                               env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
    server = Server(process, log.name, "", api_key)
    try:
        deadline = time.monotonic() + START_SECONDS
        while not (found := re.search(r"on (http://[\d.]+:\d+)/v1", server.log)):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{server.log}")
            time.sleep(0.1)
        server.url = found[1]
        while server.request("GET", "/health")[0] != 200:
            time.sleep(0.1)
        yield server
    finally:
        server.stop()
        os.unlink(log.name)
