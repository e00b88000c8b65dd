"""Today's OpenAI images API: `gpt-image-*` names and fields mapped onto native requests.

DALL·E 2 and 3 were retired in 2026; clients send `gpt-image-*` models with `quality`
(low, medium, high, auto), `background`, `moderation`, `output_format` and
`output_compression`. The names are aliases of the automatic model choice; quality becomes
denoising steps; the answer carries a `usage` object. Output formats are also what native
requests may ask for (`GET /images/<file>?format=jpeg`).
"""

from __future__ import annotations

import io
from typing import Any

from werkzeug.exceptions import UnprocessableEntity

from ..errors import ServiceError


class TransparencyUnsupported(ServiceError, UnprocessableEntity):
    """`background: transparent` asked of a model that paints every pixel."""

    error = "transparent_background_unsupported"


__all__ = [
    "GPT_IMAGE_MODELS",
    "OUTPUT_FORMATS",
    "QUALITIES",
    "convert_image",
    "gpt_image_fields",
    "media_type",
    "usage",
]

GPT_IMAGE_MODELS = ("gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
QUALITIES = ("low", "medium", "high", "auto", "standard", "hd")
BACKGROUNDS = ("auto", "opaque", "transparent")
MODERATIONS = ("auto", "low")
# Fraction of the model's default steps (at least 1): low is a quick draft, high is careful.
QUALITY_STEPS = {"low": 0.4, "medium": 0.7, "high": 1.0, "standard": 0.7, "hd": 1.0}
_MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def media_type(output_format: str) -> str:
    """The media type of an output format."""
    return _MEDIA_TYPES[output_format]


def gpt_image_fields(
    fields: dict[str, Any], default_steps: int, max_steps: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Take the gpt-image fields out of ``fields`` (native, in place); returns the output
    options (format, compression, background, moderation, quality) to apply to the answer."""
    quality = fields.pop("quality", None) or "auto"
    background = fields.pop("background", None) or "auto"
    moderation = fields.pop("moderation", None) or "auto"
    output_format = fields.pop("output_format", None) or "png"
    compression = fields.pop("output_compression", None)
    if background == "transparent":  # well-formed, but not something these models can do
        raise TransparencyUnsupported(
            "`background` `transparent` is not supported: these models paint every pixel; "
            "use `opaque` or `auto`",
            details={"field": "background"},
        )
    # `output_compression` applies to jpeg and webp; with png it is ignored (PNG is lossless).
    if quality in QUALITY_STEPS and "steps" not in fields:
        fields["steps"] = max(1, min(max_steps, round(default_steps * QUALITY_STEPS[quality])))
    options = {
        "output_format": output_format,
        "output_compression": 100 if compression is None else int(compression),
        "background": background,
        "moderation": moderation,
        "quality": quality,
    }
    return fields, options


def convert_image(png: bytes, output_format: str, compression: int = 100) -> bytes:
    """A stored PNG in ``output_format`` (``compression`` 0-100 is the quality kept)."""
    if output_format == "png":
        return png
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    buffer = io.BytesIO()
    quality = max(1, min(100, compression))
    image.save(buffer, format="JPEG" if output_format == "jpeg" else "WEBP", quality=quality)
    return buffer.getvalue()


def usage(prompt: str, images: int, width: int, height: int) -> dict[str, Any]:
    """OpenAI's `usage` object: text tokens in (words, roughly), image tokens out by area."""
    text_tokens = max(1, len(prompt.split()))
    image_tokens = images * max(1, (width * height) // (32 * 32))
    return {
        "input_tokens": text_tokens,
        "output_tokens": image_tokens,
        "total_tokens": text_tokens + image_tokens,
        "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": 0},
    }
