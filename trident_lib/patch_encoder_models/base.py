"""Patch encoders: one spec per model (architecture builder, transforms, precision, dimension, weights),
in the way timm keeps its pretrained configs as data next to one builder per family."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torchvision import transforms as T

from ..errors import MissingDependencyError, WeightsNotFoundError
from ..weights import file_checksum, find_weights, load_into, load_state_dict

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
GENBIO = ((0.697, 0.575, 0.728), (0.188, 0.240, 0.187))

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def eval_transforms(size: int = 224, norm=IMAGENET, resize: int | None = None, interpolation: str = "bilinear",
                    crop: bool = True, squash: bool = False):
    """Resize (antialiased; the shorter side, or both sides with ``squash``), centre crop unless ``crop`` is
    False, to tensor in [0, 1], normalise."""
    interp = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[interpolation]
    side = resize or size
    steps = [T.Resize((side, side) if squash else side, interpolation=interp, antialias=True)]
    if crop:
        steps.append(T.CenterCrop(size))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(*norm)])


@dataclass(frozen=True)
class EncoderSpec:
    """Everything that defines one patch encoder."""

    name: str
    dim: int
    build: Callable[..., torch.nn.Module]  # builds the architecture with random weights
    norm: tuple = IMAGENET
    size: int = 224
    resize: int | None = None
    interpolation: str = "bilinear"
    crop: bool = True  # centre crop to ``size`` after the resize
    squash: bool = False  # resize both sides to ``size`` (aspect ratio not kept) instead of the shorter one
    precision: str = "fp32"
    hub_repo: str | None = None
    weight_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    patch_size: int = 256  # recommended patch size and magnification
    mag: float = 20
    requires: tuple[str, ...] = ()  # importable modules the architecture needs
    install: str | None = None  # how to install them, when it is not "pip install <module>"
    ignore_prefixes: tuple[str, ...] = ("head.", "fc.", "classifier.")  # classifier heads users' files may hold
    adapt_state_dict: Callable[[dict, torch.nn.Module], dict] | None = None  # published layout -> ours
    forward: Callable | None = None  # (model, x) -> features, when not model(x)
    load_weights: Callable | None = None  # (model, path) for formats that need their own loader
    packaged_weights: Callable[[], str] | None = None  # weights shipped inside an installed package
    from_folder: bool = False  # the architecture is defined by the checkpoint folder's config (transformers)
    fast_fp32_modules: tuple[str, ...] = ()  # kept in fp32 on the bf16 CPU fast path (see trident_lib.fastpath)
    licence: str = "see the model card"
    notes: str = ""
    extra_kwargs: dict = field(default_factory=dict)


REGISTRY: dict[str, EncoderSpec] = {}


def register(*specs: EncoderSpec) -> None:
    for spec in specs:
        REGISTRY[spec.name] = spec


class MissingCodeError(MissingDependencyError):
    """Model code that does not come from PyPI (a git package, a cloned repository): says how to get it."""

    def __init__(self, what: str, package: str, how: str):
        ImportError.__init__(self, f"{what} needs '{package}', which is not installed or not found. {how}")
        self.what, self.package, self.how = what, package, how

    def __reduce__(self):  # keep the fields when the error crosses a process boundary
        return (type(self), (self.what, self.package, self.how))


def require(spec: EncoderSpec) -> None:
    for module in spec.requires:
        if importlib.util.find_spec(module) is None:
            if spec.install:
                raise MissingCodeError(f"The '{spec.name}' patch encoder", module, f"Install it: {spec.install}")
            raise MissingDependencyError(f"The '{spec.name}' patch encoder", module.replace("_", "-"))


class BasePatchEncoder(torch.nn.Module):
    """A patch encoder: ``model``, ``eval_transforms``, ``precision``, ``enc_name``, ``embedding_dim``.

    Weights are looked up offline (``weights_path``, the lab's registry, the local hub cache);
    ``pretrained=False`` builds the architecture with random weights (for tests and benchmarks).
    """

    spec_name: str | None = None

    def __init__(self, weights_path: str | os.PathLike | None = None, pretrained: bool = True,
                 model_name: str | None = None, **build_kwargs):
        super().__init__()
        spec = REGISTRY[model_name or self.spec_name]
        require(spec)
        self.spec = spec
        self.enc_name = spec.name
        self.embedding_dim = spec.dim
        self.precision = PRECISIONS[spec.precision]
        self.eval_transforms = eval_transforms(spec.size, spec.norm, spec.resize, spec.interpolation, spec.crop,
                                               spec.squash)
        self.weights_path = None
        self.weights_sha256 = None
        if spec.from_folder:  # config and weights come together; there is no random-weights variant
            path = find_weights(spec.name, weights_path, spec.hub_repo, ("config.json",))
            self.model = spec.build(os.path.dirname(path), **{**spec.extra_kwargs, **build_kwargs})
            self.weights_path, self.weights_sha256 = path, file_checksum(path)
        else:
            self.model = spec.build(**{**spec.extra_kwargs, **build_kwargs})
            if pretrained:
                self._load(self._find(weights_path))
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad = False

    def _find(self, weights_path: str | os.PathLike | None) -> str:
        try:
            return find_weights(self.spec.name, weights_path, self.spec.hub_repo, self.spec.weight_files)
        except WeightsNotFoundError:
            if weights_path is None and self.spec.packaged_weights is not None:
                return self.spec.packaged_weights()
            raise

    def _load(self, path: str) -> None:
        spec = self.spec
        if spec.load_weights is not None:
            spec.load_weights(self.model, path)
        else:
            sd = load_state_dict(path, spec.name)
            if spec.adapt_state_dict is not None:
                sd = spec.adapt_state_dict(sd, self.model)
            load_into(self.model, sd, spec.name, path, spec.ignore_prefixes)
        self.weights_path, self.weights_sha256 = path, file_checksum(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec.forward(self.model, x) if self.spec.forward else self.model(x)


class CustomInferenceEncoder(torch.nn.Module):
    """An encoder made from parts the user already has (model, transforms, precision)."""

    def __init__(self, enc_name: str, model: torch.nn.Module, transforms: Callable, precision: torch.dtype,
                 embedding_dim: int | None = None):
        super().__init__()
        self.enc_name = enc_name
        self.model = model.eval()
        self.eval_transforms = transforms
        self.precision = precision
        self.embedding_dim = embedding_dim
        self.weights_path = None
        self.weights_sha256 = None

    def forward(self, x):
        return self.model(x)


@contextlib.contextmanager
def meta_device():
    """Build an architecture without allocating its weights (to check shapes of billion-parameter models)."""
    with torch.device("meta"):
        yield
