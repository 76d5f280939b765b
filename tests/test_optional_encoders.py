"""Encoders whose model code comes from packages outside PyPI (CONCH, MUSK, Prov-GigaPath, MADELEINE) or a
cloned repository (CHIEF). Each "installed" path is exercised with a minimal fake package, written here and
put on sys.path, that provides exactly the entry point our code calls."""

import json
import os
import sys
import textwrap

import pytest
import torch
from PIL import Image

from trident_lib import slide_encoder_models as se
from trident_lib.errors import MissingDependencyError
from trident_lib.extraction import slide_embedding
from trident_lib.patch_encoder_models import encoder_factory

FAKE_ROOTS = ("conch", "musk", "gigapath", "madeleine", "trident_chief_model")


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """write({"pkg/mod.py": source, ...}) -> the folder put on sys.path; the fake modules are forgotten after."""
    root = tmp_path / "site"

    def write(files: dict) -> str:
        for rel, text in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))
        monkeypatch.syspath_prepend(str(root))
        return str(root)

    yield write
    for name in list(sys.modules):
        if name.split(".")[0] in FAKE_ROOTS:
            del sys.modules[name]


# -- patch encoders ------------------------------------------------------------------------------------

FAKE_CONCH = {
    "conch/__init__.py": "",
    "conch/open_clip_custom/__init__.py": """
        import torch
        from torch import nn

        CALLS = []

        class CoCa(nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = nn.Linear(3, 512)

            def encode_image(self, x, proj_contrast=True, normalize=True):
                assert proj_contrast is False and normalize is False
                return self.proj(x.mean(dim=(2, 3)))

        def create_model(model_cfg, **kwargs):
            CALLS.append(model_cfg)
            return CoCa()
        """,
}


def test_conch_v1_through_the_conch_package(fake_package, tmp_path):
    fake_package(FAKE_CONCH)
    from conch.open_clip_custom import CALLS, CoCa

    ckpt = tmp_path / "pytorch_model.bin"
    ref = CoCa()
    torch.save(ref.state_dict(), ckpt)
    enc = encoder_factory("conch_v1", weights_path=ckpt)
    assert CALLS == ["conch_ViT-B-16"]  # the package builds the architecture; the weights are the local file's
    x = torch.rand(2, 3, 448, 448)
    want = ref.encode_image(x, proj_contrast=False, normalize=False)
    assert enc(x).shape == (2, 512) and torch.allclose(enc(x), want)
    assert enc.weights_path == str(ckpt) and len(enc.weights_sha256) == 64 and enc.precision == torch.float32
    # The CONCH package's eval transform: 448 px, OpenAI-CLIP normalisation.
    t = enc.eval_transforms(Image.new("RGB", (512, 512), (255, 255, 255)))
    assert t.shape == (3, 448, 448) and abs(t[0, 0, 0].item() - (1 - 0.48145466) / 0.26862954) < 1e-4
    random = encoder_factory("conch_v1", pretrained=False)
    assert CALLS[-1] == "conch_ViT-B-16" and random.weights_path is None


FAKE_MUSK = {
    "musk/__init__.py": "",
    "musk/modeling.py": """
        import torch
        from timm.models import register_model
        from torch import nn

        class MUSK(nn.Module):
            def __init__(self):
                super().__init__()
                self.vision = nn.Linear(3, 1024)

            def forward(self, image=None, with_head=True, out_norm=True, ms_aug=False, return_global=True):
                assert (with_head, out_norm, ms_aug, return_global) == (False, False, False, True)
                return self.vision(image.mean(dim=(2, 3))), None

        @register_model
        def musk_large_patch16_384(pretrained=False, **kwargs):
            return MUSK()
        """,
    "musk/utils.py": """
        from safetensors.torch import load_file

        LOADED = []

        def load_model_and_may_interpolate(ckpt_path, model, model_key, model_prefix):
            LOADED.append((ckpt_path, model_key, model_prefix))
            model.load_state_dict(load_file(ckpt_path))
        """,
}


