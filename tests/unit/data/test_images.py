"""The image pipeline on real K12 diagrams and on bad images made the way they go bad:
missing, corrupt, not an image, truncated, too large, too small, too thin."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from shuffle_r1.data import ImageError, ImageSpec, decode_images, load_examples

K12 = Path(__file__).resolve().parents[3] / "data" / "k12"
SPEC = ImageSpec(min_pixels=56 * 56, max_pixels=112 * 112)


def png(size: tuple[int, int], mode: str = "RGB", color: object = (200, 10, 10)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format="PNG")  # type: ignore[arg-type]
    return out.getvalue()


def opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def transparent_k12_image() -> Path:
    """The first K12 image that is mostly transparent with black under the alpha."""
    import numpy as np

    for path in sorted((K12 / "images").glob("*.png")):
        image = Image.open(path)
        if image.mode != "RGBA":
            continue
        pixels = np.asarray(image)
        clear = pixels[..., 3] == 0
        if clear.mean() > 0.5 and pixels[..., :3][clear].mean() < 10:
            return path
    raise AssertionError("no transparent K12 image found")


def test_prepare_gives_rgb_png_on_the_grid_within_the_bounds() -> None:
    for size in ((323, 193), (3000, 2000), (5, 5), (400, 28)):
        out = opened(SPEC.prepare(png(size)))
        width, height = out.size
        assert out.format == "PNG" and out.mode == "RGB"
        assert width % 28 == 0 and height % 28 == 0, size
        assert SPEC.min_pixels <= width * height <= SPEC.max_pixels, (size, out.size)
    # too large: scaled down keeping the aspect ratio; too small: scaled up
    assert opened(SPEC.prepare(png((3000, 2000)))).size == (112, 84)
    assert opened(SPEC.prepare(png((5, 5)))).size == (56, 56)


def test_prepare_is_idempotent_so_later_stages_see_the_same_grid() -> None:
    once = SPEC.prepare(str(K12 / "images" / "4d613249-84c9-401f-bd27-ac6869e87a8b.png"))
    assert SPEC.prepare(once) == once


def test_transparent_diagram_is_composited_on_white() -> None:
    import numpy as np

    path = transparent_k12_image()
    prepared = opened(SPEC.prepare(str(path)))
    out = np.asarray(prepared)
    naive = np.asarray(Image.open(path).convert("RGB").resize(prepared.size))
    # mostly white background with dark strokes, where a plain convert("RGB") is mostly black
    assert out.mean() > 200 and out.min() < 100
    assert naive.mean() < 60


def test_grayscale_palette_and_bilevel_k12_images_become_rgb() -> None:
    seen = set()
    for path in sorted((K12 / "images").glob("*.png")):
        mode = Image.open(path).mode
        if mode in seen:
            continue
        seen.add(mode)
        assert opened(SPEC.prepare(str(path))).mode == "RGB", (path, mode)
    assert {"RGB", "RGBA", "L", "P", "1"} <= seen


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: str(d / "missing.png"), r"missing\.png cannot be read"),
        (lambda d: b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "is not an image PIL can identify"),
        (lambda d: b"just some text, not an image", "is not an image PIL can identify"),
        (lambda d: png((300, 300))[:200], "corrupt or cannot be decoded"),
        (lambda d: png((2000, 5)), "aspect ratio must be smaller than 200"),
    ],
    ids=["missing file", "corrupt bytes", "not an image", "truncated", "too thin"],
)
def test_bad_images_raise_a_clear_error(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        SPEC.prepare(make(tmp_path))


def test_bad_image_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "figure.png"
    path.write_text("not a png")
    with pytest.raises(ImageError, match=f"image {path} is not an image"):
        SPEC.prepare(str(path))


def test_decode_refuses_images_off_the_grid() -> None:
    assert [i.size for i in decode_images([SPEC.prepare(png((100, 60)))])] == [(112, 56)]
    with pytest.raises(ImageError, match=r"image 0 .* is 100x60 pixels, not a multiple of 28"):
        decode_images([png((100, 60))])


def test_loader_skips_and_counts_rows_with_bad_images_naming_file_and_row(
    tmp_path: Path,
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    good = K12 / "images" / "4d613249-84c9-401f-bd27-ac6869e87a8b.png"
    shutil.copy(good, images / "good.png")
    (images / "corrupt.png").write_bytes(good.read_bytes()[:300])
    (images / "text.png").write_text("a text file named .png")
    (images / "huge.png").write_bytes(png((4000, 3000)))
    (images / "tiny.png").write_bytes(png((3, 4)))
    rows = [
        {"id": "a", "question": "q", "answer": "1", "image_path": "images/good.png"},
        {"id": "b", "question": "q", "answer": "2", "image_path": "images/missing.png"},
        {"id": "c", "question": "q", "answer": "3", "image_path": "images/corrupt.png"},
        {"id": "d", "question": "q", "answer": "4", "image_path": "images/text.png"},
        {"id": "e", "question": "q", "answer": "5", "image_path": "images/huge.png"},
        {"id": "f", "question": "q", "answer": "6", "image_path": "images/tiny.png"},
    ]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    result = load_examples(
        path, problem_key="question", image_key="image_path", id_key="id", image_spec=SPEC
    )
    assert [e.uid for e in result.examples] == ["a", "e", "f"]
    assert all(isinstance(e.images[0], bytes) for e in result.examples)
    assert [opened(e.images[0]).size for e in result.examples[1:]] == [(112, 84), (56, 84)]
    skipped = [(s.row, s.reason) for s in result.skipped]
    assert [row for row, _ in skipped] == [2, 3, 4]
    assert "image file not found" in skipped[0][1] and "missing.png" in skipped[0][1]
    assert f"image {images / 'corrupt.png'} is corrupt" in skipped[1][1]
    assert f"image {images / 'text.png'} is not an image" in skipped[2][1]
    assert str(result.skipped[1]).startswith(f"{path} row 3: image {images / 'corrupt.png'}")


def test_loader_limit_reads_only_the_first_rows() -> None:
    result = load_examples(
        K12 / "k12.json",
        problem_key="question",
        image_key="image_path",
        id_key="id",
        image_spec=SPEC,
        limit=3,
    )
    assert len(result.examples) == 3 and all(
        isinstance(e.images[0], bytes) for e in result.examples
    )
