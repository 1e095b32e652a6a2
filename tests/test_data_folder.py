"""cnnjax.data.folder: a folder of image files as a dataset (tiny images written by PIL)."""

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps, JpegImagePlugin

from cnnjax.data import folder
from cnnjax.data.source import gather
from cnnjax.errors import ConfigError, UnknownNameError


def write(path: Path, array: np.ndarray, **save_args) -> Path:
    """Saves uint8/uint16 ``array`` (H, W) or (H, W, C) as the image file ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save_args)
    return path


def make_classes(root: Path, counts: dict, size=(8, 8), ext=".png", start=0) -> dict:
    """``counts[c]`` PNGs per class folder ``c``, each filled with a distinct value; returns
    relative path -> the value its pixels hold."""
    values = {}
    for c, n in counts.items():
        for i in range(n):
            value = (start + 7 * len(values) + 1) % 256
            write(root / c / f"{i:03d}{ext}", np.full((*size, 3), value, np.uint8))
            values[(root / c / f"{i:03d}{ext}").relative_to(root).as_posix()] = value
    return values


def open_(path, **kw):
    kw.setdefault("cache_dir", Path(path).parent / "cache")
    return folder.open_folder(path, **kw)


def test_flat_layout_classes_labels_name_and_pixels(tmp_path):
    root = tmp_path / "data"
    values = make_classes(root, {"zebra": 3, "ant": 2, "Moth": 4})
    src = open_(root, validation_fraction=0, test_fraction=0)
    assert src.name == f"folder:{root}" and os.path.isabs(src.name.removeprefix("folder:"))
    assert src.class_names == ("Moth", "ant", "zebra")  # sorted, as Keras and torchvision
    assert src.split_sizes() == {"train": 9} and src.image_shape == (8, 8, 3)
    with pytest.raises(UnknownNameError, match="'test'.*train"):
        src.split("test")
    split = src.split("train")
    for i in range(len(split)):
        example = split[i]
        assert src.class_names[example["label"]] == split.files[i].split("/")[0]
        assert (example["image"] == values[split.files[i]]).all()
        assert example["image"].dtype == np.uint8 and example["image"].shape == (8, 8, 3)


def test_nested_split_folders_are_used_as_they_are(tmp_path):
    classes = {"a": 5, "b": 6}
    for split, scale in (("train", 1), ("val", 2), ("test", 3)):
        make_classes(tmp_path / "d" / split, {c: n * scale for c, n in classes.items()})
    src = open_(tmp_path / "d", validation_fraction=0.5, test_fraction=0.2)
    assert src.split_sizes() == {"train": 11, "validation": 22, "test": 33}
    assert all(f.startswith("val/") for f in src.split("validation").files)
    assert src.class_names == ("a", "b")


def test_missing_split_folders_are_carved_from_train_only(tmp_path):
    make_classes(tmp_path / "d" / "train", {"a": 10, "b": 10})
    make_classes(tmp_path / "d" / "test", {"a": 3, "b": 3})
    src = open_(tmp_path / "d", validation_fraction=0.2, test_fraction=0.5)
    assert src.split_sizes() == {"train": 16, "validation": 4, "test": 6}
    assert all(f.startswith("train/") for f in src.split("validation").files)
    assert all(f.startswith("test/") for f in src.split("test").files)


def test_carving_does_not_depend_on_creation_order_or_mtime(tmp_path):
    names = [f"{c}/{i:02d}.png" for c in ("cat", "dog", "eel") for i in range(12)]
    splits = []
    for order, root in ((names, tmp_path / "a"), (names[::-1], tmp_path / "b")):
        for n in random.Random(len(splits)).sample(order, len(order)):
            write(root / n, np.zeros((8, 8), np.uint8))
        src = open_(root, validation_fraction=0.25, test_fraction=0.25, seed=3)
        splits.append({s: src.split(s).files for s in src.split_sizes()})
    assert splits[0] == splits[1]
    assert sorted(sum(splits[0].values(), ())) == sorted(names)  # a partition of the files


def test_carve_is_a_pure_stratified_function_of_paths_and_seed():
    by_class = [
        [f"a/{i}" for i in range(10)],
        [f"b/{i}" for i in range(20)],
        [f"c/{i}" for i in range(30)],
    ]
    shuffled = [random.Random(1).sample(files, len(files)) for files in by_class]
    fractions = {"test": 0.2, "validation": 0.1}
    carved = folder.carve(by_class, fractions, seed=0)
    assert carved == folder.carve(shuffled, fractions, seed=0)
    assert carved != folder.carve(by_class, fractions, seed=1)
    assert [len(c) for c in carved["test"]] == [2, 4, 6]  # each class its share
    assert [len(c) for c in carved["validation"]] == [1, 2, 3]
    assert [len(c) for c in carved["train"]] == [7, 14, 21]
    # The test set does not move when only the validation fraction changes.
    assert folder.carve(by_class, {"test": 0.2, "validation": 0.3}, 0)["test"] == carved["test"]


def test_allocate_rounds_by_largest_remainder_and_keeps_one_train_example():
    assert folder.allocate([1.5, 1.5, 1.5], [9, 9, 9]) == [2, 2, 1]  # 4.5 -> 5, ties by order
    assert folder.allocate([0.4, 1.7, 0.9], [9, 9, 9]) == [0, 2, 1]
    assert folder.allocate([0.5, 4.5], [0, 9]) == [0, 5]  # a 1-file class stays in train


def test_a_fraction_too_small_for_one_file_makes_no_split(tmp_path):
    make_classes(tmp_path / "d", {"a": 2, "b": 2})
    assert open_(tmp_path / "d", validation_fraction=0.1, test_fraction=0.25).split_sizes() == {
        "train": 3,
        "test": 1,
    }


def test_mixed_sizes_are_resized_and_same_sizes_kept(tmp_path):
    root = tmp_path / "d"
    write(root / "a" / "0.png", np.full((8, 8, 3), 40, np.uint8))
    write(root / "a" / "1.png", np.full((12, 20, 3), 90, np.uint8))
    write(root / "b" / "0.png", np.full((20, 16, 3), 200, np.uint8))
    src = open_(root, image_size=10, validation_fraction=0, test_fraction=0)
    images = src.arrays("train")["image"]
    assert images.shape == (3, 10, 10, 3)
    # A constant image stays that constant under any normalised filter.
    assert [int(v) for v in np.unique(images)] == [40, 90, 200]
    with pytest.raises(ConfigError, match="image_size") as e:
        open_(root)
    assert str(root / "a" / "0.png") in str(e.value) and str(root / "a" / "1.png") in str(e.value)

    other = tmp_path / "e"
    write(other / "a" / "0.png", np.zeros((20, 12), np.uint8))
    write(other / "b" / "0.png", np.zeros((20, 12), np.uint8))
    assert open_(other).image_shape == (20, 12, 1)  # (H, W, C), not square


def test_png_pixels_are_exact_and_jpeg_is_pil_own_decode(tmp_path):
    rng = np.random.default_rng(0)
    png = rng.integers(0, 256, (11, 13, 3), np.uint8)
    jpeg = rng.integers(0, 256, (11, 13, 3), np.uint8)
    write(tmp_path / "d" / "a" / "x.PNG", png)
    write(tmp_path / "d" / "b" / "y.JPeG", jpeg, quality=90)
    src = open_(tmp_path / "d", image_size=None, validation_fraction=0, test_fraction=0)
    split = src.split("train")
    np.testing.assert_array_equal(split[0]["image"], png)
    expected = np.asarray(Image.open(tmp_path / "d" / "b" / "y.JPeG").convert("RGB"))
    np.testing.assert_array_equal(split[1]["image"], expected)


def test_channels_follow_the_majority_unless_chosen(tmp_path):
    root = tmp_path / "d"
    rgb = np.random.default_rng(1).integers(0, 256, (8, 8, 3), np.uint8)
    write(root / "a" / "0.png", rgb)
    write(root / "a" / "1.png", np.full((8, 8), 10, np.uint8))
    write(root / "b" / "0.png", np.full((8, 8), 20, np.uint8))
    grey = open_(root, validation_fraction=0, test_fraction=0)
    assert grey.image_shape == (8, 8, 1)
    expected = np.asarray(Image.fromarray(rgb).convert("L"))[..., None]  # PIL's luma (ITU-R 601)
    np.testing.assert_array_equal(grey.split("train")[0]["image"], expected)
    colour = open_(root, channels=3, validation_fraction=0, test_fraction=0)
    assert colour.image_shape == (8, 8, 3)
    assert (colour.split("train")[1]["image"] == 10).all()  # grey repeated in R, G and B


def test_majority_channels_counts_grey_modes():
    assert folder.majority_channels(["L", "I;16", "LA", "RGB"]) == 1
    assert folder.majority_channels(["L", "RGB"]) == 3  # a tie keeps the colour
    assert folder.majority_channels(["L", "P", "CMYK"]) == 3  # palette and CMYK count as colour


def test_modes_convert_as_prediction_does(tmp_path):
    """16-bit grey scaled by 1/257, alpha dropped (not composited), palette, CMYK and EXIF
    orientation: the pixels training sees are the ones ``prediction.load_image`` gives."""
    from cnnjax.tools.predict import load_image

    rng = np.random.default_rng(2)
    root = tmp_path / "d"
    grey16 = np.array([[0, 257 * 100, 65535, 256]], np.uint16).repeat(4, 0)
    files = {"a/grey16.png": write(root / "a" / "grey16.png", grey16)}
    rgba = rng.integers(0, 256, (4, 4, 4), np.uint8)
    rgba[0, 0, 3] = 0  # transparent: its colour is kept
    files["a/rgba.png"] = write(root / "a" / "rgba.png", rgba)
    palette = Image.fromarray(rng.integers(0, 256, (4, 4, 3), np.uint8)).convert("P")
    palette.save(root / "a" / "palette.gif")
    cmyk = Image.fromarray(rng.integers(0, 256, (4, 4, 4), np.uint8), "CMYK")
    (root / "b").mkdir()
    cmyk.save(root / "b" / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    tall = Image.fromarray(rng.integers(0, 256, (4, 6, 3), np.uint8))
    tall.save(root / "b" / "rotated.jpg", exif=exif.tobytes())
    modes = {f.name: folder.read_header(f).mode for f in sorted(root.rglob("*.*"))}
    assert modes == {
        "grey16.png": "I;16",
        "rgba.png": "RGBA",
        "palette.gif": "P",
        "cmyk.jpg": "CMYK",
        "rotated.jpg": "RGB",
    }
    for channels in (1, 3):
        src = open_(root, image_size=4, channels=channels, validation_fraction=0, test_fraction=0)
        split = src.split("train")
        for i, file in enumerate(split.files):
            expected = load_image(root / file, src.image_shape)
            np.testing.assert_array_equal(split[i]["image"], expected, err_msg=file)
    src = open_(root, image_size=4, channels=3, validation_fraction=0, test_fraction=0)
    split = src.split("train")
    by_name = {Path(f).name: split[i]["image"] for i, f in enumerate(split.files)}
    np.testing.assert_array_equal(by_name["grey16.png"][0, :, 0], [0, 100, 255, 0])
    np.testing.assert_array_equal(by_name["rgba.png"], rgba[..., :3])
    rotated = ImageOps.exif_transpose(Image.open(root / "b" / "rotated.jpg")).convert("RGB")
    assert rotated.size == (4, 6)  # (W, H): the EXIF turn swapped them
    np.testing.assert_array_equal(
        by_name["rotated.jpg"], np.asarray(rotated.resize((4, 4), Image.BILINEAR))
    )


def test_large_jpeg_decoded_at_a_reduced_scale_is_the_downsampled_image(tmp_path, monkeypatch):
    """A 512 px JPEG asked for at 16 px is decoded by libjpeg at 1/8 scale (``draft``). On a
    linear ramp every normalised, symmetric downsampling filter gives the ramp's value at the
    pixel centre, so the result may differ from the ideal only by the JPEG's own coding error
    plus one unit of rounding in each of the two resampling stages."""
    x = (np.arange(512) + 0.5) / 512 * 200 + 20  # 20 .. 220
    ramp = np.broadcast_to(x[None, :, None], (512, 512, 3))
    write(tmp_path / "d" / "a" / "ramp.jpg", ramp.round().astype(np.uint8), quality=95)
    write(tmp_path / "d" / "b" / "small.png", np.zeros((16, 16, 3), np.uint8))
    coding_error = np.abs(
        np.asarray(Image.open(tmp_path / "d" / "a" / "ramp.jpg"), float) - ramp
    ).max()
    src = open_(tmp_path / "d", image_size=16, validation_fraction=0, test_fraction=0)
    drafted = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def recording_draft(self, mode, size):
        result = draft(self, mode, size)
        drafted.append(self.size)  # what libjpeg is asked to produce
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)
    image = src.split("train")[0]["image"].astype(float)
    assert drafted == [(64, 64)]  # 1/8 of 512: the smallest scale not below 16
    centres = ((np.arange(16) + 0.5) * 32) / 512 * 200 + 20
    ideal = np.broadcast_to(centres[None, :, None], (16, 16, 3))
    # Inner columns only: at the borders PIL's filter is cut to one side and the mean of a
    # ramp moves off the pixel centre.
    assert np.abs(image - ideal)[:, 1:-1].max() <= coding_error + 2


def test_arrays_equal_the_examples_and_come_from_the_cache_the_second_time(tmp_path, monkeypatch):
    root = tmp_path / "d"
    make_classes(root, {"a": 4, "b": 5}, size=(9, 7))
    src = open_(root, image_size=6, validation_fraction=0.3, test_fraction=0)
    for name in ("train", "validation"):
        arrays = src.arrays(name)
        expected = gather(src.split(name), range(src.split_sizes()[name]))
        np.testing.assert_array_equal(arrays["image"], expected["image"])
        np.testing.assert_array_equal(arrays["label"], expected["label"])
        assert arrays["label"].dtype == np.int32 and arrays["image"].dtype == np.uint8
    cached = sorted((tmp_path / "cache").iterdir())
    assert len(cached) == 2 and not list((tmp_path / "cache").glob("*.tmp"))

    def no_decoding(*args):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(folder, "decode", no_decoding)
    again = open_(root, image_size=6, validation_fraction=0.3, test_fraction=0)
    np.testing.assert_array_equal(again.arrays("train")["image"], src.arrays("train")["image"])


@pytest.mark.parametrize("damage", ["truncate", "flip_a_pixel", "garbage", "other_labels"])
def test_a_damaged_cache_is_ignored_and_rewritten(tmp_path, damage):
    root = tmp_path / "d"
    make_classes(root, {"a": 3, "b": 3})
    src = open_(root, validation_fraction=0, test_fraction=0)
    expected = src.arrays("train")["image"].copy()
    (path,) = (tmp_path / "cache").iterdir()
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip_a_pixel":
        at = bytes(data).index(expected.tobytes())  # stored uncompressed
        data[at + 5] ^= 0xFF
    elif damage == "garbage":
        data = b"not a cache"
    else:
        np.savez(path, image=expected[::-1], label=np.arange(6, dtype=np.int32))
        data = path.read_bytes()
    path.write_bytes(bytes(data))
    np.testing.assert_array_equal(src.arrays("train")["image"], expected)
    assert folder.read_cache(path, src.split("train")) is not None  # rewritten whole


def test_a_changed_file_is_decoded_again(tmp_path):
    root = tmp_path / "d"
    make_classes(root, {"a": 2, "b": 2})
    before = open_(root, validation_fraction=0, test_fraction=0)
    assert (before.arrays("train")["image"][0] == 1).all()
    write(root / "a" / "000.png", np.full((8, 8, 3), 77, np.uint8))
    os.utime(root / "a" / "000.png", ns=(1, 1))  # a new mtime even on coarse file systems
    after = open_(root, validation_fraction=0, test_fraction=0)
    assert after.split("train").fingerprint != before.split("train").fingerprint
    assert (after.arrays("train")["image"][0] == 77).all()


def test_an_unwritable_cache_dir_only_warns(tmp_path):
    make_classes(tmp_path / "d", {"a": 2, "b": 2})
    (tmp_path / "file").write_text("")
    src = open_(tmp_path / "d", cache_dir=tmp_path / "file" / "cache", test_fraction=0)
    with pytest.warns(UserWarning, match="not caching"):
        assert src.arrays("train")["image"].shape == (4, 8, 8, 3)


def test_split_pickles_small_and_without_pixels(tmp_path):
    make_classes(tmp_path / "d", {"a": 20, "b": 20}, size=(16, 16))
    split = open_(tmp_path / "d", test_fraction=0).split("train")
    before = pickle.dumps(split)
    open_(tmp_path / "d", test_fraction=0).arrays("train")
    split[0]
    assert pickle.dumps(split) == before  # decoding keeps nothing in the split
    assert len(before) < 40 * len(split) + 500  # paths and labels only
    np.testing.assert_array_equal(pickle.loads(before)[3]["image"], split[3]["image"])


def test_ignored_files_and_folders(tmp_path):
    root = tmp_path / "d"
    make_classes(root, {"a": 2, "b": 2})
    (root / "README.md").write_text("about the data")
    (root / "a" / ".DS_Store").write_bytes(b"\0\1")
    (root / "a" / "Thumbs.db").write_bytes(b"\0\1")
    (root / "b" / "._000.png").write_bytes(b"\0\1")  # macOS resource fork
    make_classes(root / ".ipynb_checkpoints", {"c": 1})
    make_classes(root / "__MACOSX", {"c": 1})
    write(root / "b" / "more" / "deep.png", np.zeros((8, 8, 3), np.uint8))  # still class b
    src = open_(root, validation_fraction=0, test_fraction=0)
    assert src.class_names == ("a", "b") and src.split_sizes() == {"train": 5}
    assert "b/more/deep.png" in src.split("train").files


def _layout_missing(tmp_path):
    return tmp_path / "nowhere", (tmp_path / "nowhere", "does not exist")


def _layout_file(tmp_path):
    (tmp_path / "f.png").write_bytes(b"")
    return tmp_path / "f.png", (tmp_path / "f.png", "not a folder")


def _layout_empty(tmp_path):
    (tmp_path / "d").mkdir()
    return tmp_path / "d", (tmp_path / "d", "no class folders")


def _layout_images_without_classes(tmp_path):
    write(tmp_path / "d" / "x.png", np.zeros((8, 8), np.uint8))
    return tmp_path / "d", (tmp_path / "d", "no class folders", "x.png")


def _layout_class_without_images(tmp_path):
    make_classes(tmp_path / "d", {"a": 2, "b": 2})
    (tmp_path / "d" / "c").mkdir()
    (tmp_path / "d" / "c" / ".hidden.png").write_bytes(b"")
    return tmp_path / "d", (tmp_path / "d" / "c", "without images")


def _layout_one_class(tmp_path):
    make_classes(tmp_path / "d", {"only": 3})
    return tmp_path / "d", (tmp_path / "d", "one class folder (only)")


def _layout_not_an_image_name(tmp_path):
    make_classes(tmp_path / "d", {"a": 2, "b": 2})
    (tmp_path / "d" / "b" / "labels.csv").write_text("x,y\n")
    return tmp_path / "d", (tmp_path / "d" / "b" / "labels.csv", "not an image file")


def _layout_not_an_image(tmp_path):
    make_classes(tmp_path / "d", {"a": 2, "b": 2})
    (tmp_path / "d" / "a" / "fake.jpg").write_text("<html>")
    return tmp_path / "d", (tmp_path / "d" / "a" / "fake.jpg", "not an image PIL can read")


def _layout_classes_differ(tmp_path):
    make_classes(tmp_path / "d" / "train", {"a": 2, "b": 2})
    make_classes(tmp_path / "d" / "test", {"a": 2, "c": 2})
    return tmp_path / "d", (tmp_path / "d" / "test", "missing in test: b; only in test: c")


def _layout_stray_folder(tmp_path):
    make_classes(tmp_path / "d" / "train", {"a": 2, "b": 2})
    make_classes(tmp_path / "d" / "extra", {"a": 2, "b": 2})
    return tmp_path / "d", (tmp_path / "d", "'extra'")


def _layout_val_and_validation(tmp_path):
    for split in ("train", "val", "validation"):
        make_classes(tmp_path / "d" / split, {"a": 2, "b": 2})
    return tmp_path / "d", (tmp_path / "d", "both a validation and a val folder")


def _layout_no_train(tmp_path):
    for split in ("validation", "test"):
        make_classes(tmp_path / "d" / split, {"a": 2, "b": 2})
    return tmp_path / "d", (tmp_path / "d", "no train folder")


@pytest.mark.parametrize(
    "layout",
    [
        _layout_missing,
        _layout_file,
        _layout_empty,
        _layout_images_without_classes,
        _layout_class_without_images,
        _layout_one_class,
        _layout_not_an_image_name,
        _layout_not_an_image,
        _layout_classes_differ,
        _layout_stray_folder,
        _layout_val_and_validation,
        _layout_no_train,
    ],
)
def test_bad_folders_are_one_line_naming_the_path(tmp_path, layout):
    path, (named, *reason) = layout(tmp_path)
    with pytest.raises(ConfigError) as e:
        folder.open_folder(path, cache_dir=tmp_path / "cache")
    message = str(e.value)
    assert "\n" not in message and all(str(s) in message for s in (named, *reason)), message
    assert not (tmp_path / "cache").exists()  # refused before anything is written


@pytest.mark.parametrize(
    "kw",
    [
        {"image_size": -1},
        {"channels": 2},
        {"validation_fraction": 1.0},
        {"validation_fraction": 0.6, "test_fraction": 0.4},
    ],
)
def test_bad_arguments_are_one_line(tmp_path, kw):
    make_classes(tmp_path / "d", {"a": 2, "b": 2})
    with pytest.raises(ConfigError) as e:
        open_(tmp_path / "d", **kw)
    assert "\n" not in str(e.value) and next(iter(kw)) in str(e.value)


def test_pixels_that_do_not_decode_are_one_line_naming_the_file(tmp_path):
    make_classes(tmp_path / "d", {"a": 2, "b": 2})
    bad = tmp_path / "d" / "b" / "001.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) - 30])  # the header intact, the pixel data cut short
    src = open_(tmp_path / "d", validation_fraction=0, test_fraction=0)  # headers pass
    split = src.split("train")
    for call in (lambda: split[split.files.index("b/001.png")], lambda: src.arrays("train")):
        with pytest.raises(ConfigError) as e:
            call()
        assert "\n" not in str(e.value) and str(bad) in str(e.value), str(e.value)
    assert not (tmp_path / "cache").exists()  # nothing cached
