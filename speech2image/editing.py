"""Edits: an image (from the history or an upload) and a prompt in -> a validated edit job.

Knows no HTTP. Uploaded images are decoded with a format allow-list and a pixel cap checked
before the pixels are read. The source (and mask) travel with the job as its input: one RGBA
PNG whose alpha is the mask, so a job row names one file, as for audio.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from typing import Any

from werkzeug.exceptions import UnprocessableEntity, UnsupportedMediaType

from .errors import InvalidRequest, ResourceNotFound, ServiceError
from .image_service import EditSource, ImageService, PreparedImage
from .storage import Storage

__all__ = [
    "DEFAULT_STRENGTH",
    "EDIT_FORMATS",
    "EditWork",
    "InvalidImage",
    "UnsupportedImage",
    "decode_image",
    "history_image",
    "pack_input",
    "prepare_edit",
    "unpack_input",
]

EDIT_FORMATS = ("PNG", "JPEG", "WEBP")
DEFAULT_STRENGTH = 0.75


class UnsupportedImage(ServiceError, UnsupportedMediaType):
    """The upload is not a PNG, JPEG or WebP image."""

    error = "unsupported_image"


class InvalidImage(ServiceError, UnprocessableEntity):
    """The upload is an image of an accepted format that cannot be used (as for audio: 422)."""

    error = "invalid_image"


@dataclasses.dataclass(frozen=True)
class EditWork:
    """A validated edit: the prepared request, how far to go, and the image it started from."""

    item: PreparedImage
    strength: float
    mask_blur: int
    mode: str  # "img2img" or "inpaint"
    parent_id: str | None = None

    def batch_key(self) -> tuple[Any, ...]:
        """Edits share one call when their generation and their edit settings agree."""
        return (*self.item.batch_key(), "edit", self.mode, self.strength, self.mask_blur)

    def describe(self) -> dict[str, Any]:
        """The edit's settings as the answer and the PNG's parameters show them."""
        return {
            "mode": self.mode,
            "strength": self.strength,
            "mask_blur": self.mask_blur,
            "parent_id": self.parent_id,
        }


def decode_image(data: bytes, *, max_pixels: int, field: str = "image") -> Any:
    """The upload as a PIL image, safely: PNG, JPEG or WebP, at most ``max_pixels`` pixels.

    The header is read first and the size checked before any pixel is decoded; a truncated
    or corrupt file is a 422 that names the field, another format a 415.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InvalidImage(f"`{field}` is empty", details={"field": field})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(EDIT_FORMATS))
    except UnidentifiedImageError:
        raise UnsupportedImage(
            f"`{field}` must be a PNG, JPEG or WebP image", details={"field": field}
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidImage(
            f"`{field}` has more than {max_pixels} pixels", details={"field": field}
        ) from None
    except Exception as exc:
        raise InvalidImage(f"`{field}` cannot be read: {exc}", details={"field": field}) from None
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise InvalidImage(
            f"`{field}` is {width}x{height}: at most {max_pixels} pixels are accepted",
            details={"field": field},
        )
    try:
        image.load()
    except Exception as exc:
        raise InvalidImage(
            f"`{field}` cannot be decoded ({type(exc).__name__})", details={"field": field}
        ) from None
    return image


def history_image(storage: Storage, owner: str, image_id: str) -> Any:
    """The caller's stored image ``image_id`` as a PIL image (404 when it is not theirs)."""
    from PIL import Image

    record = storage.image_by_id(owner, image_id)
    data = storage.image_bytes(record) if record is not None else None
    if data is None:
        raise ResourceNotFound("no such image", details={"field": "image_id"})
    return Image.open(io.BytesIO(data)).convert("RGB")


def pack_input(image: Any, mask: Any | None, size: tuple[int, int]) -> bytes:
    """The job's input: the source at ``size`` with the mask (255: change) as its alpha."""
    from PIL import Image

    rgba = image.convert("RGB").resize(size, Image.Resampling.LANCZOS).convert("RGBA")
    alpha = (
        mask.convert("L").resize(size, Image.Resampling.NEAREST)
        if mask is not None
        else Image.new("L", size, 255)
    )
    rgba.putalpha(alpha)
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    return buffer.getvalue()


def unpack_input(data: bytes, work: EditWork) -> EditSource:
    """The source and mask a :func:`pack_input` file holds."""
    from PIL import Image

    rgba = Image.open(io.BytesIO(data))
    rgba.load()
    rgba = rgba.convert("RGBA")
    mask = rgba.getchannel("A") if work.mode == "inpaint" else None
    return EditSource(rgba.convert("RGB"), mask, work.strength, work.mask_blur)


MIN_SIDE = 64  # smaller sources are scaled up to this


def _rounded(side: int, multiple: int, limit: int) -> int:
    side = min(max(side, MIN_SIDE), limit)
    return max(multiple, side - side % multiple)


def prepare_edit(
    images: ImageService,
    fields: dict[str, Any],
    source: Any,
    mask: Any | None,
    *,
    strength: float,
    mask_blur: int = 0,
    parent_id: str | None = None,
) -> tuple[EditWork, bytes]:
    """Validate an edit and make its job input; the one place its final prompt is known.

    ``fields`` are /generate-image fields (``prompt`` is the final, composed prompt). Left
    out, the size is the source's, rounded down to what the model takes. Returns the work
    and the bytes of the job's input file.
    """
    if not 0.0 < strength <= 1.0:
        raise InvalidRequest(
            "`strength` must be above 0 and at most 1", details={"field": "strength"}
        )
    if mask is not None and mask.size != source.size:
        raise InvalidRequest(
            f"`mask` is {mask.size[0]}x{mask.size[1]} but the image is "
            f"{source.size[0]}x{source.size[1]}: they must be the same size",
            details={"field": "mask"},
        )
    request = images.validate(fields)
    if request.width is None or request.height is None:
        fit = images.profile(images.chooser.choose(request.prompt, request.model).model)
        multiple = fit.family.size_multiple
        request = dataclasses.replace(
            request,
            width=request.width or _rounded(source.size[0], multiple, images.settings.max_width),
            height=request.height or _rounded(source.size[1], multiple, images.settings.max_height),
        )
    item = images.prepare(request)
    mode = "inpaint" if mask is not None else "img2img"
    family = images.profile(item.choice.model).family
    if mode not in family.edits:
        raise InvalidRequest(
            f"{family.label} models cannot do {mode} edits", details={"field": "model"}
        )
    assert item.request.width and item.request.height
    work = EditWork(item, strength, mask_blur, mode, parent_id)
    return work, pack_input(source, mask, (item.request.width, item.request.height))
