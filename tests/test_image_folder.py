"""Reading ImageFolder trees: hidden entries, symlinks, 16-bit grey PNGs, huge images, duplicate files."""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cil.data import (
    MAX_PIXELS_ENV,
    ImageFolderDataset,
    _pil_loader,
    _rgb,
    _to_float_rgb,
    find_duplicates,
    image_folder,
    warn_duplicates,
)
from cil.stream import build_stream


def _png(path: Path, value: int, size: int = 6) -> Path:
    """A small grey PNG whose pixels are ``value`` (distinct values give distinct files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)
    return path


def _tree(root: Path, classes: dict[str, int]) -> None:
    """``root/<class>/<i>.png`` with ``classes[name]`` images per class, every image distinct."""
    for c, (name, count) in enumerate(classes.items()):
        for i in range(count):
            _png(root / name / f"{i}.png", 10 * c + i)


def _relative(data: ImageFolderDataset) -> list[tuple[str, int]]:
    return [(os.path.relpath(path, data.root), label) for path, label in data.samples]


# ---- (a) hidden entries --------------------------------------------------------------------------------------------
def test_hidden_folders_and_files_are_not_classes_or_images(tmp_path: Path) -> None:
    _tree(tmp_path, {"ant": 2, "bee": 1})
    _png(tmp_path / ".ipynb_checkpoints" / "0.png", 99)  # a hidden folder at the top: not a class
    _png(tmp_path / ".git" / "objects" / "0.png", 98)
    _png(tmp_path / "ant" / ".ipynb_checkpoints" / "0-checkpoint.png", 97)  # hidden sub-folder of a class
    (tmp_path / "ant" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")  # macOS metadata
    (tmp_path / ".DS_Store").write_bytes(b"Bud1")
    (tmp_path / "bee" / ".DS_Store").write_bytes(b"Bud1")
    data = image_folder(tmp_path)
    assert data.classes == ["ant", "bee"] and data.class_to_idx == {"ant": 0, "bee": 1}
    assert _relative(data) == [("ant/0.png", 0), ("ant/1.png", 0), ("bee/0.png", 1)]
    assert data.targets == [0, 0, 1] and len(data) == 3
    assert all(image.mode == "RGB" for image, _ in data)  # the AppleDouble file is never loaded


def test_a_root_of_only_hidden_folders_has_no_class_folder(tmp_path: Path) -> None:
    _png(tmp_path / ".ipynb_checkpoints" / "0.png", 1)
    with pytest.raises(FileNotFoundError, match=r"has no class folder; put the images in one sub-folder per class"):
        image_folder(tmp_path)


def test_a_class_folder_without_images_is_one_line_naming_it(tmp_path: Path) -> None:
    _tree(tmp_path, {"ant": 1})
    _png(tmp_path / "bee" / ".hidden.png", 1)  # only a hidden image: empty
    with pytest.raises(FileNotFoundError) as error:
        image_folder(tmp_path)
    assert "\n" not in str(error.value) and "['bee']" in str(error.value) and "add images" in str(error.value)


# ---- (b) symlinks --------------------------------------------------------------------------------------------------
def test_directory_symlinks_inside_a_class_are_not_followed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "data"
    _tree(root, {"ant": 2, "bee": 2})
    (root / "ant" / "loop").symlink_to(root / "ant", target_is_directory=True)  # a cycle
    (root / "ant" / "up").symlink_to(root, target_is_directory=True)  # a cycle through the root
    (root / "bee" / "ants").symlink_to(root / "ant", target_is_directory=True)  # another class's images
    (root / "bee" / "real").mkdir()
    _png(root / "bee" / "real" / "deep.png", 77)  # a real sub-folder is still read
    (root / "bee" / "same.png").symlink_to(root / "bee" / "0.png")  # a file link is read
    with caplog.at_level(logging.WARNING, logger="cil.data"):
        data = image_folder(root)
    assert data.classes == ["ant", "bee"]
    assert _relative(data) == [
        ("ant/0.png", 0), ("ant/1.png", 0),
        ("bee/0.png", 1), ("bee/1.png", 1), ("bee/same.png", 1), ("bee/real/deep.png", 1),
    ]  # fmt: skip
    [record] = [r for r in caplog.records if "symlink" in r.getMessage()]
    assert "did not follow 3 directory symlink(s)" in record.getMessage() and "ant/loop" in record.getMessage()


def test_a_symlinked_class_folder_outside_the_root_is_followed(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "data", tmp_path / "store" / "wasps"
    _tree(root, {"ant": 1})
    _png(elsewhere / "0.png", 50)
    _png(elsewhere / "1.png", 51)
    (root / "wasp").symlink_to(elsewhere, target_is_directory=True)
    data = image_folder(root)
    assert data.classes == ["ant", "wasp"]
    assert _relative(data) == [("ant/0.png", 0), ("wasp/0.png", 1), ("wasp/1.png", 1)]


@pytest.mark.parametrize(
    ("link", "target", "message"),
    [
        ("all", ".", r"class folder 'all' links to .*, which contains the root \(a cycle\); remove the link"),
        ("parent", "..", r"class folder 'parent' links to .*, which contains the root \(a cycle\)"),
        ("emmet", "ant", r"class folders 'ant' and 'emmet' lead to the same images through a symlink"),
        ("nested", "ant/sub", r"class folders 'ant' and 'nested' lead to the same images through a symlink"),
    ],
)
def test_a_class_folder_linking_to_the_root_or_another_class_is_refused(
    tmp_path: Path, link: str, target: str, message: str
) -> None:
    root = tmp_path / "data"
    _tree(root, {"ant": 1, "bee": 1})
    _png(root / "ant" / "sub" / "0.png", 60)
    (root / link).symlink_to((root / target).resolve(), target_is_directory=True)
    with pytest.raises(ValueError, match=message) as error:
        image_folder(root)
    assert "\n" not in str(error.value)


def _user_stream(root: Path, **options: object) -> dict[str, object]:
    """A ``dataset_stream`` of one task, ``root/leaves/<class>/`` (no official split: the stream splits it)."""
    return {
        "name": "dataset_stream",
        "root": str(root),
        "tasks": [{"dataset": "leaves", "year": 2012, "root": "leaves"}],
        **options,
    }


def test_a_symlink_loop_does_not_leak_images_into_both_train_and_test(tmp_path: Path) -> None:
    _tree(tmp_path / "leaves", {"oak": 10, "elm": 10})
    clean = build_stream(_user_stream(tmp_path))[0]
    (tmp_path / "leaves" / "oak" / "again").symlink_to(tmp_path / "leaves" / "oak", target_is_directory=True)
    task = build_stream(_user_stream(tmp_path))[0]
    assert (len(task.train), len(task.test)) == (len(clean.train), len(clean.test)) == (2 * 7, 2 * 2)  # 68 / 20 % of 10
    samples = task.train.dataset.samples  # type: ignore[attr-defined]
    train_files = {os.path.realpath(samples[i][0]) for i in task.train.indices}  # type: ignore[attr-defined]
    test_files = {os.path.realpath(samples[i][0]) for i in task.test.indices}  # type: ignore[attr-defined]
    assert not train_files & test_files


# ---- (c) 16-bit grey -----------------------------------------------------------------------------------------------
def test_16_bit_grey_pngs_are_scaled_to_8_bits_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 255, 256, 4095, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode == "I;16"  # what PIL makes of a 16-bit grey PNG
    rgb = np.asarray(_pil_loader(str(tmp_path / "deep.png")))
    assert rgb.shape == (1, 6, 3) and rgb.dtype == np.uint8
    expected = [0, 0, 1, 15, 128, 255]  # value >> 8
    assert rgb[0, :, 0].tolist() == expected and (rgb == rgb[..., :1]).all()
    with Image.open(tmp_path / "deep.png") as image:  # the engine's transform scales a 16-bit PIL image too
        assert (_to_float_rgb(image)[:, 0] * 255).round().int().tolist() == [expected] * 3


def test_big_endian_16_bit_and_32_bit_grey_images_are_scaled(tmp_path: Path) -> None:
    big_endian = Image.frombytes("I;16B", (3, 1), np.array([256, 32768, 65535], dtype=">u2").tobytes())
    assert np.asarray(_rgb(big_endian))[0, :, 0].tolist() == [1, 128, 255]
    sixteen_in_i = Image.fromarray(np.array([[0, 512, 65535]], dtype=np.int32))  # older PILs open 16-bit PNGs as I
    assert sixteen_in_i.mode == "I" and np.asarray(_rgb(sixteen_in_i))[0, :, 0].tolist() == [0, 2, 255]
    wide = Image.fromarray(np.array([[-5, 1 << 23, 2**31 - 1]], dtype=np.int32))  # beyond 16 bits: the int32 range
    assert np.asarray(_rgb(wide))[0, :, 0].tolist() == [0, 1, 255]
    grey = Image.fromarray(np.array([[7, 200]], dtype=np.uint8))  # 8-bit images are unchanged
    assert np.asarray(_rgb(grey))[0, :, 0].tolist() == [7, 200]


# ---- (d) huge images -----------------------------------------------------------------------------------------------
def _huge_png(path: Path, side: int = 20_000) -> Path:
    """A valid ``side x side`` 1-bit PNG of a few tens of KiB (all black), written without decoding it in memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row = zlib.compressobj(9), b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grey
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_a_huge_image_is_a_one_line_error_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    _tree(tmp_path, {"ant": 1})
    huge = _huge_png(tmp_path / "ant" / "huge.png")
    assert huge.stat().st_size < 200_000
    data = image_folder(tmp_path)
    assert data[0][0].size == (6, 6)
    with pytest.raises(ValueError) as error:
        data[1]
    message = str(error.value)
    assert "\n" not in message and repr(str(huge)) in message
    assert "400000000 pixels" in message and f"set {MAX_PIXELS_ENV}" in message
    assert error.value.__cause__ is None  # the CLI prints this line alone


