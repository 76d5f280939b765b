import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

import trident_lib as tl
from trident_lib.errors import MissingDependencyError, WeightsNotFoundError
from trident_lib.extraction import slide_embedding
from trident_lib.io import read_features_h5
from trident_lib.patch_encoder_models import (REGISTRY, CustomInferenceEncoder, ResNet50InferenceEncoder,
                                              encoder_factory, eval_transforms, meta_device)
from trident_lib.patch_encoder_models.timm_family import (build_efficientnet_lite0, efficientnet_lite0_file,
                                                          load_lukemelas_by_position)
from trident_lib import slide_encoder_models as se

# The seed's table of output sizes.
SEED_DIMS = {"uni_v1": 1024, "uni_v2": 1536, "conch_v1": 512, "conch_v15": 768, "virchow": 2560, "virchow2": 2560,
             "phikon": 768, "phikon_v2": 1024, "keep": 768, "gigapath": 1536, "hoptimus0": 1536, "hoptimus1": 1536,
             "h0-mini": 768, "musk": 1024, "midnight12k": 3072, "openmidnight": 1536, "gpfm": 1024,
             "genbio-pathfm": 4608, "gemma4-e4b": 768, "gemma4-26b": 1152, "kaiko-vits16": 384, "kaiko-vits8": 384,
             "kaiko-vitb16": 768, "kaiko-vitb8": 768, "kaiko-vitl14": 1024, "lunit-vits8": 384, "hibou_l": 1024,
             "ctranspath": 768, "resnet50": 1024}
SMALL = {"resnet50", "ctranspath", "kaiko-vits16", "kaiko-vits8", "lunit-vits8", "h0-mini", "phikon",
         "efficientnet_lite0"}
BUILDABLE = sorted(n for n, s in REGISTRY.items() if not s.requires or s.requires == ("transformers",)
                   if not s.from_folder)


def test_registry_covers_the_seed():
    assert set(SEED_DIMS) <= set(REGISTRY)
    for name, dim in SEED_DIMS.items():
        assert REGISTRY[name].dim == dim, name


@pytest.mark.parametrize("name", BUILDABLE)
def test_architectures_give_their_dimension(name):
    spec = REGISTRY[name]
    x = torch.rand(2, 3, spec.size, spec.size)
    if name in SMALL:  # real forward with random weights
        enc = encoder_factory(name, pretrained=False)
        out = enc(x)
        assert torch.isfinite(out).all()
    else:  # billion-parameter models: shapes only, on the meta device
        with meta_device():
            enc = encoder_factory(name, pretrained=False)
            out = enc(x.to("meta"))
    assert tuple(out.shape) == (2, spec.dim) == (2, enc.embedding_dim)
    assert enc.enc_name == name and enc.precision in (torch.float32, torch.float16, torch.bfloat16)
    t = enc.eval_transforms(Image.new("RGB", (256, 256)))
    assert tuple(t.shape) == (3, spec.size, spec.size)


def test_transforms_and_precision_facts():
    r = encoder_factory("resnet50", pretrained=False)
    assert r.precision == torch.float32 and r.embedding_dim == 1024
    k = encoder_factory("kaiko-vits16", pretrained=False)
    x = k.eval_transforms(Image.new("RGB", (256, 256), (255, 255, 255)))
    assert torch.allclose(x, torch.ones_like(x))  # mean = std = 0.5: white -> 1
    assert REGISTRY["uni_v1"].precision == "fp16" and REGISTRY["uni_v2"].precision == "bf16"


def test_unknown_encoder_lists_known():
    with pytest.raises(ValueError, match="uni_v1.*|.*resnet50"):
        encoder_factory("nope")


@pytest.mark.parametrize("name,package", [("conch_v1", "conch"), ("musk", "musk")])
def test_missing_package_is_named(name, package):
    with pytest.raises(MissingDependencyError, match=f"'{package}'.*git\\+https://github.com/"):
        encoder_factory(name)


