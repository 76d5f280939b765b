"""Weights as labs download them (issue 15). Each test writes a small random checkpoint in the layout the
model's published file has (shared/checkpoints.md: container keys, prefixes, extra or dropped keys, old stage
layouts, position grids), loads it through the public factory, and compares the output with a reference
built from the facts (TRIDENT's architecture kwargs and token rule), not from our own spec. Architectures are
shrunk (fewer blocks, narrower) where the builder allows; key names and containers are the real ones."""

from __future__ import annotations

import argparse
import json
import math
import re

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from timm.layers import SwiGLUPacked
from torch import nn

from trident_lib import slide_encoder_models as se
from trident_lib.patch_encoder_models import REGISTRY, encoder_factory
from trident_lib.segmentation_models import segmentation_model_factory
from trident_lib.weights import UnsafeCheckpointError, load_state_dict

SMALL = {"depth": 2, "embed_dim": 96, "num_heads": 4}  # 96 keeps SwiGLU hidden sizes even (96 * 5.33334 = 512)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights that make every tensor matter: LayerScale / norm scales near 1 (not timm's 1e-5, which
    would hide a misplaced block), fan-in scaled matrices, positive BN variances."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if not v.is_floating_point():
                continue
            r = torch.randn(v.shape, generator=g)
            if k.endswith("running_var"):
                v.copy_(r.abs() * 0.2 + 0.8)
            elif v.dim() == 1 and k.endswith(("weight", "gamma", "lambda1")):
                v.copy_(1 + 0.1 * r)
            elif v.dim() >= 2 and not k.endswith(("pos_embed", "position_embeddings", "token", "tokens")):
                v.copy_(r / math.sqrt(v[0].numel()))
            else:
                v.copy_(0.1 * r)
    return model.eval()


def image(seed=0, size=224, batch=2):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- CTransPath: CHIEF_CTransPath.pth --------------------------------------------------------------------

def chief_ctranspath_layout() -> dict[str, tuple]:
    """Key -> shape of CHIEF's file, from the facts: a timm 0.5 Swin-T (depths 2-2-6-2, 96-768 wide, window 7)
    with the ConvStem (3->12->24 convs with BN, 1x1 to 96, LayerNorm), no head, stage i's patch merging at
    the end of stage i, persistent relative_position_index buffers, and attn_mask buffers in the 5 shifted
    blocks whose stage is larger than one window."""
    out = {"patch_embed.proj.0.weight": (12, 3, 3, 3), "patch_embed.proj.3.weight": (24, 12, 3, 3),
           "patch_embed.proj.6.weight": (96, 24, 1, 1), "patch_embed.proj.6.bias": (96,),
           "patch_embed.norm.weight": (96,), "patch_embed.norm.bias": (96,), "norm.weight": (768,), "norm.bias": (768,)}
    for i, c in (("1", 12), ("4", 24)):
        out |= {f"patch_embed.proj.{i}.{p}": (c,) for p in ("weight", "bias", "running_mean", "running_var")}
        out[f"patch_embed.proj.{i}.num_batches_tracked"] = ()
    for s, (depth, dim, heads, res) in enumerate(zip((2, 2, 6, 2), (96, 192, 384, 768), (3, 6, 12, 24),
                                                     (56, 28, 14, 7))):
        for b in range(depth):
            p = f"layers.{s}.blocks.{b}."
            out |= {p + "norm1.weight": (dim,), p + "norm1.bias": (dim,), p + "norm2.weight": (dim,),
                    p + "norm2.bias": (dim,), p + "attn.relative_position_bias_table": (169, heads),
                    p + "attn.relative_position_index": (49, 49), p + "attn.qkv.weight": (3 * dim, dim),
                    p + "attn.qkv.bias": (3 * dim,), p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
                    p + "mlp.fc1.weight": (4 * dim, dim), p + "mlp.fc1.bias": (4 * dim,),
                    p + "mlp.fc2.weight": (dim, 4 * dim), p + "mlp.fc2.bias": (dim,)}
            if b % 2 and res > 7:
                out[p + "attn_mask"] = ((res // 7) ** 2, 49, 49)
        if s < 3:
            out |= {f"layers.{s}.downsample.reduction.weight": (2 * dim, 4 * dim),
                    f"layers.{s}.downsample.norm.weight": (4 * dim,), f"layers.{s}.downsample.norm.bias": (4 * dim,)}
    return out


def test_ctranspath_loads_chiefs_file(tmp_path):
    layout = chief_ctranspath_layout()
    assert len(layout) == 200 and sorted(k for k in layout if "attn_mask" in k) == [
        f"layers.{s}.blocks.{b}.attn_mask" for s, b in ((0, 1), (1, 1), (2, 1), (2, 3), (2, 5))]
    ref = randomize(encoder_factory("ctranspath", pretrained=False).model)
    published = {}
    for k, v in ref.state_dict().items():  # our timm layout -> the old one: merging moves back one stage
        published[re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)] = v
    for k, shape in layout.items():
        if k.endswith(("relative_position_index", "attn_mask")):
            published[k] = torch.randint(0, 169, shape) if k.endswith("index") else torch.zeros(shape)
    assert {k: tuple(v.shape) for k, v in published.items()} == layout
    torch.save({"model": published}, tmp_path / "CHIEF_CTransPath.pth")

    enc = encoder_factory("ctranspath", weights_path=tmp_path / "CHIEF_CTransPath.pth")
    x = image()
    with torch.no_grad():
        assert torch.equal(enc(x), ref(x)) and enc(x).shape == (2, 768)


# -- HEST: deeplabv3_seg_v4.ckpt (Lightning) -------------------------------------------------------------

def test_hest_loads_the_lightning_checkpoint(tmp_path):
    from torchvision.models.segmentation import deeplabv3_resnet50

    # The trained net had an auxiliary classifier; the Lightning module held it as "model".
    net = randomize(deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=2, aux_loss=True))
    ckpt = {"epoch": 41, "global_step": 12000, "pytorch-lightning_version": "1.9.0",
            "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}],
            "lr_schedulers": [], "hyper_parameters": {"lr": 1e-4, "batch_size": 16}}
    assert sum("aux_classifier" in k for k in ckpt["state_dict"]) > 0
    torch.save(ckpt, tmp_path / "deeplabv3_seg_v4.ckpt")

    seg = segmentation_model_factory("hest", weights_path=tmp_path / "deeplabv3_seg_v4.ckpt", confidence_thresh=0.4)
    x = image(size=64, batch=1)
    with torch.no_grad():
        logits = net(x)["out"]
        assert torch.equal(seg.model(x)["out"], logits)
        assert torch.equal(seg(x), (torch.softmax(logits, 1)[:, 1] > 0.4).to(torch.uint8))  # P(class 1) > thresh


