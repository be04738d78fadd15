"""The images of OpenAI `image_url` content parts, read within limits (LLaDA-V servers).

A part's `url` is a `data:` URL (base64, always accepted), an `http(s)://` URL (only with `--allow-image-urls`:
fetched with a time limit), or a `file://` URL of a file under `--allowed-local-media-path` (vLLM's flag). Every
image is limited in bytes (413 beyond) and in pixels (400 beyond, checked on the header before the pixels are
decoded, so a decompression bomb costs nothing); a request is limited in images (400 beyond). Unreadable data and
failed fetches are 400s that say what to send instead.
"""

import base64
import binascii
import io
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass

from PIL import Image

from .protocol import OpenAIError


@dataclass
class ImageLimits:
    """What a request may send as images.

    Args:
        max_images: images per request (all messages together).
        max_pixels: width x height of one image.
        max_bytes: encoded bytes of one image (the file, not the pixels).
        allow_urls: fetch `http(s)://` URLs (off by default: the server would fetch whatever a client names).
        fetch_timeout: seconds one fetch may take in all.
        local_folder: `file://` URLs are read when the file lies under this folder (None: refused).
    """

    max_images: int = 8
    max_pixels: int = 4096 * 4096
    max_bytes: int = 10 << 20
    allow_urls: bool = False
    fetch_timeout: float = 10.0
    local_folder: str | None = None


def check_image_count(count: int, limits: ImageLimits) -> None:
    if count > limits.max_images:
        raise OpenAIError(400, f"This request holds {count} images; this server takes at most {limits.max_images} "
                               "per request (--max-images).", param="messages", code="too_many_images")


def read_image(url: str, limits: ImageLimits) -> Image.Image:
    """The image an `image_url` names, decoded and in RGB; an `OpenAIError` says what is wrong with it."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "data":
        data = _data_url_bytes(url, limits)
    elif scheme in ("http", "https"):
        data = _fetched_bytes(url, limits)
    elif scheme == "file":
        data = _local_file_bytes(url, limits)
    else:
        raise _bad_image(f"An image URL must be a data: URL (base64), an http(s) URL or a file:// URL; got "
                         f"{url[:40]!r}.")
    return _decoded(data, limits)


def _data_url_bytes(url: str, limits: ImageLimits) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise _bad_image("A data: image URL must be base64: `data:image/png;base64,<data>`.")
    if len(payload) * 3 // 4 > limits.max_bytes:  # refused before it is decoded
        raise _too_large(len(payload) * 3 // 4, limits)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad_image("The data: image URL holds invalid base64.") from None


def _fetched_bytes(url: str, limits: ImageLimits) -> bytes:
    if not limits.allow_urls:
        raise _bad_image("This server does not fetch image URLs; send the image as a data: URL (base64), or start "
                         "the server with --allow-image-urls.")
    deadline = time.monotonic() + limits.fetch_timeout
    chunks, size = [], 0
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "llada-hf"}),
                                    timeout=limits.fetch_timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
                raise _too_large(int(declared), limits)
            while chunk := response.read(1 << 16):
                size += len(chunk)
                if size > limits.max_bytes:
                    raise _too_large(size, limits)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"more than {limits.fetch_timeout:g} s")
                chunks.append(chunk)
    except OpenAIError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as error:  # HTTP errors, refused, timeouts, bad URLs
        raise _bad_image(f"Could not fetch the image URL ({error}).") from None
    return b"".join(chunks)


def _local_file_bytes(url: str, limits: ImageLimits) -> bytes:
    if limits.local_folder is None:
        raise _bad_image("This server reads no local files; send the image as a data: URL (base64), or start the "
                         "server with --allowed-local-media-path FOLDER.")
    path = os.path.realpath(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
    folder = os.path.realpath(limits.local_folder)
    if os.path.commonpath([path, folder]) != folder:
        raise _bad_image(f"Image files must lie under {limits.local_folder} (--allowed-local-media-path).")
    if not os.path.isfile(path):
        raise _bad_image(f"No image file at {url}.")
    if os.path.getsize(path) > limits.max_bytes:
        raise _too_large(os.path.getsize(path), limits)
    with open(path, "rb") as file:
        return file.read()


def _decoded(data: bytes, limits: ImageLimits) -> Image.Image:
    try:
        with warnings.catch_warnings():  # our own pixel limit decides, not PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
            if image.width * image.height > limits.max_pixels:
                raise _bad_image(f"An image is {image.width} x {image.height} pixels; this server takes at most "
                                 f"{limits.max_pixels} pixels per image (--max-image-pixels).")
            image.load()
    except OpenAIError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise _bad_image(f"Cannot read an image ({error}); send PNG, JPEG, GIF or WebP data.") from None
    if min(image.size) == 0:
        raise _bad_image("An image is empty (0 pixels).")
    return image.convert("RGB")


def _bad_image(message: str) -> OpenAIError:
    return OpenAIError(400, message, param="messages", code="invalid_image")


def _too_large(size: int, limits: ImageLimits) -> OpenAIError:
    return OpenAIError(413, f"An image is {size} bytes; this server takes at most {limits.max_bytes} bytes per image "
                            "(--max-image-bytes).", param="messages", code="image_too_large")