# CONCH v1.5's published checkpoint (checkpoints.md): ViT-L/16 trunk in timm's layout at a 14 x 14 grid,
# the contrast attentional pooler (one 768-d query over 1024-d tokens) and ln_contrast.
CONCH_V15_LAYOUT = {
    "trunk.cls_token": (1, 1, 1024), "trunk.pos_embed": (1, 197, 1024),
    "trunk.patch_embed.proj.weight": (1024, 3, 16, 16), "trunk.patch_embed.proj.bias": (1024,),
    "trunk.norm.weight": (1024,), "trunk.norm.bias": (1024,),
    "attn_pool_contrast.query": (1, 768), "attn_pool_contrast.ln_q.weight": (768,),
    "attn_pool_contrast.ln_q.bias": (768,), "attn_pool_contrast.ln_k.weight": (1024,),
    "attn_pool_contrast.ln_k.bias": (1024,), "attn_pool_contrast.to_q.weight": (768, 768),
    "attn_pool_contrast.to_kv.weight": (1536, 1024), "attn_pool_contrast.to_out.weight": (768, 768),
    "ln_contrast.weight": (768,), "ln_contrast.bias": (768,),
    **{f"trunk.blocks.{i}.{k}": shape for i in range(24) for k, shape in {
        "norm1.weight": (1024,), "norm1.bias": (1024,), "attn.qkv.weight": (3072, 1024), "attn.qkv.bias": (3072,),
        "attn.proj.weight": (1024, 1024), "attn.proj.bias": (1024,), "ls1.gamma": (1024,),
        "norm2.weight": (1024,), "norm2.bias": (1024,), "mlp.fc1.weight": (4096, 1024), "mlp.fc1.bias": (4096,),
        "mlp.fc2.weight": (1024, 4096), "mlp.fc2.bias": (1024,), "ls2.gamma": (1024,)}.items()},
}
SMALL_CONCH = {"embed_dim": 64, "depth": 2, "num_heads": 4}  # same layout, small trunk (the pooler stays 768-d)


def test_conch_v15_is_native_and_has_the_published_layout():
    spec = REGISTRY["conch_v15"]
    assert not spec.requires and spec.weight_files == ("pytorch_model_vision.bin",) and spec.precision == "fp16"
    with meta_device():
        enc = encoder_factory("conch_v15", pretrained=False)
        assert {k: tuple(v.shape) for k, v in enc.model.state_dict().items()} == CONCH_V15_LAYOUT
        assert enc(torch.rand(2, 3, 448, 448, device="meta")).shape == (2, 768)
    ls = encoder_factory("conch_v15", pretrained=False, **SMALL_CONCH).model.trunk.blocks[0].ls1.gamma
    assert torch.equal(ls, torch.ones_like(ls))  # LayerScale initialised at 1.0
    t = enc.eval_transforms(Image.new("RGB", (512, 512), (255, 255, 255)))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    assert t.shape == (3, 448, 448) and torch.allclose(t[:, 0, 0], (1 - mean) / std)  # ImageNet normalisation


def test_conch_v15_loads_the_published_file(tmp_path):
    from timm.layers import resample_abs_pos_embed

    from trident_lib.patch_encoder_models.conch_family import ConchV15

    src = ConchV15(**SMALL_CONCH).eval()
    folder = tmp_path / "models--MahmoodLab--conchv1_5"
    folder.mkdir()
    torch.save(src.state_dict(), folder / "pytorch_model_vision.bin")
    enc = encoder_factory("conch_v15", weights_path=folder, **SMALL_CONCH)  # a folder, as a pathlib.Path
    assert enc.weights_path == str(folder / "pytorch_model_vision.bin") and len(enc.weights_sha256) == 64
    x = torch.rand(2, 3, 448, 448)
    with torch.no_grad():
        out = enc(x)
        assert out.shape == (2, 768) and torch.allclose(out, src(x), atol=1e-5)
        # At 448 px the 14 x 14 grid is interpolated to 28 x 28 (+ the class token).
        assert enc.model.forward_features(x).shape == (2, 1 + 28 * 28, 64)

    # A file whose position grid differs (here 28 x 28) is resized to the model's 14 x 14 grid on load.
    big = ConchV15(img_size=448, **SMALL_CONCH).state_dict()
    torch.save(big, tmp_path / "grid28.bin")
    enc28 = encoder_factory("conch_v15", weights_path=str(tmp_path / "grid28.bin"), **SMALL_CONCH)
    want = resample_abs_pos_embed(big["trunk.pos_embed"], new_size=[14, 14], num_prefix_tokens=1,
                                  interpolation="bilinear", antialias=False)
    assert enc28.model.trunk.pos_embed.shape == (1, 197, 64) and torch.equal(enc28.model.trunk.pos_embed, want)
    assert torch.equal(enc28.model.trunk.blocks[1].attn.qkv.weight, big["trunk.blocks.1.attn.qkv.weight"])
    assert enc28(x[:1]).shape == (1, 768)

    # Strict: a file without the pooler is a clear error, not a half-random model.
    torch.save({k: v for k, v in big.items() if not k.startswith("attn_pool")}, tmp_path / "trunk_only.bin")
    with pytest.raises(ValueError, match="conch_v15.*trunk_only.bin.*missing"):
        encoder_factory("conch_v15", weights_path=tmp_path / "trunk_only.bin", **SMALL_CONCH)