# -- GrandQC: flat smp state dicts, JPEG re-encode, class-0 rule --------------------------------------------

def test_grandqc_files_transforms_and_rule(tmp_path):
    import cv2
    import segmentation_models_pytorch as smp

    tissue = randomize(smp.UnetPlusPlus(encoder_name="timm-efficientnet-b0", encoder_weights=None, classes=2,
                                        activation=None))
    torch.save(tissue.state_dict(), tmp_path / "Tissue_Detection_MPP10.pth")
    seg = segmentation_model_factory("grandqc", weights_path=tmp_path / "Tissue_Detection_MPP10.pth",
                                     confidence_thresh=0.3)
    x = image(size=64, batch=1)
    with torch.no_grad():
        assert torch.equal(seg.model(x), tissue(x))
    # Tissue = class 0 wins AND its probability >= thresh; with thresh < 0.5 winning is what matters.
    seg.model = nn.Identity()
    p0 = torch.tensor([0.2, 0.3, 0.45, 0.5, 0.9])
    logits = torch.stack([p0.log(), (1 - p0).log()])[None, :, None, :]  # (1, 2, 1, 5)
    assert seg(logits).flatten().tolist() == [0, 0, 0, 1, 1]
    # The tile is JPEG-encoded at quality 80 and decoded (OpenCV, channel order kept) before normalising.
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpeg = cv2.imdecode(cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, 80])[1], cv2.IMREAD_COLOR)
    mean, std = (torch.tensor(v)[:, None, None] for v in IMAGENET)

    def normalised(a):
        return (torch.from_numpy(a).permute(2, 0, 1).float() / 255 - mean) / std

    assert torch.allclose(seg.eval_transforms(Image.fromarray(rgb)), normalised(jpeg), atol=1e-6)

    artifacts = randomize(smp.Unet(encoder_name="timm-efficientnet-b0", encoder_weights=None, classes=8,
                                   activation=None))
    torch.save(artifacts.state_dict(), tmp_path / "GrandQC_MPP1_state_dict.pth")
    art = segmentation_model_factory("grandqc_artifact", weights_path=tmp_path / "GrandQC_MPP1_state_dict.pth")
    with torch.no_grad():
        assert torch.equal(art.model(x), artifacts(x))
    # No JPEG step for the artifact model.
    assert torch.allclose(art.eval_transforms(Image.fromarray(rgb)), normalised(rgb), atol=1e-6)
    art.model = nn.Identity()
    classes = torch.arange(8)
    onehot = F.one_hot(classes, 8).T[None, :, None, :].float()  # (1, 8, 1, 8): pixel i predicts class i
    assert art(onehot).flatten().tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    art.remove_penmarks_only = True
    assert art(onehot).flatten().tolist() == [1, 1, 1, 1, 0, 1, 1, 0]


# -- timm ViTs: the hub / local files hold timm's keys for the arch TRIDENT builds -------------------------

def swiglu():
    return {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}


def pooled(out):  # timm's global_pool "token": the normed class token
    return out


def cls_mean(skip):
    return lambda t: torch.cat([t[:, 0], t[:, skip:].mean(1)], dim=-1)


KAIKO_ARCHS = {"kaiko-vits16": "vit_small_patch16_224", "kaiko-vits8": "vit_small_patch8_224",
               "kaiko-vitb16": "vit_base_patch16_224", "kaiko-vitb8": "vit_base_patch8_224",
               "kaiko-vitl14": "vit_large_patch14_reg4_dinov2"}
