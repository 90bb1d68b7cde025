"""Building blocks of MambaOut: the Gated CNN block with a replaceable token mixer, stem, downsampling, head."""

from mambaout.layers.block import DepthwiseConvMixer, GatedCNNBlock, TokenMixer
from mambaout.layers.head import MlpHead
from mambaout.layers.stem import Downsample, Stem

__all__ = ["DepthwiseConvMixer", "Downsample", "GatedCNNBlock", "MlpHead", "Stem", "TokenMixer"]
