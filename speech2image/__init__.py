"""speech2image: speech in, images out. A Flask backend around Whisper and Stable Diffusion.

Importing the package is cheap: no torch, no model library. Build the app with
:func:`speech2image.app.create_app`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("speech2image")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__", "create_app"]


def create_app(settings=None):  # type: ignore[no-untyped-def]
    """Build the Flask app (see :mod:`speech2image.app`)."""
    from .app import create_app as _create_app

    return _create_app(settings)
