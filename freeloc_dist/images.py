"""Conditioning images (`--image`, `--last-image`): read, checked and fitted to the render size.

Read with Pillow (no torch): this runs in preflight, on every rank, before any weight loads, so a missing,
unreadable or unsupported file is one line `error: ...` (exit 2) and nothing is written. Each file is read
once, there (`keep_images`: regular files only, checked before opening, so a FIFO or a pipe never blocks and
is refused); its bytes are what the conditioning decodes and the checkpoint fingerprints, so the picture
checked is the picture used. An image that fitting would scale past MAX_PIXELS (`check_fit`) is refused
there too. Any image-conditioned family can use it (Wan2.1/2.2 I2V, FLF2V here; Wan2.2 TI2V's image mode
reads its first frame the same way).

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
import io
import os
import stat
import warnings
from pathlib import Path

from .errors import UserError

FORMATS = ("PNG", "JPEG")  # what Pillow reports for .png and .jpg/.jpeg files
# Modes that become RGB without changing what the picture shows (grayscale, palette, opaque alpha).
CONVERTIBLE = ("RGB", "L", "P", "RGBA", "LA")
MAX_PIXELS = 100_000_000  # a decompression bomb is refused, not decoded; fitting never needs a larger image either
MAX_FILE_BYTES = 256 * 2**20  # an image file is read whole, once (`read_image_file`)

# The bytes of each conditioning image as preflight read them (`keep_images`), by path: every later use in this
# process (decoding for the conditioning, the checkpoint fingerprint) takes these bytes, never the file again.
_KEPT: dict[str, bytes] = {}


class ImageError(UserError, ValueError):
    """A conditioning image that cannot be used; the message is one line naming the flag's config key."""


def file_type(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "pipe or FIFO"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def read_image_file(path: str | Path, key: str = "image") -> bytes:
    """The bytes of the regular file at `path`, read whole (at most MAX_FILE_BYTES); ImageError (one line)
    otherwise. Never blocks: the type is checked before opening (a FIFO, a pipe such as bash's `<(...)`, a
    device, a socket or a directory is refused), and the file is opened non-blocking and checked again."""
    path = Path(path)
    where = f"{key}={str(path)!r}"
    try:
        mode = os.stat(path).st_mode  # stat never blocks; opening a FIFO without a writer would
        if not stat.S_ISREG(mode):
            raise ImageError(f"{where}: is a {file_type(mode)}, not a regular file (give the image as a file: "
                             "every rank reads it, and --resume reads it again)")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageError(f"{where}: file not found") from None
    except OSError as e:
        raise ImageError(f"{where}: cannot read ({e.strerror or first_line(e)})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # replaced since the check above
            raise ImageError(f"{where}: is a {file_type(info.st_mode)}, not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise ImageError(f"{where}: {info.st_size:,} bytes is more than {MAX_FILE_BYTES:,}")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ImageError(f"{where}: cannot read ({e.strerror or first_line(e)})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:  # grew since fstat
        raise ImageError(f"{where}: more than {MAX_FILE_BYTES:,} bytes")
    return data


def keep_images(paths: dict[str, str | Path | None]) -> None:
    """Read each conditioning image ({config key: path or None}) once, now, and keep its bytes for every later
    use in this process (`image_bytes`); images kept by an earlier run are forgotten. Preflight calls this."""
    read = {str(Path(path)): read_image_file(path, key) for key, path in paths.items() if path is not None}
    _KEPT.clear()
    _KEPT.update(read)


def image_bytes(path: str | Path, key: str = "image") -> bytes:
    """The image's bytes as preflight kept them (`keep_images`); read from the file when none were kept (a
    library call that skipped preflight)."""
    kept = _KEPT.get(str(Path(path)))
    return kept if kept is not None else read_image_file(path, key)


def load_image(path: str | Path, key: str = "image"):
    """The image at `path` (its kept bytes, `image_bytes`) as an RGB PIL image (fully decoded); ImageError
    (one line) otherwise."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    where = f"{key}={str(Path(path))!r}"
    data = image_bytes(path, key)
    try:
        with warnings.catch_warnings():  # MAX_PIXELS is the limit here, said in one line, not Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
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
    except Image.DecompressionBombError:  # past twice Pillow's own limit: refused by Pillow before our check
        raise ImageError(f"{where}: more than {MAX_PIXELS:,} pixels") from None
    except UnidentifiedImageError:
        raise ImageError(f"{where}: not an image (expected PNG or JPEG)") from None
    except OSError as e:  # truncated / corrupt image data
        raise ImageError(f"{where}: cannot read ({e.strerror or first_line(e)})") from None
    except Exception as e:  # Pillow raises many types on malformed files (ValueError, SyntaxError, ...)
        raise ImageError(f"{where}: cannot decode ({type(e).__name__}: {first_line(e)})") from None


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def fitted_size(size: tuple[int, int], height: int, width: int) -> tuple[int, int]:
    """(w, h) an image of `size` (w, h) is scaled to by `fit` before its centre crop to width x height."""
    scale = max(width / size[0], height / size[1])
    return max(width, round(size[0] * scale)), max(height, round(size[1] * scale))


def check_fit(size: tuple[int, int], height: int, width: int, where: str = "image") -> None:
    """ImageError (one line) when fitting an image of `size` (w, h) to width x height would scale it to more
    than MAX_PIXELS (an aspect ratio far from the video's: a 1 x 200,000 image is 64 x 12,800,000 for 64 x 64),
    computed from the sizes alone, before anything is scaled."""
    w, h = fitted_size(size, height, width)
    if w * h > MAX_PIXELS:
        raise ImageError(f"{where}: {size[0]}x{size[1]} pixels would be scaled to {w}x{h} (more than "
                         f"{MAX_PIXELS:,} pixels) to cover the {width}x{height} video; crop it nearer the video's "
                         "aspect ratio")


def fit(image, height: int, width: int):
    """`image` scaled (Lanczos) to cover width x height and centre-cropped to exactly that size."""
    from PIL import Image

    if image.size == (width, height):
        return image.copy()
    check_fit(image.size, height, width)
    w, h = fitted_size(image.size, height, width)
    resized = image.resize((w, h), resample=Image.LANCZOS)
    left, top = (w - width) // 2, (h - height) // 2
    return resized.crop((left, top, left + width, top + height))


def image_digest(path: str | Path) -> str:
    """sha256 of the image's bytes (`image_bytes`): the checkpoint fingerprint of its content, not its path."""
    return hashlib.sha256(image_bytes(path)).hexdigest()[:16]
