"""Run settings of detection and segmentation: the engine's (`RunConfig`) with the paper's recipes as defaults.

`DetectConfig` defaults to Mask R-CNN 1× on MambaOut-Tiny (COCO: 12 epochs, AdamW lr 1e-4 at a global batch of 16,
weight decay 0.05, 500 warm-up steps, lr ×0.1 at epochs 8 and 11, images 800 short side / 1333 at most);
`SegmentConfig` to UperNet on MambaOut-Tiny (ADE20K: 160k steps, AdamW lr 1e-4 at 16, weight decay 0.01, 1500
warm-up steps, poly decay of power 1, 512×512 crops of images rescaled from 2048×512 by 0.5-2.0). The recipes in
`mambaout/configs/detect/` and `mambaout/configs/segment/` spell them out per variant, with the embedded defaults'
CPU settings beside them.
"""

from dataclasses import dataclass

from mambaout.dense.detector import DETECTORS
from mambaout.dense.segmenter import HEAD_NORMS
from mambaout.limits import MAX_INPUT_SIZE, MIN_INPUT_SIZE
from mambaout.train.config import (
    CONFIG_DIR,
    RunConfig,
    check_choice,
    check_setting,
    setting,
)

__all__ = ["DETECT_RECIPES", "SEGMENT_RECIPES", "DetectConfig", "SegmentConfig"]

DETECT_RECIPES = CONFIG_DIR / "detect"
SEGMENT_RECIPES = CONFIG_DIR / "segment"


@dataclass
class _DenseConfig(RunConfig):
    """The engine's settings with the defaults the paper's detection and segmentation recipes share."""

    model: str = setting("mambaout_tiny", "the backbone's registered model name (`mambaout models`)")
    num_classes: int | None = setting(None, "classes (background not counted); default the dataset's")
    epochs: int = setting(12, "training epochs")
    warmup_epochs: float = setting(0, "linear warmup epochs from --warmup-lr (when --warmup-iters is not set)")
    batch_size: int = setting(2, "images per device per micro-step")
    base_lr: float = setting(
        1e-4, "learning rate per --lr-batch images of global batch (base_lr * global_batch / lr_batch)"
    )
    lr_batch: int = setting(16, "the global batch --base-lr is given for")
    warmup_lr: float = setting(1e-7, "learning rate at the start of warmup")
    min_lr: float = setting(0.0, "learning rate at the end of the schedule")
    drop_path: float = setting(0.3, "the backbone's stochastic depth (the paper: tiny 0.3, small 0.3, base 0.6)")
    workers: int = setting(2, "data loading processes per device (0: in the training process)")
    channels_last: bool = setting(False, "channels-last memory format for the model")
    hflip: float = setting(0.5, "horizontal flip probability")

    def _validate(self) -> None:
        super()._validate()
        check_setting(0 <= self.hflip <= 1, "hflip", "must be in [0, 1]", self.hflip)


@dataclass
class DetectConfig(_DenseConfig):
    """A detection run: Mask R-CNN (or Faster R-CNN) with an FPN, trained on a COCO-format dataset."""

    data: str | None = setting(None, "COCO root (train2017/, val2017/, annotations/); default the embedded coins")
    warmup_iters: int | None = setting(500, "linear warmup in optimizer steps instead of --warmup-epochs")
    sched: str = setting("multistep", "learning-rate schedule: cosine, tanh, poly, multistep")
    decay_milestones: tuple[float, ...] = setting(
        (8, 11), "epochs at which the multistep schedule multiplies lr by --decay-rate"
    )
    kind: str = setting("mask_rcnn", f"detector: {', '.join(DETECTORS)}")
    min_size: int = setting(800, "resize images so that their short side is this many pixels ...")
    max_size: int = setting(1333, "... unless their long side would pass this")
    fpn_channels: int = setting(256, "channels of the FPN, the RPN head and the mask head")
    box_head_dim: int = setting(1024, "width of the box head's two fully connected layers")
    rpn_batch_size: int = setting(256, "anchors sampled per image for the RPN loss")
    box_batch_size: int = setting(512, "proposals sampled per image for the box and mask losses")

    def _validate(self) -> None:
        super()._validate()
        check_choice(self.kind, "kind", DETECTORS)
        for name in ("min_size", "max_size"):
            value = getattr(self, name)
            bounds = f"must be within {MIN_INPUT_SIZE}..{MAX_INPUT_SIZE}"
            check_setting(MIN_INPUT_SIZE <= value <= MAX_INPUT_SIZE, name, bounds, value)
        check_setting(self.max_size > self.min_size, "max_size", "must be > --min-size", self.max_size)
        for name in ("fpn_channels", "box_head_dim", "rpn_batch_size", "box_batch_size"):
            check_setting(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))