# name -> (timm arch, kwargs TRIDENT passes, output from model(x), published file name), per checkpoints.md §1.
TIMM_FACTS = {
    "uni_v1": ("vit_large_patch16_224", dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                                             dynamic_img_size=True), pooled, "pytorch_model.bin"),
    "uni_v2": ("vit_giant_patch14_224", dict(img_size=224, patch_size=14, init_values=1e-5, mlp_ratio=2.66667 * 2,
                                             num_classes=0, no_embed_class=True, reg_tokens=8,
                                             dynamic_img_size=True, **swiglu()), pooled, "pytorch_model.bin"),
    "gigapath": ("vit_giant_patch14_dinov2", dict(img_size=224, in_chans=3, patch_size=16, mlp_ratio=5.33334,
                                                  num_classes=0, dynamic_img_size=True), pooled, "pytorch_model.bin"),
    "virchow": ("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375,
                                             global_pool="", dynamic_img_size=True, **swiglu()), cls_mean(1),
                "pytorch_model.bin"),
    "virchow2": ("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375,
                                              global_pool="", dynamic_img_size=True, reg_tokens=4, **swiglu()),
                 cls_mean(5), "pytorch_model.bin"),
    "hoptimus0": ("vit_giant_patch14_reg4_dinov2", dict(num_classes=0, img_size=224, global_pool="token",
                                                        init_values=1e-5, dynamic_img_size=True), pooled,
                  "pytorch_model.bin"),
    "hoptimus1": ("vit_giant_patch14_reg4_dinov2", dict(num_classes=0, img_size=224, global_pool="token",
                                                        init_values=1e-5, dynamic_img_size=True), pooled,
                  "pytorch_model.bin"),
    "h0-mini": ("vit_base_patch14_reg4_dinov2", dict(img_size=224, dynamic_img_size=True, num_classes=0,
                                                     global_pool="", **swiglu()), lambda t: t[:, 0],
                "model.safetensors"),
    "gpfm": ("vit_large_patch14_dinov2", dict(img_size=224, init_values=1e-5, dynamic_img_size=True, num_classes=0),
             pooled, "GPFM.pth"),
    "lunit-vits8": ("vit_small_patch8_224", dict(img_size=224, dynamic_img_size=True, num_classes=0), pooled,
                    "model.safetensors"),
    **{name: (arch, dict(num_classes=0, dynamic_img_size=True, img_size=518 if name.endswith("l14") else 224), pooled,
              "model.safetensors") for name, arch in KAIKO_ARCHS.items()},
}


def save(sd: dict, path) -> None:
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)


@pytest.mark.parametrize("name", sorted(TIMM_FACTS))
def test_timm_vits_load_their_published_files(name, tmp_path):
    arch, kwargs, output, filename = TIMM_FACTS[name]
    ref = randomize(timm.create_model(arch, pretrained=False, **{**kwargs, **SMALL}))
    sd = ref.state_dict()
    if name == "gpfm":  # a training script's dict: the weights under "state_dict", plus plain data
        sd = {"state_dict": sd, "epoch": np.int64(99), "args": argparse.Namespace(lr=1e-4, arch=arch)}
    save(sd, tmp_path / filename)
    enc = encoder_factory(name, weights_path=tmp_path / filename, **SMALL)
    x = image()
    with torch.no_grad():
        want = output(ref(x))  # TRIDENT: kaiko-vitl14 is built at 518 and resamples its grid on each 224 input
        got = enc(x)
    assert got.shape == want.shape == (2, (2 if name.startswith("virchow") else 1) * SMALL["embed_dim"])
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_a_position_grid_of_another_size_is_resampled_as_timm_does(tmp_path):
    # uni_v1's file at 448 px (28 x 28): timm's hub loader resizes it to the model's 14 x 14 grid on load.
    from timm.layers import resample_abs_pos_embed

    big = randomize(timm.create_model("vit_large_patch16_224", img_size=448, init_values=1e-5, num_classes=0,
                                      **SMALL))
    torch.save(big.state_dict(), tmp_path / "pytorch_model.bin")
    enc = encoder_factory("uni_v1", weights_path=tmp_path / "pytorch_model.bin", **SMALL)
    want = resample_abs_pos_embed(big.pos_embed, new_size=[14, 14], num_prefix_tokens=1)
    assert torch.equal(enc.model.pos_embed, want)


