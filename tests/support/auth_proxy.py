"""An HTTPS reverse proxy that demands HTTP Basic credentials before forwarding to the registry.

Apicurio enforces basic auth only through an OIDC server (its "basic auth" is OAuth client
credentials exchanged with one), which the local stack does not run. So the tests check what is
ours, that the registry client sends the configured credentials on every request, by putting this
in front of the registry's own HTTPS port: no or wrong credentials get 401, as from Confluent's
registry; the right ones are forwarded, and each outcome is counted.
"""

from __future__ import annotations

import base64
import ssl
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class BasicAuthProxy:
    def __init__(self, upstream: str, *, user: str, password: str, cert: Path, key: Path, ca: Path) -> None:
        """`upstream`: the registry's base URL (scheme, host, port); `cert`/`key`: what this proxy
        presents; `ca`: what it trusts upstream."""
        self.upstream = upstream.rstrip("/")
        self.expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.forwarded = 0
        self.refused = 0
        self._lock = threading.Lock()
        upstream_tls = ssl.create_default_context(cafile=str(ca))
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                if self.headers.get("Authorization") != proxy.expected:
                    proxy._count("refused")
                    self._reply(401, b'{"error_code":40101,"message":"Unauthorized"}',
                                {"Content-Type": "application/json", "WWW-Authenticate": 'Basic realm="registry"'})
                    return
                proxy._count("forwarded")
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
                request = urllib.request.Request(proxy.upstream + self.path, data=body, method=self.command,
                                                 headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=30, context=upstream_tls) as response:
                        self._reply(response.status, response.read(), dict(response.headers))
                except urllib.error.HTTPError as exc:
                    self._reply(exc.code, exc.read(), dict(exc.headers))

            def _reply(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() in ("content-type", "www-authenticate"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_tls.load_cert_chain(str(cert), str(key))
        self._server.socket = server_tls.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _count(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