def test_the_pixel_limit_is_set_by_an_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "wide.png"
    Image.fromarray(np.zeros((80, 100), dtype=np.uint8)).save(path)
    pil_limit = Image.MAX_IMAGE_PIXELS
    monkeypatch.setenv(MAX_PIXELS_ENV, "7999")
    with pytest.raises(ValueError) as error:
        _pil_loader(str(path))
    assert "\n" not in str(error.value) and repr(str(path)) in str(error.value)
    assert f"100x80 = 8,000 pixels, more than {MAX_PIXELS_ENV}=7999" in str(error.value)
    assert pil_limit == Image.MAX_IMAGE_PIXELS  # PIL's own limit is back after the file is read
    for allowed in ("8000", "0", "1_000_000"):
        monkeypatch.setenv(MAX_PIXELS_ENV, allowed)
        assert _pil_loader(str(path)).size == (100, 80)
        assert pil_limit == Image.MAX_IMAGE_PIXELS
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(
        ValueError, match=rf"^{MAX_PIXELS_ENV}='lots' must be a whole number of pixels \(0: no limit\)$"
    ):
        _pil_loader(str(path))


# ---- (e) duplicate files -------------------------------------------------------------------------------------------
def test_duplicates_in_a_root_the_stream_splits_are_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tree(tmp_path / "leaves", {"oak": 10, "elm": 10})
    with caplog.at_level(logging.WARNING):
        build_stream(_user_stream(tmp_path))
    assert not [r for r in caplog.records if "byte-identical" in r.getMessage()]
    leaves = tmp_path / "leaves"
    (leaves / "oak" / "0 copy.png").write_bytes((leaves / "oak" / "0.png").read_bytes())
    (leaves / "elm" / "oak0.png").write_bytes((leaves / "oak" / "0.png").read_bytes())  # and under another class
    (leaves / "elm" / "3 copy.png").write_bytes((leaves / "elm" / "3.png").read_bytes())
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        task = build_stream(_user_stream(tmp_path))[0]
    assert len(task.train.dataset) == 23  # type: ignore[attr-defined]  # reported, not dropped
    [record] = [r for r in caplog.records if "byte-identical" in r.getMessage()]
    message = record.getMessage()
    assert "\n" not in message and "3 file(s) are byte-identical copies" in message
    assert "'elm/3 copy.png' and 'elm/3.png'" in message and "delete the copies" in message
    monkeypatch.setenv("CIL_DUPLICATE_CHECK_MAX_FILES", "22")  # fewer than the 23 files: not read at all
    caplog.clear()
    with caplog.at_level(logging.INFO):
        build_stream(_user_stream(tmp_path))
    assert not [r for r in caplog.records if "byte-identical" in r.getMessage()]
    assert [r for r in caplog.records if "not checked for duplicates" in r.getMessage()]