def test_weights_path_accepts_pathlib(tmp_path):
    from pathlib import Path

    from safetensors.torch import save_file

    from trident_lib.errors import WeightsNotFoundError as NotFound
    from trident_lib.segmentation_models import segmentation_model_factory
    from trident_lib.weights import file_checksum, find_weights, load_state_dict

    ref = encoder_factory("resnet50", pretrained=False)
    full = {k[len("net."):]: v for k, v in ref.model.state_dict().items()}
    torch.save(full, tmp_path / "resnet50.pth")
    enc = encoder_factory("resnet50", weights_path=Path(tmp_path / "resnet50.pth"))
    x = torch.rand(1, 3, 224, 224)
    assert torch.equal(enc(x), ref(x)) and isinstance(enc.weights_path, str)
    assert find_weights("m", tmp_path / "resnet50.pth") == str(tmp_path / "resnet50.pth")
    assert set(load_state_dict(tmp_path / "resnet50.pth")) == set(full)
    assert file_checksum(tmp_path / "resnet50.pth") == enc.weights_sha256
    # Slide encoders and segmenters take paths the same way.
    ab = se.encoder_factory("feather", pretrained=False)
    save_file({k: v.contiguous() for k, v in ab.state_dict().items()}, str(tmp_path / "model.safetensors"))
    loaded = se.encoder_factory("feather", weights_path=tmp_path)
    assert loaded.weights_path == str(tmp_path / "model.safetensors")
    with pytest.raises(NotFound, match="nowhere.pth"):
        segmentation_model_factory("hest", weights_path=tmp_path / "nowhere.pth")


@pytest.mark.parametrize("name", ["uni_v1", "keep", "gemma4-e4b", "ctranspath"])
def test_offline_without_weights(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("TRIDENT_WEIGHTS_REGISTRY", raising=False)
    with pytest.raises(WeightsNotFoundError) as err:
        encoder_factory(name)
    msg = str(err.value)
    assert name in msg and "weights_path" in msg and "hub cache" in msg and "TRIDENT_WEIGHTS_REGISTRY" in msg


def test_gemma4_says_it_is_not_supported_before_loading(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text("{}")
    save_file({"model.vision_tower.x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(NotImplementedError, match="Gemma 4 .* image processor"):
        encoder_factory("gemma4-26b", weights_path=tmp_path)


def test_checkpoint_round_trip_with_and_without_head(tmp_path):
    import timm
    net = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=1000)  # with a head
    torch.save(net.state_dict(), tmp_path / "kaiko.pth")
    enc = encoder_factory("kaiko-vits16", weights_path=str(tmp_path / "kaiko.pth"))
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True)
    ref.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("head.")})
    x = torch.rand(2, 3, 224, 224)
    assert torch.equal(enc(x), ref.eval()(x))
    assert len(enc.weights_sha256) == 64
    # A file for a different architecture is a clear error naming encoder and file.
    torch.save(timm.create_model("vit_base_patch16_224", num_classes=0).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match="kaiko-vits16.*other.pth"):
        encoder_factory("kaiko-vits16", weights_path=str(tmp_path / "other.pth"))
    (tmp_path / "corrupt.pth").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="corrupt.pth"):
        encoder_factory("kaiko-vits16", weights_path=str(tmp_path / "corrupt.pth"))


