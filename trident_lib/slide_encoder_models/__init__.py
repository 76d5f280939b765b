"""Slide encoders: pool a slide's patch features into one embedding.

Each slide encoder names the patch encoder (and magnification / patch size) its inputs must come from.
``forward(batch, device)`` takes ``{"features": (B, N, D), "coords": (B, N, 2), "attributes": {...,
"patch_size_level0": int}}`` and returns (B, embedding_dim).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from argparse import Namespace
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MissingDependencyError, WeightsNotFoundError
from ..patch_encoder_models import REGISTRY as PATCH_REGISTRY
from ..patch_encoder_models.base import MissingCodeError
from ..weights import file_checksum, find_weights, load_into, load_state_dict


@dataclass(frozen=True)
class SlideEncoderSpec:
    name: str
    patch_encoder: str
    mag: float
    patch_size: int
    dim: int
    kind: str  # "mean", "abmil", "feather", "remote_code" (model code shipped with the checkpoint) or "package"
    hub_repo: str | None = None
    package: str | None = None  # importable module (kind "package")
    precision: str = "fp32"
    weight_files: tuple[str, ...] = ()
    install: str | None = None  # how to get the package


SPECS: dict[str, SlideEncoderSpec] = {}
for _spec in [
    SlideEncoderSpec("threads", "conch_v15", 20, 512, 1024, "package", package="threadsmodel",
                     install="THREADS has not been publicly released (TRIDENT lists it as 'Coming Soon')."),
    SlideEncoderSpec("titan", "conch_v15", 20, 512, 768, "remote_code", hub_repo="MahmoodLab/TITAN",
                     precision="fp16"),
    SlideEncoderSpec("prism", "virchow", 20, 224, 1280, "remote_code", hub_repo="paige-ai/Prism", precision="fp16"),
    SlideEncoderSpec("care", "conch_v15", 20, 512, 512, "remote_code", hub_repo="Zipper-1/CARE"),
    SlideEncoderSpec("chief", "ctranspath", 10, 256, 768, "package", package="CHIEF",
                     weight_files=("model_weight/CHIEF_pretraining.pth",),
                     install="git clone https://github.com/hms-dbmi/CHIEF, put CHIEF_pretraining.pth and "
                             "Text_emdding.pth in its model_weight/ folder, and pass the clone as weights_path (or "
                             "list it as 'chief' in $TRIDENT_WEIGHTS_REGISTRY)."),
    SlideEncoderSpec("gigapath", "gigapath", 20, 256, 768, "package", hub_repo="prov-gigapath/prov-gigapath",
                     package="gigapath", precision="fp16", weight_files=("slide_encoder.pth",),
                     install="pip install git+https://github.com/prov-gigapath/prov-gigapath (with fairscale "
                             "and flash-attn)"),
    SlideEncoderSpec("madeleine", "conch_v1", 10, 256, 512, "package", hub_repo="MahmoodLab/madeleine",
                     package="madeleine", weight_files=("model_config.json",),
                     install="pip install git+https://github.com/mahmoodlab/MADELEINE"),
    SlideEncoderSpec("feather", "conch_v15", 20, 512, 512, "feather",
                     hub_repo="MahmoodLab/abmil.base.conch_v15.pc108-24k"),
    SlideEncoderSpec("feather_uni_v2", "uni_v2", 20, 256, 512, "feather",
                     hub_repo="MahmoodLab/abmil.base.uni_v2.pc108-24k"),
    SlideEncoderSpec("abmil", "", 20, 256, 512, "abmil"),  # dim: the attention heads' width
]:
    SPECS[_spec.name] = _spec


# TRIDENT registers mean-kaiko-vit8s etc., which match no patch encoder name (kaiko-vits8, ...) and so
# cannot resolve there; they are taken here as the kaiko encoders they evidently mean.
MEAN_ALIASES = {"kaiko-vit8s": "kaiko-vits8", "kaiko-vit16s": "kaiko-vits16", "kaiko-vit8b": "kaiko-vitb8",
                "kaiko-vit16b": "kaiko-vitb16", "kaiko-vit14l": "kaiko-vitl14"}


def _mean_spec(name: str) -> SlideEncoderSpec:
    patch = name[len("mean-"):]
    patch = MEAN_ALIASES.get(patch, patch)
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
    """TRIDENT's untrained ABMIL (to be trained by the lab): Linear + GELU before and after gated attention
    pooling; each head scores the patches, its softmax-weighted sum of the patches is taken, the heads'
    sums are condensed back to the input width. The embedding has the input's dimension."""

    def __init__(self, spec: SlideEncoderSpec, input_feature_dim: int | None = None, n_heads: int = 1,
                 head_dim: int | None = None, dropout: float = 0.0, gated: bool = True):
        super().__init__(spec)
        d = input_feature_dim or 1024
        head_dim = head_dim or spec.dim
        self.embedding_dim = d

        def per_head(act):
            return nn.ModuleList(nn.Sequential(nn.Linear(d, head_dim), act(), nn.Dropout(dropout))
                                 for _ in range(n_heads))

        pooler = nn.ModuleDict({"attention_heads": per_head(nn.Tanh),
                                "gating_layers": per_head(nn.Sigmoid) if gated else None,
                                "branching_layers": nn.ModuleList(nn.Linear(head_dim, 1) for _ in range(n_heads))})
        if n_heads > 1:
            pooler["condensing_layer"] = nn.Linear(n_heads * d, d)
        self.model = nn.ModuleDict({
            "pre_attention_layers": nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(0.1)),
            "image_pooler": pooler,
            "post_attention_layers": nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(0.1))})

    def forward(self, batch, device="cuda", return_raw_attention=False):
        h = self.model["pre_attention_layers"](batch["features"].to(device).float())  # (B, N, d)
        pooler, scores = self.model["image_pooler"], []
        for i, branch in enumerate(pooler["branching_layers"]):
            a = pooler["attention_heads"][i](h)
            if pooler["gating_layers"] is not None:
                a = a * pooler["gating_layers"][i](h)
            scores.append(branch(a))  # (B, N, 1)
        scores = torch.cat(scores, dim=-1).transpose(1, 2)  # (B, heads, N)
        pooled = torch.bmm(torch.softmax(scores, dim=-1), h).flatten(1)  # the heads' weighted sums
        if "condensing_layer" in pooler:
            pooled = pooler["condensing_layer"](pooled)
        out = self.model["post_attention_layers"](pooled)
        return (out, scores.unsqueeze(1)) if return_raw_attention else out  # scores: (B, 1, heads, N)