def dinov2_reference(sd: dict, x: torch.Tensor, heads: int, patch: int = 14) -> torch.Tensor:
    """DINOv2 with registers as torch.hub builds it (OpenMidnight's backbone), on DINOv2-native weights: the
    class token gets the position table's first slot, patches the rest (resampled bicubic + antialias to the
    input grid), registers none; SwiGLU MLP w12 -> silu(a) * b -> w3; normed class token out."""
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    pos = sd["pos_embed"]
    side, dim, n = math.isqrt(pos.shape[1] - 1), pos.shape[-1], x.shape[-1] // patch
    grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(n, n), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, n * n, dim)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1) + pos[:, :1], t + grid], 1)
    t = torch.cat([t[:, :1], sd["register_tokens"].expand(len(x), -1, -1), t[:, 1:]], 1)
    b = 0
    while f"blocks.{b}.norm1.weight" in sd:
        p = {k[len(f"blocks.{b}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{b}.")}.__getitem__
        h = F.layer_norm(t, (dim,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        q, k, v = F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias")).unflatten(-1, (3, heads, -1)).permute(
            2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        t = t + p("ls1.gamma") * F.linear(a, p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(t, (dim,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        u, g = F.linear(h, p("mlp.w12.weight"), p("mlp.w12.bias")).chunk(2, dim=-1)
        t = t + p("ls2.gamma") * F.linear(F.silu(u) * g, p("mlp.w3.weight"), p("mlp.w3.bias"))
        b += 1
    return F.layer_norm(t, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)[:, 0]


def test_openmidnight_loads_dinov2_native_teacher_weights(tmp_path):
    # teacher_checkpoint_load.pt: a flat dict with DINOv2's own names, trained at 518 px (37 x 37 grid).
    d, hidden, g = SMALL["embed_dim"], 256, torch.Generator().manual_seed(3)

    def r(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (scale if scale is not None else 1 / math.sqrt(shape[-1]))

    sd = {"cls_token": r(1, 1, d, scale=0.1), "pos_embed": r(1, 1 + 37 * 37, d, scale=0.1),
          "register_tokens": r(1, 4, d, scale=0.1), "mask_token": r(1, d, scale=0.1),
          "patch_embed.proj.weight": r(d, 3, 14, 14, scale=1 / 24), "patch_embed.proj.bias": r(d, scale=0.1),
          "norm.weight": 1 + r(d, scale=0.1), "norm.bias": r(d, scale=0.1)}
    for b in range(SMALL["depth"]):
        sd |= {f"blocks.{b}.{k}": v for k, v in {
            "norm1.weight": 1 + r(d, scale=0.1), "norm1.bias": r(d, scale=0.1), "attn.qkv.weight": r(3 * d, d),
            "attn.qkv.bias": r(3 * d, scale=0.1), "attn.proj.weight": r(d, d), "attn.proj.bias": r(d, scale=0.1),
            "ls1.gamma": 1 + r(d, scale=0.1), "norm2.weight": 1 + r(d, scale=0.1), "norm2.bias": r(d, scale=0.1),
            "mlp.w12.weight": r(2 * hidden, d), "mlp.w12.bias": r(2 * hidden, scale=0.1),
            "mlp.w3.weight": r(d, hidden), "mlp.w3.bias": r(d, scale=0.1), "ls2.gamma": 1 + r(d, scale=0.1)}.items()}
    torch.save(sd, tmp_path / "teacher_checkpoint_load.pt")
    enc = encoder_factory("openmidnight", weights_path=tmp_path, **SMALL)  # arch mlp_ratio 5.33334: 2 x 256
    x = image()
    with torch.no_grad():
        got, want = enc(x), dinov2_reference(sd, x, SMALL["num_heads"])
    assert got.shape == (2, d) and torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def dinov3_reference(sd: dict, x: torch.Tensor, heads: int, rope_dtype=torch.bfloat16) -> torch.Tensor:
    """GenBio-PathFM from the facts: each RGB channel as a grey image through a DINOv3-style ViT (class token,
    storage tokens, no position table; qkv without bias; SwiGLU w1 gate, w2 up, w3 down; LayerScale), normed
    class tokens concatenated R, G, B. Rotary positions: pixel-centre coordinates scaled to [-1, 1] per axis,
    angles 2 pi c / period (rows, then columns, repeated for the two halves), rotate-half, on the patch
    tokens' queries and keys; computed in ``rope_dtype`` (GenBio: bf16, with q and k cast to it)."""
    b, c, height, width = x.shape
    g = x.reshape(b * c, 1, height, width)
    t = F.conv2d(g, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    rows, cols = t.shape[-2:]
    t = t.flatten(2).transpose(1, 2)
    dim, n = t.shape[-1], len(g)
    t = torch.cat([sd["cls_token"].expand(n, -1, -1), sd["storage_tokens"].expand(n, -1, -1), t], 1)
    prefix = 1 + sd["storage_tokens"].shape[1]
    ys, xs = (torch.arange(0.5, k, dtype=rope_dtype) / k for k in (rows, cols))
    coords = 2 * torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).flatten(0, 1) - 1
    angles = (2 * math.pi * coords[:, :, None] / sd["rope_embed.periods"].to(rope_dtype)).flatten(1).tile(2)
    cos, sin = angles.cos(), angles.sin()

    def rope(q):
        q = q.to(rope_dtype)
        q1, q2 = q[..., prefix:, :].chunk(2, dim=-1)
        rotated = q[..., prefix:, :] * cos + torch.cat([-q2, q1], -1) * sin
        return torch.cat([q[..., :prefix, :], rotated], -2).float()

    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}.__getitem__
        h = F.layer_norm(t, (dim,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        q, k, v = F.linear(h, p("attn.qkv.weight")).unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(rope(q), rope(k), v).transpose(1, 2).flatten(2)
        t = t + p("ls1.gamma") * F.linear(a, p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(t, (dim,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        ffn = F.silu(F.linear(h, p("mlp.w1.weight"), p("mlp.w1.bias"))) * F.linear(h, p("mlp.w2.weight"),
                                                                                      p("mlp.w2.bias"))
        t = t + p("ls2.gamma") * F.linear(ffn, p("mlp.w3.weight"), p("mlp.w3.bias"))
        i += 1
    return F.layer_norm(t[:, 0], (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6).reshape(b, -1)


GENBIO_HIDDEN = 256  # 96 x 4 x 2/3, rounded up to a multiple of 64


def genbio_file(seed: int = 5) -> dict:
    """model.pth as published: a flat dict with DINOv3's names, one input channel, 4 storage tokens, the
    RoPE periods in bf16, a pre-training mask token."""
    d, g = SMALL["embed_dim"], torch.Generator().manual_seed(seed)

    def r(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (scale if scale is not None else 1 / math.sqrt(shape[-1]))

    head_dim, hidden = d // SMALL["num_heads"], GENBIO_HIDDEN
    sd = {"cls_token": r(1, 1, d, scale=0.1), "storage_tokens": r(1, 4, d, scale=0.1), "mask_token": r(1, d),
          "patch_embed.proj.weight": r(d, 1, 16, 16, scale=1 / 16), "patch_embed.proj.bias": r(d, scale=0.1),
          "rope_embed.periods": (100 ** (2 * torch.arange(head_dim // 4) / (head_dim // 2))).to(torch.bfloat16),
          "norm.weight": 1 + r(d, scale=0.1), "norm.bias": r(d, scale=0.1)}
    for b in range(SMALL["depth"]):
        sd |= {f"blocks.{b}.{k}": v for k, v in {
            "norm1.weight": 1 + r(d, scale=0.1), "norm1.bias": r(d, scale=0.1), "attn.qkv.weight": r(3 * d, d),
            "attn.proj.weight": r(d, d), "attn.proj.bias": r(d, scale=0.1), "ls1.gamma": 1 + r(d, scale=0.1),
            "norm2.weight": 1 + r(d, scale=0.1), "norm2.bias": r(d, scale=0.1), "mlp.w1.weight": r(hidden, d),
            "mlp.w1.bias": r(hidden, scale=0.1), "mlp.w2.weight": r(hidden, d), "mlp.w2.bias": r(hidden, scale=0.1),
            "mlp.w3.weight": r(d, hidden), "mlp.w3.bias": r(d, scale=0.1), "ls2.gamma": 1 + r(d, scale=0.1)}.items()}
    return sd


def test_genbio_pathfm_loads_its_model_pth(tmp_path):
    sd = genbio_file()
    torch.save(sd, tmp_path / "model.pth")
    enc = encoder_factory("genbio-pathfm", weights_path=tmp_path / "model.pth", **SMALL)
    x = image()
    with torch.no_grad():
        got, want = enc(x), dinov3_reference(sd, x, SMALL["num_heads"])
        fp32_rope = dinov3_reference(sd, x, SMALL["num_heads"], rope_dtype=torch.float32)
    assert got.shape == (2, 3 * SMALL["embed_dim"]) and torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, fp32_rope, atol=1e-4)  # GenBio's bf16 rotary embedding is kept


def test_genbio_pathfm_architecture_matches_timms_dinov3_port():
    # A third-party build of the same architecture: timm's DINOv3 port (Eva) with its own key conversion,
    # which computes the rotary embedding in fp32, as our module does with rope_dtype=float32.
    from functools import partial

    from timm.models.eva import checkpoint_filter_fn

    from trident_lib.patch_encoder_models.genbio import GenBioPathFM

    sd = genbio_file(seed=6)
    ours = GenBioPathFM(rope_dtype=torch.float32, **SMALL).eval()
    ours.load_state_dict({k: v for k, v in sd.items() if k != "mask_token"}, strict=True)
    ours.rope_embed.periods.copy_(100 ** (2 * torch.arange(6) / 12))  # timm computes the periods in fp32
    eva = timm.create_model("vit_large_patch16_dinov3", pretrained=False, num_classes=0, global_pool="token",
                            in_chans=1, swiglu_mlp=True, swiglu_align_to=64, mlp_ratio=GENBIO_HIDDEN / 96,
                            norm_layer=partial(nn.LayerNorm, eps=1e-6), **SMALL).eval()
    eva.load_state_dict(checkpoint_filter_fn(sd, eva), strict=True)
    x = image(seed=2)
    with torch.no_grad():
        got, want = ours(x), eva(x.reshape(6, 1, 224, 224)).reshape(2, -1)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_resnet50_loads_timm_and_torchvision_files(tmp_path):
    import torchvision

    # timm/resnet50.tv_in1k's model.safetensors: the whole net, classifier included.
    full = randomize(timm.create_model("resnet50", pretrained=False))
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "model.safetensors"))
    enc = encoder_factory("resnet50", weights_path=tmp_path)
    # TRIDENT: features_only with out_indices [3] (layer3, 1024 channels), average pooled.
    trunk = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=[3])
    trunk.load_state_dict(full.state_dict(), strict=False)
    x = image(batch=1)
    with torch.no_grad():
        want = trunk.eval()(x)[0].mean(dim=(2, 3))
        assert want.shape == (1, 1024) and torch.allclose(enc(x), want, atol=1e-5)
    # torchvision's resnet50-*.pth uses the same names.
    tv = randomize(torchvision.models.resnet50(weights=None), seed=1)
    torch.save(tv.state_dict(), tmp_path / "resnet50-11ad3fa6.pth")
    enc = encoder_factory("resnet50", weights_path=tmp_path / "resnet50-11ad3fa6.pth")
    with torch.no_grad():
        h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        assert torch.allclose(enc(x), tv.layer3(tv.layer2(tv.layer1(h))).mean(dim=(2, 3)), atol=1e-5)


# -- transformers models: a save_pretrained folder ----------------------------------------------------------

HF_SMALL = dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4)


@pytest.mark.parametrize("name,model_cls,config_cls,config,output", [
    ("phikon", "ViTModel", "ViTConfig", dict(intermediate_size=384, image_size=224, patch_size=16),
     lambda t: t[:, 0]),  # saved with its pooler, which the factory drops
    # phikon-v2's config may name another image_size: the model keeps the file's grid and resamples it per input.
    ("phikon_v2", "Dinov2Model", "Dinov2Config", dict(mlp_ratio=4, patch_size=14, image_size=518),
     lambda t: t[:, 0]),
    # hibou-L's folder: SwiGLU, LayerScale 1.0, 4 registers; its config.json names its own model code.
    ("hibou_l", "Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
     dict(mlp_ratio=4, patch_size=14, image_size=224, num_register_tokens=4, use_swiglu_ffn=True,
          layerscale_value=1.0), lambda t: t[:, 0]),
    ("midnight12k", "Dinov2Model", "Dinov2Config", dict(mlp_ratio=4, patch_size=14, image_size=224,
                                                        use_swiglu_ffn=True), cls_mean(1)),
])
def test_transformers_folders(name, model_cls, config_cls, config, output, tmp_path):
    import transformers

    ref = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**HF_SMALL, **config))
    randomize(ref).save_pretrained(tmp_path)  # config.json + model.safetensors, as on the hub
    if name == "hibou_l":
        config_file = tmp_path / "config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_type": "dinov2",
                                           "architectures": ["Dinov2ModelWithRegisters"], "auto_map": {
                                               "AutoModel": "modeling_dinov2.Dinov2ModelWithRegisters"}}))
    overrides = {"intermediate_size": 384} if name == "phikon" else {}
    enc = encoder_factory(name, weights_path=tmp_path / "model.safetensors", **HF_SMALL, **overrides)
    x = image()
    with torch.no_grad():
        want = output(ref(pixel_values=x).last_hidden_state)
        assert torch.allclose(enc(x), want, atol=1e-5)


# -- pickles: never unpickled silently ------------------------------------------------------------------

class TrainerState:
    """A class a training script pickled next to the weights."""

    def __init__(self):
        self.step = 3


class Boom:
    def __reduce__(self):
        import os

        return (os.mkdir, (self.path,))


def test_pickled_checkpoints_are_refused_with_a_way_out(tmp_path):
    from trident_lib.batch import main

    ref = randomize(timm.create_model("vit_large_patch14_dinov2", img_size=224, init_values=1e-5, num_classes=0,
                                      **SMALL))
    torch.save({"state_dict": ref.state_dict(), "trainer": TrainerState()}, tmp_path / "GPFM.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"TrainerState.*convert-weights .*GPFM.pth .*--trust"):
        encoder_factory("gpfm", weights_path=tmp_path / "GPFM.pth", **SMALL)
    # A file that would run code when unpickled is refused before anything runs.
    boom = Boom()
    boom.path = str(tmp_path / "pwned")
    torch.save({"model": ref.state_dict(), "x": boom}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="os.mkdir|posix.mkdir"):
        load_state_dict(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()

    # convert-weights: refused without --trust; with it, a safetensors file that loads like the original.
    assert main(["convert-weights", str(tmp_path / "GPFM.pth"), str(tmp_path / "gpfm.safetensors")]) == 1
    assert not (tmp_path / "gpfm.safetensors").exists()
    assert main(["convert-weights", str(tmp_path / "GPFM.pth"), str(tmp_path / "gpfm.safetensors"), "--trust"]) == 0
    enc = encoder_factory("gpfm", weights_path=tmp_path / "gpfm.safetensors", **SMALL)
    x = image(batch=1)
    with torch.no_grad():
        assert torch.equal(enc(x), ref(x))


# -- the output side: per model, what TRIDENT returns and how it prepares patches ----------------------------

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5,) * 3, (0.5,) * 3)
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HOPT = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
GENBIO = ((0.697, 0.575, 0.728), (0.188, 0.240, 0.187))
# name: (dim, precision, resize, interpolation, centre crop (None: no crop), mean/std); resize (n, n) = squash.
# None for transforms that come from the hub config or a processor, not from TRIDENT (checkpoints.md §1, §4).
OUTPUT_FACTS = {
    "conch_v1": (512, "fp32", (448, "bicubic", 448, CLIP)),
    "conch_v15": (768, "fp16", (448, "bilinear", 448, IMAGENET)),
    "uni_v1": (1024, "fp16", (224, "bilinear", 224, IMAGENET)),
    "uni_v2": (1536, "bf16", (224, "bilinear", 224, IMAGENET)),
    "ctranspath": (768, "fp32", (224, "bilinear", None, IMAGENET)),
    "phikon": (768, "fp32", (224, "bilinear", None, IMAGENET)),
    "phikon_v2": (1024, "fp32", (224, "bilinear", 224, IMAGENET)),
    "resnet50": (1024, "fp32", (224, "bilinear", 224, IMAGENET)),
    "keep": (768, "fp16", (224, "bicubic", 224, IMAGENET)),
    "gigapath": (1536, "fp16", (256, "bicubic", 224, IMAGENET)),
    "virchow": (2560, "fp16", (224, "bicubic", None, IMAGENET)),
    "virchow2": (2560, "fp16", (224, "bicubic", None, IMAGENET)),
    "hoptimus0": (1536, "fp16", (224, "bilinear", None, HOPT)),
    "hoptimus1": (1536, "fp16", (224, "bilinear", None, HOPT)),
    "h0-mini": (768, "fp16", None),
    "musk": (1024, "fp16", (384, "bicubic", 384, HALF)),
    "openmidnight": (1536, "fp16", ((224, 224), "bilinear", None, IMAGENET)),
    "gpfm": (1024, "fp16", (224, "bicubic", None, IMAGENET)),
    "hibou_l": (1024, "fp32", (224, "bicubic", None, HIBOU)),
    "kaiko-vits16": (384, "fp32", (224, "bilinear", 224, HALF)),
    "kaiko-vits8": (384, "fp32", (224, "bilinear", 224, HALF)),
    "kaiko-vitb16": (768, "fp32", (224, "bilinear", 224, HALF)),
    "kaiko-vitb8": (768, "fp32", (224, "bilinear", 224, HALF)),
    "kaiko-vitl14": (1024, "fp32", (224, "bilinear", 224, HALF)),
    "lunit-vits8": (384, "fp32", None),
    "genbio-pathfm": (4608, "bf16", (224, "bilinear", None, GENBIO)),
    "gemma4-e4b": (768, "bf16", None),
    "gemma4-26b": (1152, "bf16", None),
    "midnight12k": (3072, "fp16", (224, "bilinear", 224, HALF)),  # README's 3072 (class + mean), not the code's 1536
}


def describe(transforms) -> tuple:
    from torchvision import transforms as T

    steps = {type(t): t for t in transforms.transforms}
    resize, norm = steps[T.Resize], steps[T.Normalize]
    size = tuple(resize.size) if isinstance(resize.size, (list, tuple)) else resize.size
    assert resize.antialias
    crop = steps[T.CenterCrop].size[0] if T.CenterCrop in steps else None
    return (size, resize.interpolation.value, crop, (tuple(norm.mean), tuple(norm.std)))


@pytest.mark.parametrize("name", sorted(OUTPUT_FACTS))
def test_output_facts(name):
    from trident_lib.patch_encoder_models import eval_transforms

    dim, precision, transforms = OUTPUT_FACTS[name]
    spec = REGISTRY[name]
    assert (spec.dim, spec.precision) == (dim, precision)
    if spec.requires and spec.requires != ("transformers",) or spec.from_folder:
        t = eval_transforms(spec.size, spec.norm, spec.resize, spec.interpolation, spec.crop, spec.squash)
    else:
        with torch.device("meta"):
            enc = encoder_factory(name, pretrained=False)
        t = enc.eval_transforms
        assert enc.embedding_dim == dim and enc.precision == {"fp32": torch.float32, "fp16": torch.float16,
                                                              "bf16": torch.bfloat16}[precision]
    if transforms is not None:
        assert describe(t) == transforms
        resize, _, crop, _ = transforms
        out = t(Image.new("RGB", (300, 260)))  # a non-square patch shows shorter-side resize vs squash vs crop
        want = (crop, crop) if crop else resize if isinstance(resize, tuple) else (resize, int(resize * 300 / 260))
        assert tuple(out.shape[1:]) == want


def test_segmenter_and_slide_encoder_facts():
    from trident_lib.segmentation_models import SEGMENTERS

    # segmenter: (magnification, tile, precision); JPEG step and class rules: test_grandqc_files_transforms_and_rule
    for name, (mag, tile, precision) in {"hest": (10, 512, torch.float16), "grandqc": (1, 512, torch.float16),
                                         "grandqc_artifact": (10, 512, torch.float32)}.items():
        cls_ = SEGMENTERS[name]
        assert (cls_.target_mag, cls_.input_size, cls_.precision) == (mag, tile, precision)
    # slide encoder: (patch encoder, dim, precision flag)
    for name, facts in {"titan": ("conch_v15", 768, "fp16"), "prism": ("virchow", 1280, "fp16"),
                        "chief": ("ctranspath", 768, "fp32"), "gigapath": ("gigapath", 768, "fp16"),
                        "madeleine": ("conch_v1", 512, "fp32"), "feather": ("conch_v15", 512, "fp32"),
                        "feather_uni_v2": ("uni_v2", 512, "fp32"), "care": ("conch_v15", 512, "fp32")}.items():
        s = se.slide_encoder_spec(name)
        assert (s.patch_encoder, s.dim, s.precision) == facts, name
    # TRIDENT's mean-kaiko-* names do not match its patch encoder names; they resolve to the kaiko encoders.
    assert se.slide_to_patch_encoder_name["mean-kaiko-vit8s"] == "kaiko-vits8"
    enc = se.encoder_factory("mean-kaiko-vit14l")
    assert enc.embedding_dim == 1024 and se.slide_to_patch_encoder_name["mean-hoptimus1"] == "hoptimus1"


# -- FEATHER: a Hugging Face folder whose model code we do not run ------------------------------------------

@pytest.mark.parametrize("name,in_dim", [("feather", 768), ("feather_uni_v2", 1536)])
def test_feather_loads_its_published_folder(name, in_dim, tmp_path):
    """MahmoodLab/abmil.base.*.pc108-24k: config.json (MIL-Lab's ABMIL config), model code, model.safetensors
    with keys under "model." (patch_embed Linear + ReLU; gated attention a/b/c), classifier dropped."""
    g = torch.Generator().manual_seed(9)

    def r(*shape):
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])

    sd = {"model.patch_embed.0.weight": r(512, in_dim), "model.patch_embed.0.bias": r(512),
          "model.global_attn.attention_a.0.weight": r(384, 512), "model.global_attn.attention_a.0.bias": r(384),
          "model.global_attn.attention_b.0.weight": r(384, 512), "model.global_attn.attention_b.0.bias": r(384),
          "model.global_attn.attention_c.weight": r(1, 384), "model.global_attn.attention_c.bias": r(1),
          "model.classifier.weight": r(2, 512), "model.classifier.bias": r(2)}
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "abmil", "architectures": ["ABMILModel"], "gate": True, "embed_dim": 512, "attn_dim": 384,
        "num_fc_layers": 1, "dropout": 0.25, "in_dim": in_dim, "num_classes": 2, "num_heads": 1,
        "auto_map": {"AutoConfig": "modeling_abmil.ABMILGatedBaseConfig", "AutoModel": "modeling_abmil.ABMILModel"}}))
    (tmp_path / "modeling_abmil.py").write_text("raise RuntimeError('the model code ran')\n")
    enc = se.encoder_factory(name, weights_path=tmp_path)
    feats = torch.randn(1, 37, in_dim, generator=g)
    h = F.relu(F.linear(feats, sd["model.patch_embed.0.weight"], sd["model.patch_embed.0.bias"]))
    gate = torch.tanh(F.linear(h, sd["model.global_attn.attention_a.0.weight"], sd["model.global_attn.attention_a.0.bias"]))
    gate = gate * torch.sigmoid(F.linear(h, sd["model.global_attn.attention_b.0.weight"],
                                         sd["model.global_attn.attention_b.0.bias"]))
    attention = torch.softmax(F.linear(gate, sd["model.global_attn.attention_c.weight"],
                                       sd["model.global_attn.attention_c.bias"]).transpose(1, 2), dim=-1)
    want = torch.bmm(attention, h).view(1, -1)  # (1, 512)
    with torch.no_grad():
        got = enc({"features": feats}, device="cpu")
    assert got.shape == (1, 512) == want.shape and torch.allclose(got, want, atol=1e-5)
    assert enc.weights_path == str(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"in_dim": in_dim, "num_heads": 2}))
    with pytest.raises(ValueError, match="2 attention heads"):
        se.encoder_factory(name, weights_path=tmp_path)


