"""Pretrained patch encoders as ATS feature nets, behind the :class:`PatchEncoder` protocol.

One concept per module:

* :mod:`~ats_wsi.encoders.protocol`: :class:`PatchEncoder` (what ``ATSModel``, the trainer and
  checkpoints ask of an encoder) and the helpers that find encoders inside a model;
* :mod:`~ats_wsi.encoders.presets`: :data:`PRESETS`, the exact timm arguments of published
  pathology encoders;
* :mod:`~ats_wsi.encoders.weights`: local weight files only (hub names and URLs refused),
  safetensors / ``torch.load(weights_only=True)``, strict checks, sha256;
* :mod:`~ats_wsi.encoders.keymaps`: foreign checkpoint layouts renamed onto timm's;
* :mod:`~ats_wsi.encoders.timm_models` / :mod:`~ats_wsi.encoders.timm_encoder`: the ``timm``
  feature net (:class:`TimmEncoder`, :func:`build_timm_encoder`);
* :mod:`~ats_wsi.encoders.torchvision_resnet`: the ``torchvision_resnet`` feature net, a
  non-timm encoder in one file (the example of docs/encoders.md);
* :mod:`~ats_wsi.encoders.cache`: :class:`FeatureCache` for frozen encoders;
* :mod:`~ats_wsi.encoders.device`: CUDA bf16 / channels_last helpers.

Importing this package imports neither timm nor torchvision (they load when an encoder is
built). The ms-per-patch benchmark lives in :mod:`ats_wsi.benchmarks.encoders`. See
docs/encoders.md.
"""

from __future__ import annotations

from ats_wsi.encoders import presets, weights
from ats_wsi.encoders.cache import FeatureCache, FeatureKey
from ats_wsi.encoders.device import cuda_autocast, prepare_for_device
from ats_wsi.encoders.keymaps import (
    KEY_MAP_DROPS,
    KEY_MAPS,
    map_hf_vit_keys,
    map_lukemelas_efficientnet_keys,
)
from ats_wsi.encoders.presets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NOT_EXPRESSIBLE,
    PRESETS,
    EncoderPreset,
)
from ats_wsi.encoders.protocol import (
    PatchEncoder,
    encoder_modules,
    encoder_parameters,
    encoder_state_for_checkpoint,
    load_encoder_state,
    strip_encoder_tensors,
)
from ats_wsi.encoders.timm_encoder import (
    TimmEncoder,
    TimmEncoderSpec,
    build_encoder,
    build_timm_encoder,
    load_encoder_weights,
    resolve_encoder_spec,
    restore_encoder,
)
from ats_wsi.encoders.timm_models import create_timm_model
from ats_wsi.encoders.torchvision_resnet import (
    TorchvisionResNetEncoder,
    build_torchvision_resnet,
)
from ats_wsi.encoders.weights import (
    WEIGHT_SUFFIXES,
    EncoderHashMismatchError,
    EncoderWeightsError,
    EncoderWeightsMissingError,
    check_state_dict,
    file_sha256,
    load_weights_file,
    resolve_weights_path,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KEY_MAPS",
    "KEY_MAP_DROPS",
    "NOT_EXPRESSIBLE",
    "PRESETS",
    "WEIGHT_SUFFIXES",
    "EncoderHashMismatchError",
    "EncoderPreset",
    "EncoderWeightsError",
    "EncoderWeightsMissingError",
    "FeatureCache",
    "FeatureKey",
    "PatchEncoder",
    "TimmEncoder",
    "TimmEncoderSpec",
    "TorchvisionResNetEncoder",
    "build_encoder",
    "build_timm_encoder",
    "build_torchvision_resnet",
    "check_state_dict",
    "create_timm_model",
    "cuda_autocast",
    "encoder_modules",
    "encoder_parameters",
    "encoder_state_for_checkpoint",
    "file_sha256",
    "load_encoder_state",
    "load_encoder_weights",
    "load_weights_file",
    "map_hf_vit_keys",
    "map_lukemelas_efficientnet_keys",
    "prepare_for_device",
    "resolve_encoder_spec",
    "resolve_weights_path",
    "restore_encoder",
    "strip_encoder_tensors",
]

# Private names the tests (and older code) reach through the package.
_KEY_MAPS = KEY_MAPS
_KEY_MAP_DROPS = KEY_MAP_DROPS
_PACKAGE_LITE0 = presets._PACKAGE_LITE0
_package_weights = weights._package_weights

