"""An HTTP server on 127.0.0.1 in a thread of the test process, and one call forwarded to a real
server: the scaffolding of the stand-ins that sit in front of the real vLLM server
(tests/fault_proxy.py, tests/batch_stand_in.py).

    class Stand(LocalServer):
        def __init__(self):
            super().__init__(self._handler_class())   # a BaseHTTPRequestHandler subclass
    with Stand() as stand:
        OpenAI(base_url=stand.base_url)
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from http.server import ThreadingHTTPServer


class LocalServer:
    """Serves `handler_class` on a free port of 127.0.0.1 while the `with` block runs."""

    def __init__(self, handler_class):
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def forward(url: str, method: str, body: bytes | None, headers=None) -> tuple[int, dict, bytes]:
    """`method url` with `body` and the request's Content-Type and Authorization headers:
    (status, headers, body), an HTTP error status included."""
    request = urllib.request.Request(url, data=body, method=method)
    for name in ("Content-Type", "Authorization"):
        if headers is not None and headers.get(name):
            request.add_header(name, headers[name])
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()
