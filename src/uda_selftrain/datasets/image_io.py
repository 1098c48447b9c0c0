"""Reading and writing the image files of the datasets (Pillow; OpenCV for 16-bit labels).

These libraries live in the optional ``data`` extra (``pip install uda-selftrain[data]``) and are
imported on first use, so ``import uda_selftrain`` never needs them. Labels are always read as
*indices*: a palette PNG gives its palette indices, never the palette's colours.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_open

__all__ = [
    "png_header",
    "read_label",
    "read_label_channel0",
    "read_rgb",
    "write_label",
    "write_rgb",
]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading dataset images needs Pillow: pip install 'uda-selftrain[data]'"
        ) from e
    return Image


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading 16-bit PNG labels (SYNTHIA) needs OpenCV, because Pillow truncates 16-bit "
            "colour PNGs to 8 bits: pip install 'uda-selftrain[data]'"
        ) from e
    return cv2


def png_header(path: str | os.PathLike[str]) -> tuple[int, int, int, int] | None:
    """``(width, height, bit_depth, colour_type)`` of a PNG file, or None for another format."""
    with open(path, "rb") as f:
        head = f.read(29)
    if len(head) < 29 or head[:8] != _PNG_MAGIC or head[12:16] != b"IHDR":
        return None
    w, h, depth, ctype = struct.unpack(">IIBB", head[16:26])
    return w, h, depth, ctype


def _open(path: str | os.PathLike[str]) -> Any:
    image = _pil()
    try:
        im = image.open(path)
        im.load()
    except FileNotFoundError:
        raise
    except Exception as e:
        raise OSError(f"cannot read image {path}: {e}") from e
    return im


def read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB image."""
    im = _open(path)
    return np.array(im.convert("RGB"), dtype=np.uint8)  # a writable copy


def read_label(path: str | os.PathLike[str]) -> np.ndarray:
    """``(H, W)`` integer label map: indices of a palette or grey PNG (16-bit grey kept as int32),
    channel 0 of a colour PNG (8 bit via Pillow, 16 bit via :func:`read_label_channel0`)."""
    header = png_header(path)
    if header is not None and header[2] == 16 and header[3] in (2, 4, 6):
        return read_label_channel0(path)
    im = _open(path)
    if im.mode in ("P", "L", "1"):
        return np.asarray(im, dtype=np.uint8) if im.mode != "1" else np.asarray(im, np.uint8)
    if im.mode in ("I", "I;16", "I;16B", "I;16L"):
        return np.asarray(im).astype(np.int32)
    return np.asarray(im)[..., 0].astype(np.uint8)


def read_label_channel0(path: str | os.PathLike[str]) -> np.ndarray:
    """Channel 0 (red) of a 16-bit multi-channel PNG, as int32 (SYNTHIA's class ids)."""
    cv2 = _cv2()
    if not Path(path).is_file():
        raise FileNotFoundError(path)
    arr = cv2.imread(os.fspath(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise OSError(f"cannot read image {path}")
    if arr.ndim == 2:
        return arr.astype(np.int32)
    return arr[..., 2].astype(np.int32)  # OpenCV orders channels BGR(A): red is index 2


def write_rgb(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write an ``(H, W, 3)`` uint8 image as PNG (or by extension), atomically."""
    _write(path, _pil().fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB"))


def write_label(path: str | os.PathLike[str], labels: np.ndarray) -> None:
    """Write an ``(H, W)`` label map with values in ``[0, 255]`` as an 8-bit grey PNG, atomically."""
    arr = np.asarray(labels)
    if arr.ndim != 2 or arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
        raise ValueError(f"labels must be a 2-D array with values in [0, 255], got {arr.shape}")
    _write(path, _pil().fromarray(arr.astype(np.uint8), "L"))


def write_label16(path: str | os.PathLike[str], labels: np.ndarray) -> None:
    """Write ``(H, W)`` class ids (0–65535) into channel 0 of a 16-bit RGBA PNG, as SYNTHIA ships
    its labels (channel 1 holds the same ids, 2 zeros, alpha full), atomically. Needs OpenCV."""
    cv2 = _cv2()
    arr = np.asarray(labels)
    if arr.ndim != 2 or arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
        raise ValueError(f"labels must be a 2-D array with values in [0, 65535], got {arr.shape}")
    ids = arr.astype(np.uint16)
    # OpenCV orders channels BGRA: red (channel 0 of the file) is index 2.
    bgra = np.stack([np.zeros_like(ids), ids, ids, np.full_like(ids, 65535)], axis=-1)
    ok, buf = cv2.imencode(".png", bgra)
    if not ok:
        raise OSError(f"cannot encode a 16-bit PNG for {path}")
    with atomic_open(path, "wb") as f:
        f.write(buf.tobytes())


def _write(path: str | os.PathLike[str], im: Any) -> None:
    fmt = "PNG" if str(path).lower().endswith(".png") else None
    with atomic_open(path, "wb") as f:
        im.save(f, format=fmt or Path(path).suffix.lstrip(".").upper())
