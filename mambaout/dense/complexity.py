"""Parameters and MACs of the dense models, counted as the paper's tables count them, beside the paper's figures.

Counted on the meta device (no memory, no time) with `FlopCounterMode`, MACs = FLOPs / 2, as the classification table.
What runs is what mmdetection's and mmsegmentation's `get_flops` run, which the paper's figures come from:

- Mask R-CNN at 800×1280 (COCO, 80 classes): backbone, FPN and RPN head on the image, the box head on 1000 RoIs and
  the mask head on 100 (mmdet's `forward_dummy`: the test-time proposal and detection counts). RoIAlign, NMS and
  anchor decoding are not counted (by either).
- UperNet at 512×2048 (ADE20K, 150 classes): backbone and decode head; the auxiliary head is trained but not run at
  test time, so its parameters are counted and its MACs are not (mmseg's `forward_dummy` too).
"""

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from mambaout.dense.detector import create_detector
from mambaout.dense.segmenter import create_segmenter

__all__ = ["PAPER", "DenseComplexity", "dense_complexity", "dense_table"]

# (params M, GMACs) of the paper's Table 3 (COCO Mask R-CNN, 800×1280) and Table 4 (ADE20K UperNet, 512×2048)
PAPER = {
    ("detection", "mambaout_tiny"): (43, 262),
    ("detection", "mambaout_small"): (65, 354),
    ("detection", "mambaout_base"): (100, 495),
    ("segmentation", "mambaout_tiny"): (54, 938),
    ("segmentation", "mambaout_small"): (76, 1032),
    ("segmentation", "mambaout_base"): (112, 1178),
}
SIZES = {"detection": (800, 1280), "segmentation": (512, 2048)}
CLASSES = {"detection": 80, "segmentation": 150}
_BOX_ROIS, _MASK_ROIS = 1000, 100


@dataclass(frozen=True)
class DenseComplexity:
    """One dense model's size and cost.

    Attributes:
        params: Parameters.
        macs: Multiply-accumulates for one image of `size`.
        size: (height, width) of the image counted.
        paper: The paper's (params M, GMACs), when it gives them.
    """

    params: int
    macs: int
    size: tuple[int, int]
    paper: tuple[float, float] | None


def dense_complexity(name: str, task: str, size: tuple[int, int] | None = None) -> DenseComplexity:
    """Parameters and MACs of Mask R-CNN ("detection") or UperNet ("segmentation") on variant `name`."""
    size = size or SIZES[task]
    with torch.device("meta"):
        if task == "detection":
            model = create_detector(name, CLASSES[task], "mask_rcnn").eval()
        else:
            model = create_segmenter(name, CLASSES[task]).eval()
        image = torch.empty(1, 3, *size)
        params = sum(p.numel() for p in model.parameters())
        with FlopCounterMode(display=False) as counter:
            if task == "detection":
                feats = model.backbone(image)
                model.rpn.head(list(feats.values()))
                side = model.roi_heads.box_roi_pool.output_size[0]
                boxes = torch.empty(_BOX_ROIS, model.backbone.out_channels, side, side)
                model.roi_heads.box_predictor(model.roi_heads.box_head(boxes))
                side = model.roi_heads.mask_roi_pool.output_size[0]
                masks = torch.empty(_MASK_ROIS, model.backbone.out_channels, side, side)
                model.roi_heads.mask_predictor(model.roi_heads.mask_head(masks))
            else:
                model(image)
    return DenseComplexity(params, counter.get_total_flops() // 2, tuple(size), PAPER.get((task, name)))


def dense_table(names: list[str]) -> str:
    """A Markdown table of Mask R-CNN and UperNet on each of `names`, ours beside the paper's."""
    rows = [
        "| model | Mask R-CNN params (M) | paper | GMACs @800×1280 | paper | UperNet params (M) | paper | "
        "GMACs @512×2048 | paper |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        cells = [name]
        for task in ("detection", "segmentation"):
            c = dense_complexity(name, task)
            paper_params, paper_macs = c.paper or ("-", "-")
            cells += [f"{c.params / 1e6:.1f}", str(paper_params), f"{c.macs / 1e9:.0f}", str(paper_macs)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