def test_musk_through_the_musk_package(fake_package, tmp_path):
    from safetensors.torch import save_file

    fake_package(FAKE_MUSK)
    from musk import utils
    from musk.modeling import MUSK

    ref = MUSK()
    save_file(ref.state_dict(), str(tmp_path / "model.safetensors"))
    enc = encoder_factory("musk", weights_path=str(tmp_path))
    assert utils.LOADED == [(str(tmp_path / "model.safetensors"), "model|module", "")]
    x = torch.rand(3, 3, 384, 384)
    assert enc(x).shape == (3, 1024) and torch.allclose(enc(x), ref(image=x, with_head=False, out_norm=False)[0])
    assert enc.precision == torch.float16 and enc.eval_transforms(Image.new("RGB", (400, 400))).shape == (3, 384, 384)


@pytest.mark.parametrize("name,package", [("conch_v1", "conch"), ("musk", "musk")])
def test_patch_encoder_without_its_package(name, package):
    with pytest.raises(MissingDependencyError, match=f"'{name}' patch encoder needs '{package}'.*pip install git"):
        encoder_factory(name, pretrained=False)


# -- slide encoders ------------------------------------------------------------------------------------

FAKE_GIGAPATH = {
    "gigapath/__init__.py": "",
    "gigapath/slide_encoder.py": """
        import os
        import torch
        from torch import nn

        CALLS = []

        class LongNetViT(nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = nn.Linear(1536, 768)

            def forward(self, x, coords, all_layer_embed=False):
                self.seen_coords = coords
                h = self.proj(x).mean(dim=1)
                return [h + i for i in range(13)] if all_layer_embed else [h + 12]

        def create_model(pretrained, model_arch, in_chans, **kwargs):
            CALLS.append((pretrained, model_arch, in_chans, kwargs))
            model = LongNetViT()
            if os.path.exists(pretrained):
                model.load_state_dict(torch.load(pretrained, map_location="cpu")["model"], strict=False)
            return model
        """,
}


def test_gigapath_through_the_gigapath_package(fake_package, tmp_path):
    fake_package(FAKE_GIGAPATH)
    from gigapath import slide_encoder

    ref = slide_encoder.LongNetViT()
    torch.save({"model": ref.state_dict()}, tmp_path / "slide_encoder.pth")
    model = se.encoder_factory("gigapath", weights_path=tmp_path)
    assert slide_encoder.CALLS == [(str(tmp_path / "slide_encoder.pth"), "gigapath_slide_enc12l768d", 1536,
                                    {"global_pool": True})]
    feats, coords = torch.rand(1, 5, 1536), torch.tensor([[[0, 0], [512, 0], [1023, 512], [1024, 2048], [5, 7]]])
    batch = {"features": feats, "coords": coords, "attributes": {"patch_size_level0": 512}}
    out = model(batch, device="cpu")
    assert out.shape == (1, 768) and torch.allclose(out, ref.proj(feats).mean(dim=1) + 11)  # state after layer 11
    # Grid cells of patch_size_level0 pixels, handed over in gigapath's 256-px units.
    assert model.model.seen_coords.tolist() == [[[0, 0], [256, 0], [256, 256], [512, 1024], [0, 0]]]
    assert model.precision == torch.float16 and len(model.weights_sha256) == 64
    emb = slide_embedding(feats[0].numpy(), coords[0].numpy(), {"patch_size_level0": 512}, model, "cpu")
    assert emb.shape == (768,)


