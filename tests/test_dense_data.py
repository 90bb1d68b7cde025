"""mambaout.dense.data and transforms: COCO and ADE20K-style folders, bad input skipped and counted, v2 pipelines."""

import json

import numpy as np
import pytest
import torch
from dense_fixtures import make_ade, make_coco
from PIL import Image

from mambaout.dense.data import IGNORE_INDEX, AdeSegmentation, AnnotationError, CocoDetection, ade_split, coco_split
from mambaout.dense.examples import coins_instances, ihc_labels
from mambaout.dense.transforms import detection_transform, segmentation_transform
from mambaout.errors import UserError


def test_coco_samples_have_boxes_labels_and_masks_from_polygons_and_rle(tmp_path):
    root = make_coco(tmp_path / "coco")
    for split in ("train", "val"):  # polygons in train, RLE in val
        data = CocoDetection(*coco_split(root, split), train=split == "train")
        assert data.category_ids == [3, 7] and data.class_names == ["red", "green"] and not data.problems
        image, target = data[0]
        assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
        n = len(target["labels"])
        assert target["boxes"].shape == (n, 4) and target["masks"].shape == (n, 64, 64)
        assert set(target["labels"].tolist()) <= {1, 2}
        for box, mask in zip(target["boxes"], target["masks"], strict=True):  # the mask fills its box
            ys, xs = mask.nonzero(as_tuple=True)
            assert abs(xs.min() - box[0]) <= 1 and abs(xs.max() + 1 - box[2]) <= 1 and abs(ys.min() - box[1]) <= 1


def test_bad_annotations_are_skipped_counted_and_named(tmp_path):
    root = make_coco(tmp_path / "coco", train=4)
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    first = data["annotations"][0]
    bad = [
        {**first, "id": 901, "bbox": [5, 5, 0, 10]},  # zero area
        {**first, "id": 902, "bbox": [50, 50, 40, 40]},  # past the 64-pixel image
        {**first, "id": 903, "category_id": 99},  # unknown category
        {**first, "id": 904, "segmentation": [[1, 2, 3]]},  # no polygon
        {**first, "id": 905, "iscrowd": 1},  # a crowd region: not an instance, not a problem either
        {**first, "id": 906, "bbox": [-0.5, 0, 10, 10]},  # a rounding error at the border: clipped and kept
    ]
    data["annotations"] += bad
    data["images"].append({"id": 77, "file_name": "missing.png", "width": 64, "height": 64})
    path.write_text(json.dumps(data))
    coco = CocoDetection(*coco_split(root, "train"))
    assert dict(coco.problems.counts) == {
        "images whose file is missing": 1,
        "boxes of zero area": 1,
        "boxes out of their image": 1,
        "annotations of unknown category ids": 1,
        "segmentations that are no polygon or RLE": 1,
    }
    summary = coco.problems.summary()
    assert "annotation 901" in summary and "annotation 903: 99" in summary and "missing.png" in summary
    kept = [a["ann"]["id"] for anns in coco.targets for a in anns]
    assert 906 in kept and not {901, 902, 903, 904, 905} & set(kept)
    assert min(a["box"][0] for anns in coco.targets for a in anns) >= 0


def test_unreadable_images_are_replaced_in_training_and_marked_in_evaluation(tmp_path):
    root = make_coco(tmp_path / "coco", train=3, val=2)
    (root / "train2017" / "001.png").write_bytes(b"not a png")
    (root / "val2017" / "001.png").write_bytes(b"")
    train = CocoDetection(*coco_split(root, "train"))
    _, target = train[0]
    assert target["image_id"] == 2 and [p for p, _ in train.new_unreadable()] == [str(root / "train2017" / "001.png")]
    val = CocoDetection(*coco_split(root, "val"), train=False)
    _, target = val[0]
    assert target["valid"] is False and val.new_unreadable()[0][1] == "empty file"


def test_an_image_whose_size_differs_from_its_annotation_names_both(tmp_path):
    root = make_coco(tmp_path / "coco", train=2)
    Image.new("RGB", (50, 64)).save(root / "train2017" / "001.png")
    data = CocoDetection(*coco_split(root, "train"))
    with pytest.raises(AnnotationError, match=r"001\.png is 50×64 pixels but .*instances_train2017\.json gives"):
        data[0]