class FeatherSlideEncoder(BaseSlideEncoder):
    """FEATHER (MahmoodLab's pretrained ABMIL), built here with its published parameter names, so the
    lab's model.safetensors loads without running the model code shipped beside it: patches embedded by
    Linear + ReLU, scored by gated attention, and their softmax-weighted mean is the embedding."""

    def __init__(self, spec: SlideEncoderSpec, in_dim: int | None = None, embed_dim: int = 512,
                 attn_dim: int = 384, gate: bool = True):
        super().__init__(spec)
        in_dim = in_dim or PATCH_REGISTRY[spec.patch_encoder].dim
        self.embedding_dim = embed_dim
        attention = nn.ModuleDict({"attention_a": nn.Sequential(nn.Linear(embed_dim, attn_dim), nn.Tanh()),
                                   "attention_c": nn.Linear(attn_dim, 1)})
        if gate:
            attention["attention_b"] = nn.Sequential(nn.Linear(embed_dim, attn_dim), nn.Sigmoid())
        self.model = nn.ModuleDict({"patch_embed": nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU()),
                                    "global_attn": attention})

    @classmethod
    def from_folder(cls, spec: SlideEncoderSpec, weights_path=None) -> FeatherSlideEncoder:
        path = find_weights(spec.name, weights_path, spec.hub_repo, ("model.safetensors",))
        config = {}
        config_file = os.path.join(os.path.dirname(path), "config.json")
        if os.path.exists(config_file):
            with open(config_file) as f:
                config = json.load(f)
        if config.get("num_heads", 1) != 1 or config.get("num_fc_layers", 1) != 1:
            raise ValueError(f"{spec.name}: {config_file} asks for {config.get('num_heads')} attention heads and "
                             f"{config.get('num_fc_layers')} embedding layers; FEATHER has one of each.")
        model = cls(spec, **{k: config[k] for k in ("in_dim", "embed_dim", "attn_dim", "gate") if k in config})
        sd = {k: v for k, v in load_state_dict(path, spec.name).items() if not k.startswith("model.classifier.")}
        load_into(model, sd, spec.name, path)
        model.weights_path, model.weights_sha256 = path, file_checksum(path)
        return model

    def forward(self, batch, device="cuda"):
        h = self.model["patch_embed"](batch["features"].to(device).float())  # (B, N, embed_dim)
        attn = self.model["global_attn"]
        a = attn["attention_a"](h)
        if "attention_b" in attn:
            a = a * attn["attention_b"](h)
        weights = torch.softmax(attn["attention_c"](a), dim=1)  # (B, N, 1): over the patches
        return (weights * h).sum(dim=1)