def _write_chief_repo(folder):
    (folder / "models").mkdir(parents=True)
    (folder / "model_weight").mkdir()
    (folder / "models" / "CHIEF.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class CHIEF(nn.Module):
            def __init__(self, size_arg="large", dropout=False, n_classes=2):
                super().__init__()
                assert (size_arg, dropout, n_classes) == ("small", True, 2)
                self.attention = nn.Linear(768, 1)
                # Like the real CHIEF: a path relative to the clone.
                self.register_buffer("organ_embedding", torch.load("./model_weight/Text_emdding.pth"))

            def forward(self, h, x_anatomic):
                a = torch.softmax(self.attention(h), dim=0)
                return {"WSI_feature": (a * h).sum(dim=0, keepdim=True), "bag_logits": None}
        """))
    torch.save(torch.rand(19, 768), folder / "model_weight" / "Text_emdding.pth")


def test_chief_from_a_cloned_repository(tmp_path, monkeypatch):
    repo = tmp_path / "CHIEF"
    _write_chief_repo(repo)
    with pytest.raises(MissingDependencyError, match="chief.*git clone https://github.com/hms-dbmi/CHIEF"):
        se.encoder_factory("chief", weights_path=repo)  # no CHIEF_pretraining.pth yet
    weights = {"attention.weight": torch.rand(1, 768), "attention.bias": torch.zeros(1),
               "organ_embedding": torch.rand(19, 768)}
    torch.save(weights, repo / "model_weight" / "CHIEF_pretraining.pth")
    cwd, path = os.getcwd(), list(sys.path)
    try:
        model = se.encoder_factory("chief", weights_path=repo)
    finally:
        sys.modules.pop("trident_chief_model", None)
    assert os.getcwd() == cwd and sys.path == path  # working directory and import path restored
    feats = torch.rand(1, 6, 768)
    out = model({"features": feats, "coords": torch.zeros(1, 6, 2), "attributes": {}}, device="cpu")
    a = torch.softmax(feats[0] @ weights["attention.weight"].T, dim=0)
    assert out.shape == (1, 768) and torch.allclose(out, (a * feats[0]).sum(0, keepdim=True), atol=1e-5)
    assert model.weights_path == str(repo / "model_weight" / "CHIEF_pretraining.pth")
    # The registry (or weights_path) may also name the checkpoint file itself.
    same = se.encoder_factory("chief", weights_path=repo / "model_weight" / "CHIEF_pretraining.pth")
    sys.modules.pop("trident_chief_model", None)
    assert torch.equal(same({"features": feats}, device="cpu"), out)


FAKE_MADELEINE = {
    "madeleine/__init__.py": "",
    "madeleine/models/__init__.py": "",
    "madeleine/models/Model.py": """
        import torch
        from torch import nn

        class MADELEINE(nn.Module):
            def __init__(self, config, stain_encoding=False):
                super().__init__()
                assert stain_encoding is False
                self.projector = nn.Linear(config.patch_embedding_dim, 512)

            def encode_he(self, feats, device):
                return self.projector(feats.to(device).mean(dim=1))
        """,
}


def test_madeleine_through_the_madeleine_package(fake_package, tmp_path):
    fake_package(FAKE_MADELEINE)
    from madeleine.models.Model import MADELEINE

    folder = tmp_path / "madeleine"
    folder.mkdir()
    (folder / "model_config.json").write_text(json.dumps({"patch_embedding_dim": 512, "precision": "bfloat16"}))
    ref = MADELEINE(type("Cfg", (), {"patch_embedding_dim": 512}))
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, folder / "model.pt")  # DataParallel keys
    model = se.encoder_factory("madeleine", weights_path=folder)
    feats = torch.rand(1, 9, 512)
    out = model({"features": feats}, device="cpu")
    assert out.shape == (1, 512) and torch.allclose(out, ref.encode_he(feats, "cpu"))
    assert model.weights_path == str(folder / "model.pt") and model.precision == torch.bfloat16


@pytest.mark.parametrize("name,package", [("gigapath", "gigapath"), ("madeleine", "madeleine"),
                                          ("chief", "CHIEF"), ("threads", "threadsmodel")])
def test_slide_encoder_without_its_code(name, package, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("TRIDENT_WEIGHTS_REGISTRY", raising=False)
    with pytest.raises(MissingDependencyError, match=f"'{name}' slide encoder needs '{package}'"):
        se.encoder_factory(name)
