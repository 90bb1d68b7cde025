"""mambaout.data: every image mode converted, bad files skipped and reported once, the digits tree, samplers."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from train_fixtures import make_tree, write_image

from mambaout.data import (
    ImageFiles,
    ResumableSampler,
    RobustImageFolder,
    ShardSampler,
    UnreadableImage,
    digits_tree,
    list_images,
    load_image,
)
from mambaout.errors import UserError

# --- single images -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 100, (100, 100, 100)),
        ("1", 1, (255, 255, 255)),
        ("RGB", (10, 20, 30), (10, 20, 30)),
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
        ("RGBA", (10, 20, 30, 0), (255, 255, 255)),  # transparent: white, as a viewer shows it
        ("LA", (50, 255), (50, 50, 50)),
    ],
)
def test_modes_become_rgb(tmp_path, mode, value, expected):
    path = tmp_path / "x.png"
    Image.new(mode, (4, 4), value).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == expected


def test_palette_cmyk_and_16bit_are_converted(tmp_path):
    palette = Image.new("RGB", (4, 4), (200, 10, 10)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").getpixel((0, 0)) == (200, 10, 10)
    palette.save(tmp_path / "pt.png", transparency=palette.getpixel((0, 0)))  # that palette entry transparent
    assert load_image(tmp_path / "pt.png").getpixel((0, 0)) == (255, 255, 255)

    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # pure red in CMYK
    r, g, b = load_image(tmp_path / "c.jpg").getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60

    # 16-bit scans are rescaled, not clipped to white
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(tmp_path / "d.png")
    assert [load_image(tmp_path / "d.png").getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_misnamed_extension_is_read_by_content(tmp_path):
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "really_png.jpg", format="PNG")
    assert load_image(tmp_path / "really_png.jpg").getpixel((0, 0)) == (1, 2, 3)


def _bad_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image at all")
    write_image(folder / "full.jpg", 0, size=64)
    (folder / "truncated.jpg").write_bytes((folder / "full.jpg").read_bytes()[:300])
    (folder / "full.jpg").unlink()
    return {"empty.jpg": "empty file", "text.png": "not an image", "truncated.jpg": "corrupt or truncated"}


def test_unreadable_files_raise_with_a_reason(tmp_path):
    for name, reason in _bad_files(tmp_path).items():
        with pytest.raises(UnreadableImage) as info:
            load_image(tmp_path / name)
        assert info.value.reason.startswith(reason)


def test_decompression_bomb_is_unreadable(tmp_path, monkeypatch):
    Image.new("L", (64, 64)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels is 4x the limit: an error, not a warning
    with pytest.raises(UnreadableImage, match="too large"):
        load_image(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # between 1x and 2x: PIL only warns; still refused
    with pytest.raises(UnreadableImage, match="too large"):
        load_image(tmp_path / "huge.png")


# --- datasets ------------------------------------------------------------------------------------------------------


@pytest.fixture
def tree_with_bad_files(tmp_path):
    root = make_tree(tmp_path / "data", train=6, val=2)
    _bad_files(root / "train" / "a")
    (root / "train" / "b" / "notes.txt").write_text("ignored: not an image extension")
    return root


def test_training_set_substitutes_and_reports_each_bad_file_once(tree_with_bad_files):
    dataset = RobustImageFolder(tree_with_bad_files / "train")
    assert len(dataset) == 15 and dataset.classes == ["a", "b"]
    assert [p.rsplit("/", 1)[1] for p in dataset.ignored_files] == ["notes.txt"]
    for _ in range(2):  # two epochs
        labels = [dataset[i][1] for i in range(len(dataset))]
        assert all(label in (0, 1) for label in labels)
        found = dataset.new_unreadable()
        if _ == 0:
            assert sorted(p.rsplit("/", 1)[1] for p, _r in found) == ["empty.jpg", "text.png", "truncated.jpg"]
        else:
            assert found == []  # reported once, not once per epoch


def test_eval_set_marks_bad_files_minus_one(tree_with_bad_files):
    dataset = RobustImageFolder(tree_with_bad_files / "train", substitute=False)
    labels = [dataset[i][1] for i in range(len(dataset))]
    assert labels.count(-1) == 3 and labels.count(0) == 6 and labels.count(1) == 6


def test_loader_workers_share_what_they_found(tree_with_bad_files):
    from mambaout.data import eval_transform

    transform = eval_transform({"input_size": (3, 16, 16), "interpolation": "bilinear", "crop_pct": 1.0,
                                "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_mode": "center"})  # fmt: skip
    dataset = RobustImageFolder(tree_with_bad_files / "train", transform, substitute=False)
    labels = torch.cat([t for _, t in DataLoader(dataset, batch_size=4, num_workers=2)])
    assert (labels == -1).sum() == 3
    assert len(dataset.new_unreadable()) == 3  # found in the workers, reported by the main process


def test_dataset_errors_are_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        RobustImageFolder(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "x.png", 0)
    with pytest.raises(UserError, match="no class folders"):
        RobustImageFolder(tmp_path / "flat")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no image files"):
        RobustImageFolder(tmp_path / "empty")
    _bad_files(tmp_path / "bad" / "a")
    with pytest.raises(UserError, match=r"no readable image.*all 3 files"):
        RobustImageFolder(tmp_path / "bad")


def test_validation_classes_must_be_training_classes(tmp_path):
    root = make_tree(tmp_path, classes=("a", "b", "c"), train=1, val=1)
    train = RobustImageFolder(root / "train")
    write_image(root / "val" / "z" / "0.png", 0)
    with pytest.raises(UserError, match="classes the training set lacks: z"):
        RobustImageFolder(root / "val", classes=train.classes)
    for path in (root / "val" / "z").iterdir():
        path.unlink()
    (root / "val" / "z").rmdir()
    for path in (root / "val" / "c").iterdir():
        path.unlink()
    val = RobustImageFolder(root / "val", classes=train.classes)
    assert val.empty_classes == ["c"] and [t for _, t in val.samples] == [0, 1]


def test_image_files_and_listing(tmp_path):
    paths = [write_image(tmp_path / "d" / f"{i}.png", i) for i in range(3)]
    (tmp_path / "d" / "sub").mkdir()
    nested = write_image(tmp_path / "d" / "sub" / "n.jpg", 0)
    (tmp_path / "d" / "readme.md").write_text("x")
    assert list_images([tmp_path / "d"]) == (sorted([*paths, nested]), [])
    with pytest.raises(FileNotFoundError):
        list_images([tmp_path / "nope.png"])
    files = ImageFiles([(str(p), i) for i, p in enumerate(paths)], substitute=False)
    assert [files[i][1] for i in range(3)] == [0, 1, 2]


# --- the digits default --------------------------------------------------------------------------------------------


def test_digits_tree_is_a_fixed_stratified_split(tmp_path):
    root = digits_tree(tmp_path)
    train, val = RobustImageFolder(root / "train"), RobustImageFolder(root / "val")
    assert (len(train), len(val)) == (1437, 360) and train.classes == [str(d) for d in range(10)]
    per_class = np.bincount([t for _, t in val.samples], minlength=10)
    assert per_class.min() >= 35 and per_class.max() <= 37  # 20% of each digit's ~180 scans
    assert not {p.rsplit("/", 1)[1] for p, _ in train.samples} & {p.rsplit("/", 1)[1] for p, _ in val.samples}
    image = load_image(val.samples[0][0])
    assert image.size == (8, 8) and image.mode == "RGB"
    stamp = (root / "COMPLETE").stat().st_mtime_ns
    assert digits_tree(tmp_path) == root and (root / "COMPLETE").stat().st_mtime_ns == stamp  # written once
    # the split is pinned: sklearn's bundled data, stratified, random_state 0
    assert sorted(p.name for p in (root / "val" / "0").iterdir())[:3] == ["0078.png", "0202.png", "0252.png"]


# --- samplers ------------------------------------------------------------------------------------------------------


def test_resumable_sampler_skips_exactly_what_was_seen():
    data = list(range(50))
    full = ResumableSampler(data, seed=3)
    full.set_epoch(2)
    order = list(full)
    resumed = ResumableSampler(data, seed=3)
    resumed.set_epoch(2, start=20)
    assert list(resumed) == order[20:] and len(resumed) == 30
    shards = [ResumableSampler(data, 2, r, seed=3) for r in range(2)]
    for shard in shards:
        shard.set_epoch(2)
    assert sorted(list(shards[0]) + list(shards[1])) == sorted(order)


def test_shard_sampler_covers_every_sample_once():
    shards = [list(ShardSampler(range(11), 3, r)) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(11))


# --- symbolic links, orientation, permissions (hostile trees) -----------------------------------------------------


def test_symlink_loops_and_links_into_other_classes_are_skipped(tmp_path):
    tree = make_tree(tmp_path / "data", classes=("cat", "dog"), train=3, val=1)
    store = tmp_path / "store"  # a central image store outside the dataset, as split-by-links trees use
    outside = [write_image(store / "s0.png", 0, seed=50)]
    write_image(store / "s1.png", 0, seed=51)
    cat = tree / "train" / "cat"
    (cat / "loop").symlink_to("..")  # train/: would bring dog's images in as cats, and loop
    (cat / "self").symlink_to(".")
    (cat / "dogs").symlink_to("../dog")
    (cat / "a_dog.png").symlink_to(tree / "train" / "dog" / "000.png")
    (cat / "again.png").symlink_to(cat / "000.png")  # the same real file twice
    (cat / "broken.png").symlink_to(tmp_path / "nowhere.png")
    (cat / "store").symlink_to(store)
    (cat / "store_file.png").symlink_to(outside[0])
    dataset = RobustImageFolder(tree / "train")
    cats = sorted(path for path, label in dataset.samples if label == 0)
    assert len(dataset) == 3 + 2 + 3  # 3 cats, the store's 2 files once each, 3 dogs
    real = {os.path.realpath(p) for p in cats}
    assert real == {os.path.realpath(p) for p in [*(cat / f"00{i}.png" for i in range(3)), *outside, store / "s1.png"]}
    assert all("/dog/" not in p for p in cats)
    reasons = dict((path.rsplit("/", 1)[1], why) for path, why in dataset.skipped_links)
    assert "loop" in reasons["loop"] and "loop" in reasons["self"]
    assert "another part of the dataset" in reasons["dogs"] and "another part of the dataset" in reasons["a_dog.png"]
    assert reasons["broken.png"] == "broken link"
    assert "already listed" in reasons["again.png"] or "already listed" in reasons["000.png"]
    assert "store_file.png" in reasons or "s0.png" in reasons  # one of the two paths to s0.png is listed


def test_listing_a_folder_with_a_loop_terminates(tmp_path):
    image = write_image(tmp_path / "d" / "x.png", 0)
    (tmp_path / "d" / "up").symlink_to(tmp_path)
    files, skipped = list_images([tmp_path / "d"])
    assert files == [image] and [why for _, why in skipped] == ["points to the folder itself or one above it (a loop)"]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "phone.jpg", exif=exif)
    assert load_image(tmp_path / "phone.jpg").size == (20, 40)


def test_an_unopenable_file_is_reported_as_such(tmp_path, monkeypatch):
    path = write_image(tmp_path / "locked.png", 0)

    def denied(*args, **kwargs):  # as open() fails for a user without read permission (tests may run as root)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("mambaout.data.images.open", denied, raising=False)
    with pytest.raises(UnreadableImage) as e:
        load_image(path)
    assert e.value.reason == "cannot open it: Permission denied"
