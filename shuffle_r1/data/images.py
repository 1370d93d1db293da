"""The images of multimodal prompts: decode, make RGB, resize onto the vision grid, encode.

docs/algorithm.md §7: images are RGB and resized to between ``data.min_pixels`` and
``data.max_pixels`` pixels (512²–2048² in the reference recipe). Qwen2.5-VL's vision tower cuts
an image into 14×14 patches and merges 2×2 patches into one language-model token, so both sides
must be multiples of ``factor`` = patch size × merge size = 28; the target size is transformers'
``smart_resize`` (the Qwen2-VL image processor's own rule: the nearest multiples of ``factor``,
scaled down or up to bring the area within the bounds, aspect ratio kept).

**The resize happens once**, when the data is loaded (:meth:`ImageSpec.prepare`), and the result
is encoded as PNG (lossless). Everything downstream — the prompt's tokenisation, the rollout
engines, the replay buffer, the learner — receives those bytes and runs the image processor
with ``do_resize=False`` (:func:`vision_inputs`), so the pixel grid, and with it the number of
image tokens in the prompt, is the same everywhere by construction. Bytes, not file paths,
cross process boundaries: a path is readable on one machine only.

Transparency is composited onto white before dropping alpha: in 20 of the 500 K12 diagrams
most pixels are transparent with black beneath, and a plain ``convert("RGB")`` (what
transformers' ``convert_to_rgb`` and EasyR1 do) turns their background black, under dark
strokes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

# Qwen2-VL / Qwen2.5-VL: 14-pixel patches, 2×2 of them merged into one token.
QWEN_VL_FACTOR = 28


class ImageError(ValueError):
    """An image that cannot be used; the message names it (file path or byte count) and why."""


def _label(source: bytes | str) -> str:
    return source if isinstance(source, str) else f"<{len(source)} bytes>"


def open_image(source: bytes | str) -> Image.Image:
    """Decode an image from a file path or encoded bytes, fully (a truncated file fails here,
    not later). Raises :class:`ImageError` naming the file: missing or unreadable, not an
    image, corrupt, or over PIL's decompression-bomb limit."""
    label = _label(source)
    try:
        data = Path(source).read_bytes() if isinstance(source, str) else source
    except OSError as exc:
        raise ImageError(f"image {label} cannot be read: {exc}") from exc
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.UnidentifiedImageError as exc:
        raise ImageError(f"image {label} is not an image PIL can identify") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # PIL reports corrupt data as OSError (truncated), SyntaxError (bad PNG chunks) or
        # ValueError, depending on the codec.
        raise ImageError(f"image {label} is corrupt or cannot be decoded: {exc}") from exc
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB; an image with transparency (RGBA, LA, palette with a transparent index) is
    composited onto white first (module doc)."""
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


@dataclass(frozen=True)
class ImageSpec:
    """How the images of a run are prepared: an area in ``[min_pixels, max_pixels]`` pixels,
    both sides multiples of ``factor`` (``data.min_pixels``, ``data.max_pixels``; the vision
    tower's patch size × merge size)."""

    min_pixels: int
    max_pixels: int
    factor: int = QWEN_VL_FACTOR

    def __post_init__(self) -> None:
        if not 1 <= self.min_pixels <= self.max_pixels or self.factor < 1:
            raise ValueError(
                f"ImageSpec needs 1 <= min_pixels <= max_pixels and factor >= 1, got "
                f"min_pixels={self.min_pixels}, max_pixels={self.max_pixels}, factor={self.factor}"
            )

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` after the resize (transformers' ``smart_resize``). Raises
        :class:`ImageError` for an aspect ratio over 200, which the vision tower refuses."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        try:
            new_height, new_width = smart_resize(
                height, width, self.factor, self.min_pixels, self.max_pixels
            )
        except ValueError as exc:
            raise ImageError(f"image of {width}x{height} pixels cannot be resized: {exc}") from exc
        return new_width, new_height

    def resize(self, image: Image.Image) -> Image.Image:
        """``image`` resized (bicubic, as the Qwen2-VL image processor does) to
        :meth:`target_size`; returned as is when it is already that size."""
        size = self.target_size(*image.size)
        return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)

    def prepare(self, source: bytes | str) -> bytes:
        """Decode ``source`` (a path or encoded bytes), make it RGB, resize it, and return it
        as PNG bytes: what every later stage receives. Raises :class:`ImageError` naming the
        image (see :func:`open_image`, :meth:`target_size`)."""
        try:
            image = self.resize(to_rgb(open_image(source)))
        except ImageError as exc:
            if isinstance(source, str) and source not in str(exc):
                raise ImageError(f"image {source}: {exc}") from exc
            raise
        out = io.BytesIO()
        image.save(out, format="PNG", compress_level=1)  # lossless; zlib level 1: fast
        return out.getvalue()


def decode_images(blobs: Sequence[bytes], factor: int = QWEN_VL_FACTOR) -> list[Image.Image]:
    """Decode prepared images (:meth:`ImageSpec.prepare`'s PNG bytes). Raises
    :class:`ImageError` for bytes that do not decode, or an image whose sides are not multiples
    of ``factor`` (it did not come through :meth:`ImageSpec.prepare`; without the resize the
    vision tower could not cut it into patches)."""
    images = []
    for k, blob in enumerate(blobs):
        image = to_rgb(open_image(blob))
        width, height = image.size
        if width % factor or height % factor:
            raise ImageError(
                f"image {k} ({_label(blob)}) is {width}x{height} pixels, not a multiple of "
                f"{factor} on each side; prepare images with ImageSpec.prepare"
            )
        images.append(image)
    return images


def expand_image_tokens(
    text: str, blobs: Sequence[bytes], image_processor: Any, image_token: str
) -> str:
    """``text`` with its k-th ``image_token`` (``<|image_pad|>``) repeated as many times as
    prepared image ``k`` has tokens: ``(height/14)·(width/14)/merge_size²``, the Qwen2-VL
    image processor's patch grid for an image it does not resize (module doc). What
    ``Qwen2_5_VLProcessor(text, images)`` does, without computing the pixel values (which
    took 27 s for K12's 500 images at 512²–2048² pixels here). Only the image headers are
    read. Raises ValueError when the placeholders and images differ in number, and
    :class:`ImageError` for an image that is off the grid or does not open."""
    parts = text.split(image_token)
    if len(parts) - 1 != len(blobs):
        raise ValueError(
            f"the prompt has {len(parts) - 1} {image_token} placeholder(s) for {len(blobs)} images"
        )
    patch, merge = image_processor.patch_size, image_processor.merge_size
    out = [parts[0]]
    for k, (blob, part) in enumerate(zip(blobs, parts[1:], strict=True)):
        try:
            width, height = Image.open(io.BytesIO(blob)).size
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageError(f"image {k} ({_label(blob)}) does not open: {exc}") from exc
        if width % (patch * merge) or height % (patch * merge):
            raise ImageError(
                f"image {k} ({_label(blob)}) is {width}x{height} pixels, not a multiple of "
                f"{patch * merge} on each side; prepare images with ImageSpec.prepare"
            )
        out.append(image_token * ((height // patch) * (width // patch) // merge**2) + part)
    return "".join(out)


def vision_inputs(
    images: Sequence[Sequence[bytes]], input_ids: Any, image_processor: Any, image_token_id: int
) -> dict[str, Any]:
    """The vision inputs of a batch of tokenised multimodal prompts (Qwen2-VL / Qwen2.5-VL).

    Args:
        images: per row of ``input_ids``, that prompt's prepared images (:meth:`ImageSpec.
            prepare`'s PNG bytes) in prompt order; ``()`` for a row without images.
        input_ids: ``(B, T)`` long tensor of the rows, each ``<|image_pad|>`` already
            expanded to its image's tokens (the processor's tokenisation of the prompt).
        image_processor: the model's image processor (PIL backend, ``shuffle_r1.processor``).
            It runs with ``do_resize=False`` (module doc), so the grids are the images' own.
        image_token_id: the ``<|image_pad|>`` id (``config.image_token_id``).

    Returns:
        ``pixel_values`` ``(P, C·t·14·14)`` float32 over the ``P`` patches of all images
        (``t`` = temporal patch size 2); ``image_grid_thw`` ``(I, 3)`` long, per image in row
        order (1, rows, columns of 14-pixel patches), image ``k`` being
        ``prod(image_grid_thw[k]) / merge_size²`` tokens; ``mm_token_type_ids`` ``(B, T)``
        int32, 1 on image tokens, 0 elsewhere. From the last two the model computes its 3-D
        mRoPE position ids (so no ``position_ids`` are passed for these models).

    Raises:
        ImageError: an image does not decode or is off the grid (:func:`decode_images`).
        ValueError: no row has an image, ``images`` and ``input_ids`` differ in rows, or a
            row holds a different number of image tokens than its images make (row named).
    """
    import torch

    if len(images) != input_ids.shape[0]:
        raise ValueError(f"{len(images)} rows of images for {input_ids.shape[0]} rows of tokens")
    blobs = [blob for row in images for blob in row]
    if not blobs:
        raise ValueError("vision_inputs needs at least one image")
    factor = image_processor.patch_size * image_processor.merge_size
    out = image_processor(images=decode_images(blobs, factor), do_resize=False, return_tensors="pt")
    grid = out["image_grid_thw"]
    tokens = (grid.prod(dim=1) // image_processor.merge_size**2).tolist()
    mm_token_type_ids = (input_ids == image_token_id).to(torch.int32)
    start = 0
    for i, row in enumerate(images):
        expected = sum(tokens[start : start + len(row)])
        start += len(row)
        found = int(mm_token_type_ids[i].sum())
        if found != expected:
            raise ValueError(
                f"row {i}: the prompt holds {found} image tokens but its {len(row)} image(s) "
                f"make {expected}; tokenise the prompt with the same prepared images"
            )
    return {
        "pixel_values": out["pixel_values"],
        "image_grid_thw": grid,
        "mm_token_type_ids": mm_token_type_ids,
    }