@pytest.mark.parametrize("text", ["{", '{"images": 3}', "[1, 2]"])
def test_a_broken_annotation_file_is_one_line(tmp_path, text):
    root = make_coco(tmp_path / "coco", train=2)
    (root / "annotations" / "instances_train2017.json").write_text(text)
    with pytest.raises(UserError, match=r"instances_train2017\.json"):
        CocoDetection(*coco_split(root, "train"))


def test_ade_labels_reduce_zero_and_bad_label_maps_name_both_files(tmp_path):
    root = make_ade(tmp_path / "ade", train=3)
    (root / "images" / "training" / "lonely.jpg").write_bytes((root / "images" / "training" / "000.jpg").read_bytes())
    data = AdeSegmentation(*ade_split(root, "train"), num_classes=3)
    assert len(data) == 3 and dict(data.problems.counts) == {"images without a label map": 1}
    image, target = data[0]
    raw = np.asarray(Image.open(root / "annotations" / "training" / "000.png"))
    expected = np.where(raw == 0, IGNORE_INDEX, raw.astype(np.int64) - 1)
    assert image.shape == (3, 32, 32) and torch.equal(target["mask"], torch.from_numpy(expected))
    Image.fromarray(np.ones((16, 32), np.uint8)).save(root / "annotations" / "training" / "001.png")
    with pytest.raises(AnnotationError, match=r"label map .*001\.png is 32×16 but its image .*001\.jpg is 32×32"):
        data[1]
    with pytest.raises(AnnotationError, match=r"holds label 2 .* but there are 2 classes"):
        AdeSegmentation(*ade_split(root, "train"), num_classes=2)[0]


def test_the_detection_pipeline_moves_boxes_and_masks_with_the_image(tmp_path):
    data = CocoDetection(*coco_split(make_coco(tmp_path / "coco"), "train"))
    image, target = data[0]
    torch.manual_seed(0)
    flipped, out = detection_transform(True, 128, 256, hflip=1.0)(image, target)
    assert flipped.shape == (3, 128, 128) and flipped.dtype == torch.float32 and flipped.max() <= 1
    for box, mask, new_box, new_mask in zip(target["boxes"], target["masks"], out["boxes"], out["masks"], strict=True):
        x1, y1, x2, y2 = box.tolist()
        torch.testing.assert_close(new_box, torch.tensor([128 - 2 * x2, 2 * y1, 128 - 2 * x1, 2 * y2]))
        assert new_mask.shape == (128, 128) and new_mask.sum() == 4 * mask.sum()


def test_the_segmentation_pipeline_crops_image_and_labels_together(tmp_path):
    data = AdeSegmentation(*ade_split(make_ade(tmp_path / "ade", size=48), "train"), num_classes=3)
    image, target = data[0]
    pipeline = segmentation_transform(True, (0.5,) * 3, (0.25,) * 3, scale=(24, 24), ratio_range=(1, 1),
                                      crop_size=32, hflip=0.0, photometric=False)  # fmt: skip
    out, crop = pipeline(image, target)
    assert out.shape == (3, 32, 32) and crop["mask"].shape == (32, 32)
    assert (crop["mask"][24:, :] == IGNORE_INDEX).all() and (crop["mask"][:, 24:] == IGNORE_INDEX).all()  # padding
    expected = torch.nn.functional.interpolate(target["mask"][None, None].float(), size=(24, 24), mode="nearest")
    assert torch.equal(crop["mask"][:24, :24], expected[0, 0].long())


def test_the_embedded_labels_are_derived_from_scikit_images_photos():
    photo, instances = coins_instances()
    assert photo.shape == instances.shape == (303, 384) and instances.max() == 24  # every coin, one each
    sizes = np.bincount(instances.ravel())[1:]
    assert sizes.min() > 800 and sizes.max() < 4000
    photo, labels = ihc_labels()
    shares = np.bincount(labels.ravel(), minlength=5) / labels.size
    assert photo.shape == (512, 512, 3) and all(shares[1:] > 0.01) and shares[0] < 0.35