def test_test_files_identical_to_training_files_are_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    insects = tmp_path / "insects"
    _tree(insects / "train", {"ant": 6, "bee": 6})
    for name in ("ant", "bee"):
        for i in range(3):
            _png(insects / "test" / name / f"{i}.png", 200 + 10 * (name == "bee") + i)
    (insects / "train" / "ant" / "5 copy.png").write_bytes((insects / "train" / "ant" / "5.png").read_bytes())
    spec = {
        "name": "dataset_stream",
        "root": str(tmp_path),
        "tasks": [{"dataset": "insects", "year": 1, "root": "insects"}],
    }
    with caplog.at_level(logging.WARNING):
        build_stream(spec)
    assert not [r for r in caplog.records if "byte-identical" in r.getMessage()]  # copies within train do not leak
    (insects / "test" / "bee" / "leak.png").write_bytes((insects / "train" / "bee" / "2.png").read_bytes())
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build_stream(spec)
    [record] = [r for r in caplog.records if "byte-identical" in r.getMessage()]
    message = record.getMessage()
    assert "1 file(s) in a later split (train / test)" in message
    assert "'train/bee/2.png' and 'test/bee/leak.png'" in message


def test_image_folder_split_reports_test_files_identical_to_training_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _tree(tmp_path / "train", {"ant": 2, "bee": 2})
    _png(tmp_path / "test" / "ant" / "0.png", 150)
    _png(tmp_path / "test" / "bee" / "0.png", 160)
    (tmp_path / "test" / "bee" / "1.png").write_bytes((tmp_path / "train" / "bee" / "1.png").read_bytes())
    spec = {"name": "image_folder_split", "train_root": str(tmp_path / "train"), "test_root": str(tmp_path / "test")}
    with caplog.at_level(logging.WARNING):
        stream = build_stream({**spec, "increment": 1})
    assert [len(t.test) for t in stream] == [1, 2]
    [record] = [r for r in caplog.records if "byte-identical" in r.getMessage()]
    assert "1 file(s)" in record.getMessage() and "'train/bee/1.png' and 'test/bee/1.png'" in record.getMessage()


def test_find_duplicates_compares_content_not_sizes(tmp_path: Path) -> None:
    head = os.urandom(1 << 16)
    files = {
        "a.bmp": head + b"tail-one", "b.bmp": head + b"tail-two",  # same size, same first 64 KiB, other bytes
        "c.bmp": head + b"tail-one",  # a copy of a.bmp past the head
        "d.pgm": b"P5 1 1 255 x", "e.pgm": b"P5 1 1 255 y", "f.pgm": b"P5 1 1 255 x",  # small: one read each
        "g.pgm": b"unique size",
    }  # fmt: skip
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    paths = [str(tmp_path / name) for name in files]
    assert find_duplicates([*paths, str(tmp_path / "missing.png")]) == [
        [paths[0], paths[2]],
        [paths[3], paths[5]],
    ]
    assert warn_duplicates({"train": paths[:2], "test": paths[2:5]}, tmp_path) == 1  # c.bmp; d/f are both in test
    assert warn_duplicates({"all": paths}, tmp_path) == 2
