"""The plain HTTP side of the server's port: responses, the files of `web/`, and the 404 that names
the endpoints."""

from __future__ import annotations

import email.utils
import http
import json
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from websockets.datastructures import Headers
from websockets.http11 import Response

WEB_ROOT = Path(__file__).resolve().parents[2] / "web"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".wasm": "application/wasm",
    ".txt": "text/plain; charset=utf-8",
}


def respond(status: http.HTTPStatus, body: str | bytes, content_type: str = "text/plain; charset=utf-8") -> Response:
    data = body.encode() if isinstance(body, str) else body
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(data))),
            ("Content-Type", content_type),
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
        ]
    )
    return Response(status.value, status.phrase, headers, data)


def not_found(path: str, websocket_paths: str) -> Response:
    return respond(
        http.HTTPStatus.NOT_FOUND,
        f"{path} not found: WebSocket at {websocket_paths}; HTTP at /, /healthz, /readyz, /metrics\n",
    )


def json_response(status: http.HTTPStatus, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    """A JSON body, with extra headers (Retry-After, WWW-Authenticate)."""
    response = respond(status, json.dumps(body) + "\n", "application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def static_file(web_root: Path, path: str) -> Response | None:
    """A file under web_root (None: not found); nothing outside it, no dotfiles, no directory listings."""
    root = web_root.resolve()
    relative = unquote(path).lstrip("/")
    if relative == "" or relative.endswith("/"):
        relative += "index.html"
    parts = Path(relative).parts
    if "\0" in relative or any(part.startswith(".") for part in parts):
        return None
    file = (root / relative).resolve()
    if not file.is_relative_to(root) or not file.is_file():
        return None
    content_type = CONTENT_TYPES.get(file.suffix.lower(), "application/octet-stream")
    return respond(http.HTTPStatus.OK, file.read_bytes(), content_type)