# -- slide encoders whose model code ships with the checkpoint (TITAN, PRISM, CARE) --------------------------

REMOTE_CODE = """
import torch
from types import SimpleNamespace
from transformers import PretrainedConfig, PreTrainedModel


class TinyConfig(PretrainedConfig):
    model_type = "tiny_slide"

    def __init__(self, in_dim=8, out_dim=4, **kwargs):
        super().__init__(**kwargs)
        self.in_dim, self.out_dim = in_dim, out_dim


class TinySlideModel(PreTrainedModel):
    config_class = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.in_dim, config.out_dim)
        self.calls = []
        self.post_init()

    def encode_slide_from_patch_features(self, features, coords, patch_size_level0):  # TITAN
        self.calls.append(("titan", coords.clone(), patch_size_level0))
        return self.proj(features.mean(1))

    def slide_representations(self, features):  # PRISM
        self.calls.append(("prism",))
        return {"image_embedding": self.proj(features.mean(1))}

    def encode_image(self, images):  # KEEP
        self.calls.append(("keep",))
        return self.proj(images.mean(dim=(2, 3)).repeat(1, 3)[:, :8])

    def forward(self, features, n_values, grid):  # CARE
        self.calls.append(("care", n_values.clone(), grid.clone()))
        return SimpleNamespace(wsi_embedding=self.proj(features.mean(1)))
"""


