"""Building blocks of MambaOut: the Gated CNN block with a replaceable token mixer, the token mixers of the paper's
argument (depthwise conv, selective-scan SSM, attention, their causal forms), stem, downsampling, head."""

from mambaout.layers.attention import AttentionMixer
from mambaout.layers.block import TOKEN_MIXERS, GatedCNNBlock, TokenMixer, token_mixer_factory
from mambaout.layers.conv import CausalDepthwiseConvMixer, DepthwiseConvMixer
from mambaout.layers.head import MlpHead
from mambaout.layers.scan import scan_macs, selective_scan
from mambaout.layers.ssm import SSMMixer
from mambaout.layers.stem import Downsample, Stem

__all__ = [
    "TOKEN_MIXERS",
    "AttentionMixer",
    "CausalDepthwiseConvMixer",
    "DepthwiseConvMixer",
    "Downsample",
    "GatedCNNBlock",
    "MlpHead",
    "SSMMixer",
    "Stem",
    "TokenMixer",
    "scan_macs",
    "selective_scan",
    "token_mixer_factory",
]