def test_hub_cache_layout_and_registry(tmp_path, monkeypatch):
    enc = encoder_factory("resnet50", pretrained=False)
    snapshot = tmp_path / "hub" / "models--timm--resnet50.tv_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    from safetensors.torch import save_file
    full = {k[len("net."):]: v.contiguous() for k, v in enc.model.state_dict().items()}
    save_file(full, str(snapshot / "model.safetensors"))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    loaded = encoder_factory("resnet50")
    x = torch.rand(1, 3, 224, 224)
    assert torch.equal(loaded(x), enc(x)) and loaded.weights_path.endswith("model.safetensors")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    reg = tmp_path / "weights.json"
    reg.write_text('{"resnet50": "%s"}' % (snapshot / "model.safetensors"))
    monkeypatch.setenv("TRIDENT_WEIGHTS_REGISTRY", str(reg))
    assert torch.equal(encoder_factory("resnet50")(x), enc(x))


def test_default_encoder_has_real_imagenet_weights():
    """The full EfficientNet-Lite0 classifies known pictures: the shipped weights really loaded."""
    model = build_efficientnet_lite0(with_classifier=True)
    load_lukemelas_by_position(model, efficientnet_lite0_file())
    tf = eval_transforms(224, ((0.5,) * 3, (0.5,) * 3))
    with torch.no_grad():
        coffee = model.eval()(tf(Image.fromarray(data.coffee()))[None]).argmax().item()
        cat = model(tf(Image.fromarray(data.chelsea()))[None]).argmax().item()
    assert coffee == 967  # espresso
    assert cat in (281, 282, 285)  # tabby / tiger / Egyptian cat
    enc = encoder_factory("efficientnet_lite0")
    assert enc.embedding_dim == 1280 and enc.weights_path == efficientnet_lite0_file()


def test_seed_classes_and_custom_encoder():
    enc = ResNet50InferenceEncoder(pretrained=False)
    assert enc.enc_name == "resnet50"
    custom = CustomInferenceEncoder("mine", torch.nn.Flatten(), eval_transforms(8), torch.float32)
    assert custom.enc_name == "mine" and custom(torch.rand(2, 3, 8, 8)).shape == (2, 192)


def test_feature_extraction_end_to_end(tmp_path, slides):
    from trident_lib.segmentation_models import segmentation_model_factory
    enc = encoder_factory("efficientnet_lite0")
    with tl.load_wsi(slides["aperio_40x"]) as wsi:
        wsi.segment_tissue(segmentation_model_factory("otsu"), device="cpu")
        coords_path = wsi.extract_tissue_coords(20, 256, str(tmp_path))
        path = wsi.extract_patch_features(enc, coords_path, str(tmp_path / "feats"), device="cpu", batch_limit=8)
        pt = wsi.extract_patch_features(enc, coords_path, str(tmp_path / "pt"), device="cpu", saveas="pt")
    feats, coords, attrs = read_features_h5(path)
    assert feats.shape == (len(coords), 1280) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert attrs["patch_size_level0"] == 512
    assert torch.equal(torch.load(pt), torch.from_numpy(feats))
    # Batched pipeline == one patch at a time through the model.
    with tl.load_wsi(slides["aperio_40x"]) as wsi:
        tile = wsi.read_region(tuple(coords[3]), 1, (256, 256)).convert("RGB")
    with torch.no_grad():
        single = enc(enc.eval_transforms(tile)[None])[0].numpy()
    np.testing.assert_allclose(feats[3], single, rtol=1e-4, atol=1e-4)
    slide = tl.load_wsi(slides["aperio_40x"]).extract_slide_features(
        path, se.encoder_factory("mean-efficientnet_lite0"), str(tmp_path / "slide"), device="cpu")
    emb, _, _ = read_features_h5(slide)
    np.testing.assert_allclose(emb, feats.mean(0), rtol=1e-5)