@dataclass
class SegmentConfig(_DenseConfig):
    """A semantic segmentation run: UperNet with an auxiliary FCN head, trained on an ADE20K-style dataset."""

    data: str | None = setting(
        None,
        "ADE20K-style root (images/ and annotations/, each training/ and validation/), or "
        "pathfinder-seg:SIZE-LENGTH[:N[/M]]; default the embedded IHC",
    )
    iters: int | None = setting(
        160_000,
        "optimizer steps to train instead of --epochs (the last epoch stops part-way); --epochs alone clears it",
    )
    warmup_iters: int | None = setting(1500, "linear warmup in optimizer steps instead of --warmup-epochs")
    warmup_lr: float = setting(1e-10, "learning rate at the start of warmup")
    weight_decay: float = setting(0.01, "weight decay, not applied to norms and biases")
    sched: str = setting("poly", "learning-rate schedule: cosine, tanh, poly, multistep")
    decay_rate: float = setting(1.0, "the power of the poly schedule; the lr factor at each multistep milestone")
    crop_size: int = setting(512, "square training crop, in pixels")
    scale: tuple[int, int] = setting((2048, 512), "training images are rescaled to fit this (long, short) size ...")
    ratio_range: tuple[float, float] = setting((0.5, 2.0), "... times a random factor in this range; evaluation at 1")
    cat_max_ratio: float = setting(0.75, "re-draw a crop (up to 10 times) where one class covers more than this share")
    photometric: bool = setting(
        True, "random brightness, contrast, saturation and hue (mmseg's photometric distortion)"
    )
    reduce_zero_label: bool = setting(True, "label 0 is 'other' and ignored, labels 1..K are classes 0..K-1 (ADE20K's)")
    head_channels: int = setting(512, "UperNet's width")
    aux_channels: int = setting(256, "the auxiliary FCN head's width (0: no auxiliary head)")
    aux_weight: float = setting(0.4, "weight of the auxiliary head's loss")
    head_dropout: float = setting(0.1, "dropout before the heads' classifiers")
    head_norm: str = setting("batch", f"norm of the heads: {', '.join(HEAD_NORMS)} (batch needs --batch-size >= 2)")

    def _validate(self) -> None:
        super()._validate()
        bounds = f"must be within {MIN_INPUT_SIZE}..{MAX_INPUT_SIZE}"
        check_setting(MIN_INPUT_SIZE <= self.crop_size <= MAX_INPUT_SIZE, "crop_size", bounds, self.crop_size)
        check_setting(all(MIN_INPUT_SIZE <= s <= MAX_INPUT_SIZE for s in self.scale), "scale", bounds, self.scale)
        low, high = self.ratio_range
        check_setting(0 < low <= high <= 8, "ratio_range", "must be 0 < min <= max <= 8", self.ratio_range)
        check_setting(0 < self.cat_max_ratio <= 1, "cat_max_ratio", "must be in (0, 1]", self.cat_max_ratio)
        check_setting(self.head_channels >= 1, "head_channels", "must be >= 1", self.head_channels)
        check_setting(self.aux_channels >= 0, "aux_channels", "must be >= 0", self.aux_channels)
        check_setting(self.aux_weight >= 0, "aux_weight", "must be >= 0", self.aux_weight)
        check_setting(0 <= self.head_dropout < 1, "head_dropout", "must be in [0, 1)", self.head_dropout)
        check_choice(self.head_norm, "head_norm", HEAD_NORMS)
        # the pyramid pooling's 1×1 map holds one value per image: batch statistics need two
        check_setting(
            self.head_norm != "batch" or self.batch_size >= 2,
            "batch_size",
            "must be >= 2 with --head-norm batch (or use --head-norm group)",
            self.batch_size,
        )