def remote_code_folder(folder) -> None:
    """A lab's copy of a model that ships its code: config.json naming modeling_tiny.py, and that file."""
    (folder / "modeling_tiny.py").write_text(REMOTE_CODE)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "tiny_slide", "architectures": ["TinySlideModel"], "in_dim": 8, "out_dim": 4,
        "auto_map": {"AutoConfig": "modeling_tiny.TinyConfig", "AutoModel": "modeling_tiny.TinySlideModel"}}))


@pytest.mark.parametrize("name", ["titan", "prism", "care"])
def test_remote_code_slide_encoders_run_from_the_labs_folder_only_when_trusted(name, tmp_path):
    remote_code_folder(tmp_path)
    g = torch.Generator().manual_seed(4)
    weight, bias = torch.randn(4, 8, generator=g), torch.randn(4, generator=g)
    save_file({"proj.weight": weight, "proj.bias": bias}, str(tmp_path / "model.safetensors"))
    with pytest.raises(PermissionError, match="trust_remote_code"):
        se.encoder_factory(name, weights_path=tmp_path / "config.json")
    enc = se.encoder_factory(name, weights_path=tmp_path / "config.json", trust_remote_code=True)
    feats, coords = torch.randn(1, 5, 8, generator=g), torch.tensor([[[0, 0], [512, 0], [1024, 512], [0, 1024],
                                                                       [2048, 2048]]])
    with torch.no_grad():
        out = enc({"features": feats, "coords": coords, "attributes": {"patch_size_level0": 512}}, device="cpu")
    assert torch.allclose(out, F.linear(feats.mean(1), weight, bias), atol=1e-6)
    call = enc.model.calls[-1]
    assert call[0] == name
    if name == "titan":
        assert torch.equal(call[1], coords) and call[2] == 512
    if name == "care":  # the number of patches, and each patch's grid cell (coords // patch_size_level0)
        assert call[1].tolist() == [5] and call[2].tolist() == [[[0, 0], [1, 0], [2, 1], [0, 2], [4, 4]]]


