"""Conditioning images (`--image`, `--last-image`): read, checked and fitted to the render size.

Read with Pillow (no torch): this runs in preflight, on every rank, before any weight loads, so a missing,
unreadable or unsupported file is one line `error: ...` (exit 2) and nothing is written. Any image-conditioned
family can use it (Wan2.1/2.2 I2V, FLF2V here; Wan2.2 TI2V's image mode reads its first frame the same way).

What the model sees, as in diffusers' Wan image-to-video pipeline:
- the CLIP image encoder (Wan2.1 I2V) gets the image as read (RGB); its image processor resizes and
  crops to its own 224 x 224;
- the VAE gets the image fitted to the render size (`fit`): scaled with Lanczos to cover height x width and
  centre-cropped, the result of diffusers' VaeImageProcessor resize_mode="crop". When the aspect ratio
  already matches, this is exactly the pipeline's default (a plain Lanczos resize), so the two agree; for
  any other aspect ratio the pipeline would stretch the image, which we do not.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import UserError

FORMATS = ("PNG", "JPEG")  # what Pillow reports for .png and .jpg/.jpeg files
# Modes that become RGB without changing what the picture shows (grayscale, palette, opaque alpha).
CONVERTIBLE = ("RGB", "L", "P", "RGBA", "LA")
MAX_PIXELS = 100_000_000  # a decompression bomb is refused, not decoded


class ImageError(UserError, ValueError):
    """A conditioning image that cannot be used; the message is one line naming the flag's config key."""


def load_image(path: str | Path, key: str = "image"):
    """The image at `path` as an RGB PIL image (fully decoded); ImageError (one line) otherwise."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    where = f"{key}={str(path)!r}"
    if not path.exists():
        raise ImageError(f"{where}: file not found")
    if path.is_dir():
        raise ImageError(f"{where}: is a directory")
    try:
        with Image.open(path) as img:
            if img.format not in FORMATS:
                raise ImageError(f"{where}: a {img.format} image; expected PNG or JPEG")
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"{where}: {img.width}x{img.height} pixels is more than {MAX_PIXELS:,}")
            mode = img.mode
            if mode not in CONVERTIBLE:
                raise ImageError(f"{where}: colour mode {mode} is not supported (expected RGB, grayscale L or "
                                 "palette P; convert it to 8-bit RGB)")
            img.load()  # decode now: a truncated file fails here, not in the sampler
            if mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            if img.mode in ("RGBA", "LA"):
                alpha = img.getchannel("A")
                if alpha.getextrema()[0] < 255:
                    raise ImageError(f"{where}: has transparent pixels; flatten it onto a background first")
            # a camera's JPEG shows its pixels rotated by its EXIF orientation (diffusers' load_image does the same)
            return ImageOps.exif_transpose(img).convert("RGB")
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{where}: not an image (expected PNG or JPEG)") from None
    except OSError as e:  # unreadable (permissions) or truncated / corrupt image data
        raise ImageError(f"{where}: cannot read ({e.strerror or first_line(e)})") from None
    except Exception as e:  # Pillow raises many types on malformed files (ValueError, SyntaxError, ...)
        raise ImageError(f"{where}: cannot decode ({type(e).__name__}: {first_line(e)})") from None


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def fit(image, height: int, width: int):
    """`image` scaled (Lanczos) to cover width x height and centre-cropped to exactly that size."""
    from PIL import Image

    if image.size == (width, height):
        return image.copy()
    scale = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    resized = image.resize((w, h), resample=Image.LANCZOS)
    left, top = (w - width) // 2, (h - height) // 2
    return resized.crop((left, top, left + width, top + height))


def image_digest(path: str | Path) -> str:
    """sha256 of the file's bytes (the checkpoint fingerprint: the same path with another picture differs)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
