"""The LoRAs requests may name: files in S2I_LORA_DIR, their family, and the style cues for them.

Pure Python: a LoRA's family is read from its .safetensors header (the "modelspec" or kohya
metadata, else the layout of its tensor names), never from its weights. The engine loads the
files as adapters onto a resident pipeline; this module only says which file a name means.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .engines.families import FAMILIES, safetensors_header
from .style import matches_cue

__all__ = ["LoraCatalog", "LoraFile", "LoraRef", "StyleLoraHit", "family_label", "style_lora_hits"]

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes in a folder

# Metadata values that say what a LoRA was trained for, by prefix.
_ARCHITECTURES = {
    "stable-diffusion-v1": "sd1",
    "stable-diffusion-v2": "sd2",
    "stable-diffusion-xl": "sdxl",
    "stable-diffusion-v3": "sd3",
    "flux-1": "flux",
    "sd_v1": "sd1",
    "sd_v2": "sd2",
    "sdxl": "sdxl",
    "sd3": "sd3",
    "flux1": "flux",
}


@dataclasses.dataclass(frozen=True)
class LoraRef:
    """A LoRA a request uses, by name, with the weight it is applied at."""

    name: str
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class LoraFile:
    """A LoRA file found in the folder, and the family it fits (None: not stated)."""

    name: str
    path: Path
    family: str | None
    mtime: float

    def as_dict(self) -> dict[str, Any]:
        """What /config shows: the name and the family (never the server's path)."""
        return {"name": self.name, "family": self.family}


def _family(header: Mapping[str, Any]) -> str | None:
    metadata = header.get("__metadata__")
    if isinstance(metadata, Mapping):
        for key in ("modelspec.architecture", "ss_base_model_version"):
            value = metadata.get(key)
            if isinstance(value, str):
                for prefix, family in _ARCHITECTURES.items():
                    if value.lower().startswith(prefix):
                        return family
    keys = [k for k in header if k != "__metadata__"]
    if any(
        k.startswith(("transformer.", "lora_unet_double_blocks", "lora_unet_single")) for k in keys
    ):
        return "flux"
    if any(k.startswith(("text_encoder_2.", "lora_te2_")) for k in keys):
        return "sdxl"
    return None


class LoraCatalog:
    """The LoRA files of one folder, looked up by name; the listing is refreshed on change."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._seen: tuple[float, dict[str, LoraFile]] | None = None

    @property
    def enabled(self) -> bool:
        """True when a LoRA folder is configured."""
        return self.folder is not None

    def files(self) -> dict[str, LoraFile]:
        """Every LoRA by name: ``NAME.safetensors`` or ``NAME/pytorch_lora_weights.safetensors``."""
        if self.folder is None:
            return {}
        try:
            stamp = self.folder.stat().st_mtime
        except OSError:
            return {}
        with self._lock:
            if self._seen is not None and self._seen[0] == stamp:
                return self._seen[1]
        found: dict[str, LoraFile] = {}
        for entry in sorted(self.folder.iterdir()):
            path = entry / DIFFUSERS_FILE if entry.is_dir() else entry
            name = entry.name if entry.is_dir() else entry.stem
            if path.suffix != ".safetensors" or not path.is_file() or not NAME.match(name):
                continue
            header = safetensors_header(path)
            if header:
                found[name] = LoraFile(name, path, _family(header), path.stat().st_mtime)
        with self._lock:
            self._seen = (stamp, found)
        return found

    def get(self, name: str) -> LoraFile | None:
        """The LoRA called ``name``, or None."""
        return self.files().get(name)


@dataclasses.dataclass(frozen=True)
class StyleLoraHit:
    """A style cue heard in a prompt and the LoRA it turns on."""

    cue: str
    lora: LoraRef


def style_lora_hits(prompt: str, style_loras: Mapping[str, Any]) -> list[StyleLoraHit]:
    """The LoRAs whose cue the prompt contains, in the order of the mapping, one per LoRA.

    ``style_loras`` maps a cue to an object with ``lora`` and ``weight`` (S2I_STYLE_LORAS).
    """
    hits: dict[str, StyleLoraHit] = {}
    for cue, target in style_loras.items():
        if target.lora not in hits and matches_cue(prompt, cue):
            hits[target.lora] = StyleLoraHit(cue, LoraRef(target.lora, float(target.weight)))
    return list(hits.values())


def family_label(family: str | None) -> str:
    """A family's name for people ('an unstated family' when None)."""
    return FAMILIES[family].label if family in FAMILIES else "an unstated family"