def test_keep_runs_its_encode_image_from_the_labs_folder(tmp_path):
    remote_code_folder(tmp_path)
    save_file({"proj.weight": torch.eye(4, 8), "proj.bias": torch.zeros(4)}, str(tmp_path / "model.safetensors"))
    enc = encoder_factory("keep", weights_path=tmp_path, trust_remote_code=True)
    x = image()
    with torch.no_grad():
        got = enc(x)
    assert enc.model.calls == [("keep",)] and torch.allclose(got, x.mean(dim=(2, 3)).repeat(1, 3)[:, :4])


# -- doctor -----------------------------------------------------------------------------------------------

def test_doctor_loads_what_it_finds(tmp_path, monkeypatch, capsys):
    from trident_lib.batch import main

    full = randomize(timm.create_model("resnet50", pretrained=False))
    cut = {k: v for k, v in full.state_dict().items() if not k.startswith(("layer4.", "fc."))}  # small file
    torch.save(cut, tmp_path / "resnet50.pth")
    (tmp_path / "broken.bin").write_bytes(b"not a checkpoint")
    registry = tmp_path / "weights.json"
    registry.write_text(json.dumps({"resnet50": str(tmp_path / "resnet50.pth"),
                                    "kaiko-vits16": str(tmp_path / "broken.bin")}))
    monkeypatch.setenv("TRIDENT_WEIGHTS_REGISTRY", str(registry))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert main(["doctor"]) == 1  # one found file does not load
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "loads; one patch -> (1, 1024)" in lines["resnet50"] and "resnet50.pth" in lines["resnet50"]
    assert "DOES NOT LOAD" in lines["kaiko-vits16"] and "broken.bin" in lines["kaiko-vits16"]
    assert "loads; one patch -> (1, 1280)" in lines["efficientnet_lite0"]  # packaged weights
    assert "no local weights" in lines["uni_v1"] and "no local weights" in lines["hest"]
    assert main(["doctor", "--no-load"]) == 0
    assert "weights: " + str(tmp_path / "broken.bin") in capsys.readouterr().out
