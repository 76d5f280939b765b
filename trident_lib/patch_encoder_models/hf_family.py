"""Encoders published as Hugging Face transformers models (DINOv2 / ViT families), and those that need
packages or model code outside PyPI's mainstream (MUSK, KEEP; Gemma 4, not supported yet; CONCH: conch_family)."""

from __future__ import annotations

import copy
import json
import math
import os

import torch

from ..errors import MissingDependencyError
from ..weights import load_state_dict
from .base import HALF, HIBOU, IMAGENET, EncoderSpec, register


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise MissingDependencyError("This patch encoder", "transformers", extra="hf") from e
    return transformers


class HFBackbone(torch.nn.Module):
    """A transformers vision backbone built from an inline config (no download); returns its tokens."""

    def __init__(self, model_cls: str, config_cls: str, **config):
        super().__init__()
        tf = _transformers()
        kwargs = {"add_pooling_layer": False} if model_cls == "ViTModel" else {}
        self.backbone = getattr(tf, model_cls)(getattr(tf, config_cls)(**config), **kwargs)

    def forward(self, x):
        return self.backbone(pixel_values=x).last_hidden_state


def _hf(model_cls, config_cls, **config):
    return lambda **overrides: HFBackbone(model_cls, config_cls, **{**config, **overrides})


def _hf_keys(sd: dict) -> dict:
    """Checkpoints saved from AutoModel use bare keys; from a task model, a 'vit.'/'dinov2.' prefix."""
    out = {}
    for k, v in sd.items():
        for prefix in ("vit.", "dinov2.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        if not k.startswith(("pooler.", "classifier.")):
            out[k] = v
    return out


# The config.json fields that shape a ViT / DINOv2 backbone. Others (the code it names, dtype, outputs) are
# not taken: Hibou's config names its own model code, which is not run; transformers' class is used.
ARCHITECTURE = {"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "mlp_ratio",
                "patch_size", "image_size", "num_channels", "num_register_tokens", "use_swiglu_ffn",
                "layerscale_value", "qkv_bias", "layer_norm_eps", "hidden_act"}


def hf_loader(name: str):
    """Load a transformers checkpoint (model.safetensors / pytorch_model.bin as saved by save_pretrained)
    through transformers itself, which maps the names on disk to the installed version's module names.

    A DINOv2 file whose position table has another grid (its config's image_size) gives the model that
    grid, as from_pretrained with the file's config would; transformers resamples it per input size."""

    def load(model: HFBackbone, path: str) -> None:
        sd = _hf_keys(load_state_dict(path, name))
        config = copy.deepcopy(model.backbone.config)
        published = os.path.join(os.path.dirname(path), "config.json")
        if os.path.exists(published):  # the folder's architecture wins (Hibou: SwiGLU, LayerScale 1.0)
            with open(published) as f:
                for k, v in json.load(f).items():
                    if k in ARCHITECTURE and hasattr(config, k):
                        setattr(config, k, v)
        pos = sd.get("embeddings.position_embeddings")
        if pos is not None and config.model_type.startswith("dinov2"):
            config.image_size = math.isqrt(pos.shape[1] - 1) * config.patch_size
        kwargs = {"add_pooling_layer": False} if isinstance(model.backbone, _transformers().ViTModel) else {}
        try:
            backbone, info = type(model.backbone).from_pretrained(None, config=config, state_dict=sd,
                                                                  output_loading_info=True, **kwargs)
        except (RuntimeError, ValueError) as e:  # shape mismatches
            raise ValueError(f"{name}: the weights in {path} do not fit this architecture ({str(e)[:300]}).") from e
        bad = {k: sorted(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[k]}
        if bad:
            raise ValueError(f"{name}: the weights in {path} do not fit this architecture ({str(bad)[:300]}).")
        model.backbone = backbone.eval()

    return load


def cls_token(model, x):
    return model(x)[:, 0]


def cls_and_mean(n_prefix):
    def forward(model, x):
        t = model(x)
        return torch.cat([t[:, 0], t[:, n_prefix:].mean(dim=1)], dim=-1)

    return forward


DINOV2_L = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=14,
                image_size=224, layerscale_value=1e-5)
DINOV2_G = dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4, patch_size=14,
                image_size=224, use_swiglu_ffn=True, layerscale_value=1e-5)