def test_slide_encoders():
    assert se.slide_to_patch_encoder_name["titan"] == "conch_v15"
    assert se.slide_to_patch_encoder_name["mean-uni_v1"] == "uni_v1"
    assert se.slide_to_patch_encoder_name["chief"] == "ctranspath"
    assert se.slide_encoder_spec("chief").mag == 10
    mean = se.encoder_factory("mean-resnet50")
    feats = torch.rand(1, 7, 1024)
    assert torch.allclose(mean({"features": feats}, device="cpu"), feats.mean(1))
    with pytest.raises(ValueError, match="pretrained=False"):  # untrained, to be trained: as TRIDENT
        se.encoder_factory("abmil", input_feature_dim=1024)
    ab = se.encoder_factory("abmil", pretrained=False, input_feature_dim=1024)
    out = ab({"features": feats}, device="cpu")
    assert out.shape == (1, 1024) and ab.embedding_dim == 1024  # TRIDENT's ABMIL keeps the input's width
    heads = se.encoder_factory("abmil", pretrained=False, input_feature_dim=1024, n_heads=3, head_dim=64)
    out, scores = heads({"features": feats}, device="cpu", return_raw_attention=True)
    assert out.shape == (1, 1024) and scores.shape == (1, 1, 3, 7)
    assert {k.split(".")[1] for k in heads.state_dict()} == {"pre_attention_layers", "image_pooler",
                                                               "post_attention_layers"}
    assert "model.image_pooler.gating_layers.2.0.weight" in heads.state_dict()
    empty = slide_embedding(np.zeros((0, 1024), np.float32), np.zeros((0, 2)), {}, mean)
    assert empty.shape == (1024,) and np.isnan(empty).all()
    with pytest.raises(MissingDependencyError, match="chief"):
        se.encoder_factory("chief")
    with pytest.raises(WeightsNotFoundError, match="titan"):
        se.encoder_factory("titan")
    with pytest.raises(ValueError, match="Known"):
        se.encoder_factory("nope")


def test_device_lease_is_exclusive_and_survives_crashes(monkeypatch, tmp_path):
    import multiprocessing as mp
    import os
    import signal

    from trident_lib import devices

    monkeypatch.setattr(devices, "gpu_count", lambda: 2)
    monkeypatch.setattr(devices, "LEASE_DIR", str(tmp_path))
    with devices.lease_device("auto") as a, devices.lease_device("auto") as b:
        assert {a, b} == {"cuda:0", "cuda:1"}
    with devices.lease_device("cpu") as c:
        assert c == "cpu"

    ready = mp.get_context("fork").Event()

    def hold():  # a step that takes cuda:0 and then crashes hard
        with devices.lease_device("auto"):
            ready.set()
            signal.pause()

    proc = mp.get_context("fork").Process(target=hold)
    proc.start()
    assert ready.wait(30)
    with devices.lease_device("auto") as d:
        assert d == "cuda:1"  # cuda:0 is held
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    with devices.lease_device("auto") as e:
        assert e == "cuda:0"  # the kernel released the dead step's lease


def test_heatmap(tmp_path, slides):
    from trident_lib import visualize_heatmap

    coords = np.array([[0, 0], [512, 0], [1024, 1024]])
    with tl.load_wsi(slides["aperio_40x"]) as wsi:
        path = visualize_heatmap(wsi, np.array([0.0, 0.5, 1.0]), coords, 512, vis_level=2,
                                 num_top_patches_to_save=2, output_dir=str(tmp_path), filename="h.png")
    img = np.asarray(Image.open(path))
    assert img.shape == (768, 1024, 3)
    assert img[5, 5, 2] > img[5, 5, 0]  # low score: blue side of coolwarm
    assert img[260, 260, 0] > img[260, 260, 2]  # high score: red side
    assert len(list((tmp_path / "topk").glob("*.png"))) == 2
    assert sorted(p.name for p in (tmp_path / "topk").glob("*.png"))[0].startswith("000_x1024_y1024")


def test_model_code_from_a_local_folder_only(tmp_path):
    import transformers

    folder = tmp_path / "keep"
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 image_size=224, patch_size=32)
    transformers.ViTModel(cfg).save_pretrained(folder)
    enc = encoder_factory("keep", weights_path=str(folder))
    out = enc(torch.rand(2, 3, 224, 224))
    assert out.shape == (2, 32) and enc.weights_path.endswith("config.json")


def test_fast_cpu_path_is_close_and_cached():
    from trident_lib.fastpath import fast_cpu_variant

    enc = encoder_factory("efficientnet_lite0")
    x = torch.rand(4, 3, 224, 224)
    fast = fast_cpu_variant(enc)
    assert fast is fast_cpu_variant(enc)
    with torch.inference_mode():
        exact = enc(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            approx = fast(x.contiguous(memory_format=torch.channels_last)).float()
    assert torch.nn.functional.cosine_similarity(exact, approx).min() > 0.998
    assert not hasattr(enc.model.conv_stem, "module")  # the original encoder is untouched
