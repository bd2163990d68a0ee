"""Turn one DICOM file into an 8-bit Pillow image suitable for a thumbnail.

Only pydicom's own decoders (and Pillow, which pydicom uses for baseline JPEG)
are relied on: a transfer syntax nothing installed can decode raises
:class:`NotRenderableError` with pydicom's reason, and the worker moves on to
another instance instead of failing the job.
"""

from __future__ import annotations

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
MAX_SIDE = 256


class NotRenderableError(Exception):
    """The file has no pixel data, or none that can be decoded here."""


def frame_count(ds: Dataset) -> int:
    """NumberOfFrames, tolerating absent or malformed values (e.g. ``1A``)."""
    try:
        return max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        return 1


def read_middle_frame(path: str) -> tuple[np.ndarray, Dataset]:
    """Decode only the middle frame of ``path``; return it with its dataset."""
    ds = pydicom.dcmread(path, force=True)
    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        raise NotRenderableError("no pixel data")
    try:
        frame = pixel_array(ds, index=frame_count(ds) // 2)
    except Exception as exc:  # decoder errors come as RuntimeError, ValueError, ...
        # pydicom lists the missing decoder plugins over several lines.
        message = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise NotRenderableError(f"cannot decode pixel data: {message}") from exc
    return frame, ds


def scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Min-max scale to 0..255; a uniform or non-finite image becomes black."""
    data = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(data.shape, dtype=np.uint8)
    low, high = float(data[finite].min()), float(data[finite].max())
    if high <= low:
        return np.zeros(data.shape, dtype=np.uint8)
    scaled = (np.clip(np.where(finite, data, low), low, high) - low) * (255.0 / (high - low))
    return np.rint(scaled).astype(np.uint8)


def _colour_to_uint8(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    if frame.dtype == np.uint8:
        return frame
    # Scale by the stored bit depth, not min-max, so colours keep their balance.
    bits = int(ds.get("BitsStored") or frame.dtype.itemsize * 8)
    scaled = frame.astype(np.float64) * (255.0 / ((1 << bits) - 1))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _grey_to_uint8(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    values = apply_modality_lut(frame, ds)
    try:
        display = scale_to_uint8(apply_voi_lut(values, ds))
    except Exception:  # a malformed window must not cost the thumbnail
        display = scale_to_uint8(values)
    if not display.any() or display.min() == display.max():
        # The stored window may miss the data entirely (a window for another
        # reconstruction, say); the full range still shows the anatomy.
        display = scale_to_uint8(values)
    return display


def to_uint8(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """Display-ready 8-bit grey (rows, cols) or RGB (rows, cols, 3) array."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(frame, ds)
        # LUT entries are 8 or 16 bits whatever BitsStored (the index depth) says.
        return rgb if rgb.dtype == np.uint8 else (rgb // 257).astype(np.uint8)
    if frame.ndim == 3 and frame.shape[-1] in (3, 4):
        # pixel_array already converted YBR_FULL(_422) to RGB.
        return _colour_to_uint8(frame[..., :3], ds)
    if frame.ndim != 2:
        raise NotRenderableError(f"unexpected pixel array shape {frame.shape}")
    grey = _grey_to_uint8(frame, ds)
    if photometric == "MONOCHROME1":
        grey = 255 - grey  # MONOCHROME1 shows low values as white
    return grey


def render(path: str, max_side: int = MAX_SIDE) -> Image.Image:
    """The thumbnail image of one file's middle frame, at most ``max_side`` a side."""
    frame, ds = read_middle_frame(path)
    image = Image.fromarray(to_uint8(frame, ds))
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image
