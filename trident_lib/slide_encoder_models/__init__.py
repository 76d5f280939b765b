"""Slide encoders: pool a slide's patch features into one embedding.

Each slide encoder names the patch encoder (and magnification / patch size) its inputs must come from.
``forward(batch, device)`` takes ``{"features": (B, N, D), "coords": (B, N, 2), "attributes": {...,
"patch_size_level0": int}}`` and returns (B, embedding_dim).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MissingDependencyError
from ..patch_encoder_models import REGISTRY as PATCH_REGISTRY
from ..weights import file_checksum, find_weights, load_into, load_state_dict


@dataclass(frozen=True)
class SlideEncoderSpec:
    name: str
    patch_encoder: str
    mag: float
    patch_size: int
    dim: int
    kind: str  # "mean", "abmil", "remote_code" (model code shipped with the checkpoint) or "package"
    hub_repo: str | None = None
    package: str | None = None
    precision: str = "fp32"


SPECS: dict[str, SlideEncoderSpec] = {}
for _spec in [
    SlideEncoderSpec("threads", "conch_v15", 20, 512, 1024, "package", package="threads"),
    SlideEncoderSpec("titan", "conch_v15", 20, 512, 768, "remote_code", hub_repo="MahmoodLab/TITAN",
                     precision="fp16"),
    SlideEncoderSpec("prism", "virchow", 20, 224, 1280, "remote_code", hub_repo="paige-ai/Prism", precision="fp16"),
    SlideEncoderSpec("chief", "ctranspath", 10, 256, 768, "package", package="chief"),
    SlideEncoderSpec("gigapath", "gigapath", 20, 256, 768, "package", package="gigapath", precision="fp16"),
    SlideEncoderSpec("madeleine", "conch_v1", 10, 256, 512, "package", package="madeleine"),
    SlideEncoderSpec("feather", "conch_v15", 20, 512, 512, "abmil", hub_repo="MahmoodLab/feather"),
    SlideEncoderSpec("feather_uni_v2", "uni_v2", 20, 256, 512, "abmil", hub_repo="MahmoodLab/feather"),
    SlideEncoderSpec("abmil", "", 20, 256, 512, "abmil"),
]:
    SPECS[_spec.name] = _spec


def _mean_spec(name: str) -> SlideEncoderSpec:
    patch = name[len("mean-"):]
    if patch not in PATCH_REGISTRY:
        raise ValueError(f"Unknown slide encoder {name!r}: no patch encoder {patch!r}.")
    p = PATCH_REGISTRY[patch]
    return SlideEncoderSpec(name, patch, p.mag, p.patch_size, p.dim, "mean")


def slide_encoder_spec(name: str) -> SlideEncoderSpec:
    if name.startswith("mean-"):
        return _mean_spec(name)
    if name not in SPECS:
        raise ValueError(f"Unknown slide encoder {name!r}. Known: mean-<patch encoder>, {', '.join(sorted(SPECS))}.")
    return SPECS[name]


class _SlideMapping(dict):
    """slide encoder -> the patch encoder it needs (``mean-X`` maps to ``X`` for every patch encoder)."""

    def __missing__(self, key):
        return slide_encoder_spec(key).patch_encoder

    def __contains__(self, key):
        try:
            self[key]
            return True
        except ValueError:
            return False


slide_to_patch_encoder_name = _SlideMapping({name: s.patch_encoder for name, s in SPECS.items()})


class BaseSlideEncoder(nn.Module):
    def __init__(self, spec: SlideEncoderSpec):
        super().__init__()
        self.spec = spec
        self.enc_name = spec.name
        self.embedding_dim = spec.dim
        self.precision = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec.precision]
        self.weights_path = None
        self.weights_sha256 = None


class MeanSlideEncoder(BaseSlideEncoder):
    """The average of the patch features."""

    def forward(self, batch, device="cuda"):
        return batch["features"].to(device).float().mean(dim=1)


class ABMILSlideEncoder(BaseSlideEncoder):
    """Gated attention-based MIL pooling (Ilse et al., 2018): project, score each patch, weighted sum."""

    def __init__(self, spec: SlideEncoderSpec, input_feature_dim: int | None = None, n_heads: int = 1,
                 head_dim: int | None = None, dropout: float = 0.0, gated: bool = True):
        super().__init__(spec)
        in_dim = input_feature_dim or (PATCH_REGISTRY[spec.patch_encoder].dim if spec.patch_encoder else 1024)
        head_dim = head_dim or spec.dim
        self.embedding_dim = head_dim
        self.project = nn.Sequential(nn.Linear(in_dim, head_dim), nn.GELU(), nn.Dropout(dropout))
        self.attention_a = nn.Sequential(nn.Linear(head_dim, head_dim), nn.Tanh())
        self.attention_b = nn.Sequential(nn.Linear(head_dim, head_dim), nn.Sigmoid()) if gated else None
        self.attention_c = nn.Linear(head_dim, n_heads)

    def forward(self, batch, device="cuda", return_raw_attention=False):
        h = self.project(batch["features"].to(device).float())  # (B, N, H)
        a = self.attention_a(h)
        if self.attention_b is not None:
            a = a * self.attention_b(h)
        scores = self.attention_c(a)  # (B, N, heads)
        weights = torch.softmax(scores, dim=1)
        pooled = torch.einsum("bnk,bnh->bh", weights, h) / weights.shape[-1]
        return (pooled, scores) if return_raw_attention else pooled


class RemoteCodeSlideEncoder(BaseSlideEncoder):
    """TITAN and PRISM publish their model code with the checkpoint; it is loaded from the lab's local
    copy only, and runs only when the lab opts in with ``trust_remote_code=True``."""

    def __init__(self, spec, weights_path=None, trust_remote_code=False):
        super().__init__(spec)
        path = find_weights(spec.name, weights_path, spec.hub_repo, ("config.json",))
        try:
            import transformers
        except ImportError as e:
            raise MissingDependencyError(f"The '{spec.name}' slide encoder", "transformers", extra="hf") from e
        if not trust_remote_code:
            raise PermissionError(f"{spec.name}: the checkpoint at {path} ships its own model code; pass "
                                  f"trust_remote_code=True to run it (it is never fetched).")
        import os

        self.model = transformers.AutoModel.from_pretrained(os.path.dirname(path), local_files_only=True,
                                                            trust_remote_code=True)
        self.weights_path, self.weights_sha256 = path, file_checksum(path)

    def forward(self, batch, device="cuda"):
        feats, coords = batch["features"].to(device), batch["coords"].to(device)
        if self.spec.name == "titan":
            return self.model.encode_slide_from_patch_features(feats, coords, batch["attributes"]["patch_size_level0"])
        return self.model.slide_representations(feats)["image_embedding"]


def encoder_factory(model_name: str, pretrained: bool = True, freeze: bool = True, weights_path: str | None = None,
                    **kwargs) -> BaseSlideEncoder:
    """Build a slide encoder. ``mean-<patch encoder>`` and ``abmil`` need no weights; pretrained ones
    load from ``weights_path`` or the local caches, or fail with an error that says how to supply them."""
    spec = slide_encoder_spec(model_name)
    if spec.kind == "mean":
        model = MeanSlideEncoder(spec)
    elif spec.kind == "abmil":
        model = ABMILSlideEncoder(spec, **kwargs)
        if pretrained and spec.hub_repo:
            path = find_weights(spec.name, weights_path, spec.hub_repo, ("model.safetensors", "model.pth"))
            load_into(model, load_state_dict(path, spec.name), spec.name, path)
            model.weights_path, model.weights_sha256 = path, file_checksum(path)
    elif spec.kind == "remote_code":
        model = RemoteCodeSlideEncoder(spec, weights_path, **kwargs)
    else:
        raise MissingDependencyError(f"The '{spec.name}' slide encoder", spec.package)
    if freeze:
        model.eval()
        for p in model.parameters():
            p.requires_grad = False
    return model


__all__ = ["encoder_factory", "slide_to_patch_encoder_name", "slide_encoder_spec", "SlideEncoderSpec",
           "MeanSlideEncoder", "ABMILSlideEncoder", "BaseSlideEncoder", "SPECS"]
