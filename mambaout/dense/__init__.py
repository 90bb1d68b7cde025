"""Detection and segmentation on the MambaOut backbone: the paper's Mask R-CNN and UperNet.

- `backbone`: the four stage outputs NCHW through their own LayerNorms (`DenseBackbone`), ImageNet weights loaded.
- `detector`: torchvision's Mask R-CNN / Faster R-CNN with an FPN on it (`create_detector`).
- `segmenter`: UperNet with pyramid pooling and an auxiliary FCN head (`create_segmenter`).
- `complexity`: parameters and MACs beside the paper's.
"""

from mambaout.dense.backbone import DenseBackbone, create_backbone
from mambaout.dense.complexity import dense_complexity, dense_table
from mambaout.dense.detector import create_detector
from mambaout.dense.segmenter import create_segmenter

__all__ = ["DenseBackbone", "create_backbone", "create_detector", "create_segmenter", "dense_complexity", "dense_table"]
