"""`pipeline browse --serve`: the built site over HTTP on localhost, for browsers or tools that prefer it
to ``file://`` (the site needs neither)."""
from __future__ import annotations

import functools
from collections.abc import Callable
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def serve(site: Path, port: int = 8000, echo: Callable[[str], None] = print) -> None:
    """Serve ``site`` on 127.0.0.1:``port`` until interrupted."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(site))
    with ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        echo(f"serving http://127.0.0.1:{server.server_address[1]}/index.html (Ctrl-C stops)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