register(
    EncoderSpec("phikon", 768, _hf("ViTModel", "ViTConfig", hidden_size=768, num_hidden_layers=12,
                                   num_attention_heads=12, intermediate_size=3072, image_size=224, patch_size=16),
                IMAGENET, crop=False, hub_repo="owkin/phikon", load_weights=hf_loader("phikon"), forward=cls_token,
                patch_size=224, requires=("transformers",), licence="Owkin non-commercial"),
    EncoderSpec("phikon_v2", 1024, _hf("Dinov2Model", "Dinov2Config", **DINOV2_L), IMAGENET,
                hub_repo="owkin/phikon-v2", load_weights=hf_loader("phikon_v2"), forward=cls_token, patch_size=224,
                requires=("transformers",), licence="Owkin non-commercial"),
    EncoderSpec("hibou_l", 1024, _hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", num_register_tokens=4,
                                     **DINOV2_L), HIBOU, interpolation="bicubic", crop=False,
                hub_repo="histai/hibou-L", load_weights=hf_loader("hibou_l"), forward=cls_token, patch_size=224,
                requires=("transformers",), licence="Apache-2.0"),
    # TRIDENT's code returns the class token (1536) by default, its README 3072: class token + mean patch token.
    EncoderSpec("midnight12k", 3072, _hf("Dinov2Model", "Dinov2Config", **DINOV2_G), HALF, precision="fp16",
                hub_repo="kaiko-ai/midnight", load_weights=hf_loader("midnight12k"), forward=cls_and_mean(1),
                patch_size=224, requires=("transformers",), licence="MIT"),
)


# -- encoders whose model code lives outside the packages we depend on ------------------------------

def build_musk():
    import timm
    from musk import modeling  # noqa: F401  (importing it registers musk_large_patch16_384 with timm)

    return timm.create_model("musk_large_patch16_384")


def load_musk(model, path: str) -> None:
    # MUSK's own loader: unwraps 'model'/'module', resizes the position table if needed, loads non-strictly.
    from musk import utils

    utils.load_model_and_may_interpolate(path, model, "model|module", "")


def musk_image_embedding(model, x):
    # The BEiT-3 vision class token without head or normalisation: 1024-d. TRIDENT runs one scale
    # (ms_aug=False); MUSK's multiscale option would concatenate a second scale (2048-d).
    return model(image=x, with_head=False, out_norm=False, ms_aug=False, return_global=True)[0]


def _from_folder_transformers(folder: str, **kwargs):
    """KEEP ships its architecture with the checkpoint (config and code):
    loaded from the lab's local copy only, never fetched, and remote code runs only when the lab opts in."""
    tf = _transformers()
    trust = bool(kwargs.pop("trust_remote_code", False))
    return tf.AutoModel.from_pretrained(folder, local_files_only=True, trust_remote_code=trust)


def _gemma4(folder: str, **kwargs):
    # Said before anything is loaded, rather than failing inside the model on the first batch.
    raise NotImplementedError(
        f"Gemma 4 ({folder}) is not supported yet: its vision tower takes patches prepared by Gemma's own image "
        "processor (processor_config.json: patchified pixels and their positions), which this encoder does not "
        "produce. Choose another patch encoder.")


def _image_embedding(model, x):
    """The model code's own image embedding (KEEP's encode_image, as TRIDENT calls it), else the pooled tokens
    of its vision tower."""
    if hasattr(model, "encode_image"):
        return model.encode_image(x)
    return _pooled(getattr(model, "vision_model", model), x)


def _pooled(model, x):
    out = model(pixel_values=x)
    pooled = getattr(out, "pooler_output", None)
    return pooled if pooled is not None else out.last_hidden_state.mean(dim=1)


register(
    EncoderSpec("musk", 1024, build_musk, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), size=384, interpolation="bicubic",
                precision="fp16", hub_repo="xiangjx/musk", weight_files=("model.safetensors",), patch_size=384,
                requires=("musk",), install="pip install git+https://github.com/lilab-stanford/MUSK fairscale",
                load_weights=load_musk, forward=musk_image_embedding, licence="CC-BY-NC-ND-4.0"),
    EncoderSpec("keep", 768, _from_folder_transformers, IMAGENET, interpolation="bicubic", precision="fp16",
                hub_repo="Astaxanthin/KEEP", from_folder=True, forward=_image_embedding, requires=("transformers",),
                licence="see model card"),
    EncoderSpec("gemma4-e4b", 768, _gemma4, HALF, hub_repo="google/gemma-4-E4B",
                from_folder=True, forward=_pooled, patch_size=224, precision="bf16", requires=("transformers",),
                licence="Gemma terms"),
    EncoderSpec("gemma4-26b", 1152, _gemma4, HALF, hub_repo="google/gemma-4-26B-A4B",
                from_folder=True, forward=_pooled, patch_size=224, precision="bf16", requires=("transformers",),
                licence="Gemma terms"),
)