class RemoteCodeSlideEncoder(BaseSlideEncoder):
    """TITAN, PRISM and CARE publish their model code with the checkpoint; it is loaded from the lab's local
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
        self.model = transformers.AutoModel.from_pretrained(os.path.dirname(path), local_files_only=True,
                                                            trust_remote_code=True)
        self.weights_path, self.weights_sha256 = path, file_checksum(path)

    def forward(self, batch, device="cuda"):
        feats, coords = batch["features"].to(device), batch["coords"].to(device)
        patch_size_level0 = batch["attributes"]["patch_size_level0"]
        if self.spec.name == "titan":
            return self.model.encode_slide_from_patch_features(feats, coords, patch_size_level0)
        if self.spec.name == "care":  # how many patches each slide has, and their grid cells
            n = torch.full((feats.shape[0],), feats.shape[1], device=device)
            return self.model(feats, n, coords // int(patch_size_level0)).wsi_embedding
        return self.model.slide_representations(feats)["image_embedding"]


# -- slide encoders whose model code comes from a package or a cloned repository -----------------------

def _require(spec: SlideEncoderSpec) -> None:
    if importlib.util.find_spec(spec.package) is None:
        raise MissingCodeError(f"The '{spec.name}' slide encoder", spec.package, f"Install it: {spec.install}")


class GigaPathSlideEncoder(BaseSlideEncoder):
    """Prov-GigaPath's LongNet slide encoder, built by the gigapath package from the lab's ``slide_encoder.pth``.

    Each patch sits on a grid of ``patch_size_level0`` tiles (TRIDENT's placement); the output is the
    mean-pooled, normed state after ``layer``: 768-d. TRIDENT takes 11 of 12 blocks, as prov-gigapath's own
    fine-tuning recipe does by default (``--feat_layer 11``), so 11 stays the default; ``layer=12`` gives
    what upstream's inference helper calls "last_layer_embed"."""

    def __init__(self, spec, weights_path=None, pretrained=True, layer: int = 11):
        super().__init__(spec)
        _require(spec)
        from gigapath import slide_encoder

        # A local path never triggers gigapath's download; "" asks it for random weights.
        path = find_weights(spec.name, weights_path, spec.hub_repo, spec.weight_files) if pretrained else ""
        self.model = slide_encoder.create_model(path, "gigapath_slide_enc12l768d", 1536, global_pool=True)
        self.layer = layer
        if path:
            self.weights_path, self.weights_sha256 = path, file_checksum(path)

    def forward(self, batch, device="cuda"):
        tile = int(batch["attributes"]["patch_size_level0"])
        # gigapath divides coordinates by 256 to find grid cells: hand it cells of ``tile`` pixels instead.
        coords = torch.div(batch["coords"].to(device), tile, rounding_mode="floor") * 256
        return self.model(batch["features"].to(device), coords, all_layer_embed=True)[self.layer]


@contextlib.contextmanager
def _inside(folder: str):
    """CHIEF's code imports its sibling modules and reads model_weight/ relative to the working directory."""
    sys.path.insert(0, folder)
    try:
        with contextlib.chdir(folder):
            yield
    finally:
        sys.path.remove(folder)


class CHIEFSlideEncoder(BaseSlideEncoder):
    """CHIEF from a clone of hms-dbmi/CHIEF (it is not a package): ``models.CHIEF.CHIEF`` (small, gated
    attention) with ``model_weight/CHIEF_pretraining.pth`` loaded strictly. Output: the attention-weighted sum
    of the slide's CTransPath features, 768-d (independent of the organ index)."""

    def __init__(self, spec, weights_path=None, pretrained=True):
        super().__init__(spec)
        try:  # weights_path: the clone, or its model_weight/CHIEF_pretraining.pth
            path = find_weights(spec.name, weights_path, None, spec.weight_files)
        except WeightsNotFoundError as e:
            raise MissingCodeError(f"The '{spec.name}' slide encoder", spec.package, f"{e} {spec.install}") from e
        repo = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        code = os.path.join(repo, "models", "CHIEF.py")
        if not os.path.isfile(code):
            raise MissingCodeError(f"The '{spec.name}' slide encoder", spec.package,
                                   f"{code} does not exist. {spec.install}")
        with _inside(repo):
            module_spec = importlib.util.spec_from_file_location("trident_chief_model", code)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            self.model = module.CHIEF(size_arg="small", dropout=True, n_classes=2)
        if pretrained:
            load_into(self.model, load_state_dict(path, spec.name), spec.name, path)
            self.weights_path, self.weights_sha256 = path, file_checksum(path)

    def forward(self, batch, device="cuda"):
        organ = torch.tensor([0], device=device)  # CHIEF's slide feature does not depend on it
        return torch.cat([self.model(f, organ)["WSI_feature"].reshape(1, -1)
                          for f in batch["features"].to(device)])


class MadeleineSlideEncoder(BaseSlideEncoder):
    """MADELEINE's H&E slide embedder (over CONCH v1 features): the package's ``MADELEINE`` model built from
    ``model_config.json`` and loaded strictly from ``model.pt`` in the same folder. Loaded here rather than
    through its factory, which always calls the hub, places the model on "cuda" and unpickles freely: 512-d."""

    def __init__(self, spec, weights_path=None, pretrained=True):
        super().__init__(spec)
        _require(spec)
        from madeleine.models.Model import MADELEINE

        config_path = find_weights(spec.name, weights_path, spec.hub_repo, spec.weight_files)
        folder = os.path.dirname(config_path)
        with open(os.path.join(folder, "model_config.json")) as f:
            config = Namespace(**json.load(f))
        self.model = MADELEINE(config, stain_encoding=False)
        # The config names the precision it was trained in ("float64", "float32" or "bfloat16").
        self.precision = torch.bfloat16 if getattr(config, "precision", "") == "bfloat16" else torch.float32
        if pretrained:
            path = os.path.join(folder, "model.pt")
            sd = load_state_dict(path, spec.name)
            sd = {k.removeprefix("module."): v for k, v in sd.items()}  # DataParallel keys
            load_into(self.model, sd, spec.name, path)
            self.weights_path, self.weights_sha256 = path, file_checksum(path)

    def forward(self, batch, device="cuda"):
        return self.model.encode_he(batch["features"].to(device), device)


def _threads(spec, **kwargs):
    raise MissingCodeError(f"The '{spec.name}' slide encoder", spec.package, spec.install)


PACKAGE_ENCODERS = {"gigapath": GigaPathSlideEncoder, "chief": CHIEFSlideEncoder,
                    "madeleine": MadeleineSlideEncoder, "threads": _threads}


def encoder_factory(model_name: str, pretrained: bool = True, freeze: bool = True,
                    weights_path: str | os.PathLike | None = None, **kwargs) -> BaseSlideEncoder:
    """Build a slide encoder. ``mean-<patch encoder>`` and ``abmil`` (untrained) need no weights; pretrained ones
    load from ``weights_path`` or the local caches, or fail with an error that says how to supply them."""
    spec = slide_encoder_spec(model_name)
    if spec.kind == "mean":
        model = MeanSlideEncoder(spec)
    elif spec.kind == "abmil":
        if pretrained:  # as TRIDENT: there are no weights to load, it is built to be trained
            raise ValueError("abmil has no published weights: build it with pretrained=False to train it.")
        model = ABMILSlideEncoder(spec, **kwargs)
    elif spec.kind == "feather" and pretrained:
        model = FeatherSlideEncoder.from_folder(spec, weights_path)
    elif spec.kind == "feather":
        model = FeatherSlideEncoder(spec, **kwargs)
    elif spec.kind == "remote_code":
        model = RemoteCodeSlideEncoder(spec, weights_path, **kwargs)
    else:
        model = PACKAGE_ENCODERS[spec.name](spec, weights_path=weights_path, pretrained=pretrained, **kwargs)
    if freeze:
        model.eval()
        for p in model.parameters():
            p.requires_grad = False
    return model


__all__ = [
    "SPECS",
    "ABMILSlideEncoder",
    "BaseSlideEncoder",
    "FeatherSlideEncoder",
    "CHIEFSlideEncoder",
    "GigaPathSlideEncoder",
    "MadeleineSlideEncoder",
    "MeanSlideEncoder",
    "SlideEncoderSpec",
    "encoder_factory",
    "slide_encoder_spec",
    "slide_to_patch_encoder_name",
]
