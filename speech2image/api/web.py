"""The web page at `/`: one HTML file, one ES module and one stylesheet from the package."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, send_from_directory
from flask.typing import ResponseReturnValue

from .openapi import Content, endpoint

__all__ = ["CONTENT_SECURITY_POLICY", "STATIC_DIR", "bp"]

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# No inline script or style, nothing from another origin. Images are fetched with the API key
# and shown as blob: URLs; the empty data: favicon keeps browsers from asking for one.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data:",
        "media-src 'self' blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

# Explicit types: mimetypes reads the host's tables, and a module script served as
# text/plain is refused by browsers. Flask adds "; charset=utf-8" to text/* types itself.
CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}

bp = Blueprint("web", __name__)


@bp.after_request
def _security_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Permissions-Policy"] = "microphone=(self), camera=(), geolocation=()"
    return response


def _send(filename: str) -> Response:
    mimetype = CONTENT_TYPES.get(Path(filename).suffix.lower(), "application/octet-stream")
    # Revalidate on every load (ETag, 304): a new release must not run with yesterday's script.
    response = send_from_directory(STATIC_DIR, filename, mimetype=mimetype, max_age=0)
    response.headers["Cache-Control"] = "no-cache"
    return response


_TEXT = {"type": "string"}
_HEADERS = {
    "Content-Security-Policy": "Scripts, styles and connections from this server only",
    "ETag": "Revalidated on every load (Cache-Control: no-cache)",
}


@bp.get("/")
@endpoint(
    responses={200: Content({"text/html": _TEXT}, "The page", _HEADERS), 304: None},
    tags=("web",),
    public=True,
    rate_limited=False,
)
def index() -> ResponseReturnValue:
    """The speak-to-image page."""
    return _send("index.html")


@bp.get("/static/<path:filename>")
@endpoint(
    responses={
        200: Content(
            {"text/javascript": _TEXT, "text/css": _TEXT}, "The page's script or style", _HEADERS
        ),
        304: None,
    },
    errors=(404,),
    tags=("web",),
    path={"filename": "app.js or app.css"},
    public=True,
    rate_limited=False,
)
def static(filename: str) -> ResponseReturnValue:
    """The page's script, stylesheet and pictures (only files inside the static folder)."""
    return _send(filename)
