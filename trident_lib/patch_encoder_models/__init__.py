"""Patch encoders: ``encoder_factory(name, weights_path=None, **kwargs)`` and the seed's encoder classes."""

from __future__ import annotations

import os

from . import conch_family, genbio, hf_family, timm_family  # noqa: F401  (register the specs)
from .base import REGISTRY, BasePatchEncoder, CustomInferenceEncoder, EncoderSpec, eval_transforms, meta_device

DEFAULT_ENCODER = "efficientnet_lite0"

# The seed's class names, each bound to its spec.
_CLASSES = {
    "CTransPathInferenceEncoder": "ctranspath", "Conchv15InferenceEncoder": "conch_v15",
    "Conchv1InferenceEncoder": "conch_v1", "GPFMInferenceEncoder": "gpfm", "Gemma426BInferenceEncoder": "gemma4-26b",
    "Gemma4E4BInferenceEncoder": "gemma4-e4b", "GenBioPathFMInferenceEncoder": "genbio-pathfm",
    "GigaPathInferenceEncoder": "gigapath", "H0MiniInferenceEncoder": "h0-mini",
    "HOptimus0InferenceEncoder": "hoptimus0", "HOptimus1InferenceEncoder": "hoptimus1",
    "HibouLInferenceEncoder": "hibou_l", "KaikoB16InferenceEncoder": "kaiko-vitb16",
    "KaikoB8InferenceEncoder": "kaiko-vitb8", "KaikoL14InferenceEncoder": "kaiko-vitl14",
    "KaikoS16InferenceEncoder": "kaiko-vits16", "KaikoS8InferenceEncoder": "kaiko-vits8",
    "KeepInferenceEncoder": "keep", "LunitS8InferenceEncoder": "lunit-vits8",
    "Midnight12kInferenceEncoder": "midnight12k", "MuskInferenceEncoder": "musk",
    "OpenMidnightInferenceEncoder": "openmidnight", "PhikonInferenceEncoder": "phikon",
    "Phikonv2InferenceEncoder": "phikon_v2", "ResNet50InferenceEncoder": "resnet50",
    "UNIInferenceEncoder": "uni_v1", "UNIv2InferenceEncoder": "uni_v2", "Virchow2InferenceEncoder": "virchow2",
    "VirchowInferenceEncoder": "virchow", "EfficientNetLite0InferenceEncoder": "efficientnet_lite0",
}
for _cls, _name in _CLASSES.items():
    globals()[_cls] = type(_cls, (BasePatchEncoder,), {"spec_name": _name, "__doc__": f"The '{_name}' encoder."})


def encoder_factory(model_name: str, weights_path: str | os.PathLike | None = None, **kwargs) -> BasePatchEncoder:
    """Instantiate a patch encoder by name. Weights come from ``weights_path``, the lab's registry
    (``$TRIDENT_WEIGHTS_REGISTRY``) or the local hub cache; ``pretrained=False`` gives random weights."""
    if model_name not in REGISTRY:
        raise ValueError(f"Unknown patch encoder {model_name!r}. Known encoders: {', '.join(sorted(REGISTRY))}.")
    return BasePatchEncoder(weights_path=weights_path, model_name=model_name, **kwargs)


def encoder_spec(model_name: str) -> EncoderSpec:
    if model_name not in REGISTRY:
        raise ValueError(f"Unknown patch encoder {model_name!r}. Known encoders: {', '.join(sorted(REGISTRY))}.")
    return REGISTRY[model_name]


__all__ = ["encoder_factory", "encoder_spec", "REGISTRY", "BasePatchEncoder", "CustomInferenceEncoder",
           "EncoderSpec", "eval_transforms", "meta_device", "DEFAULT_ENCODER", *_CLASSES]
