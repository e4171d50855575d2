"""resfuse: fused conv -> bias -> BatchNorm -> activation (+ residual) for PyTorch ResNets.

    import resfuse
    report = resfuse.convert(model)      # swap torchvision/timm blocks for fused ones, in place
    resfuse.backends()                   # which backends can run here, and why not
    model = resfuse.models.resnet50()    # torchvision's ResNet-50, where torchvision is absent
    y = resfuse.functional.conv_bn_act(x, w, None, bn_w, bn_b, rm, rv, training=True,
                                       activation="relu", residual=r, padding=1)
"""
from . import functional, models, reference
from .activations import Activation
from .backend import BackendUnavailable, backends, use_backend
from .convert import ChainRow, ConvertReport, NotFusable, convert, fuse_block, revert
from .modules import (FusedBasicBlock, FusedBottleneck, FusedConvBNAct, FusedConvBNAct1d,
                      FusedResidualBlock, FusedStage, SyncBatchNorm)
from .ops import BNActConvFunction, ConvBNActFunction, OpConfig
from .sync_ops import SyncBNActConvFunction, SyncConvBNActFunction
from .validation import ResfuseInputError
from .version import __version__

__all__ = ["functional", "models", "reference", "Activation", "BackendUnavailable", "backends",
           "use_backend", "ChainRow", "ConvertReport", "NotFusable", "convert", "fuse_block",
           "revert", "FusedBasicBlock", "FusedBottleneck", "FusedConvBNAct", "FusedConvBNAct1d",
           "FusedResidualBlock", "FusedStage", "SyncBatchNorm", "BNActConvFunction",
           "ConvBNActFunction", "OpConfig", "SyncBNActConvFunction", "SyncConvBNActFunction",
           "ResfuseInputError", "__version__"]
