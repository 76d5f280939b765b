"""Tissue segmentation models: Otsu (no weights), HEST, GrandQC tissue and GrandQC artifacts."""

from __future__ import annotations

import os

import cv2
import numpy as np
import torch
from PIL import Image
from skimage.color import rgb2gray
from skimage.filters import threshold_otsu
from torchvision import transforms as T

from ..errors import MissingDependencyError
from ..weights import file_checksum, find_weights, load_into, load_state_dict

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class SegmentationModel(torch.nn.Module):
    """A tile-level segmenter. ``eval_transforms`` turns a PIL tile into a tensor (it runs in the
    data-loader workers); ``forward`` maps a batch to (B, H, W) uint8 class maps.

    ``target_mag`` and ``input_size`` say at which magnification and tile size the model works.
    """

    target_mag: float = 10
    input_size: int = 512
    hub_repo: str | None = None
    weights_file: tuple[str, ...] = ()

    def __init__(self, freeze: bool = True, confidence_thresh: float = 0.5,
                 weights_path: str | os.PathLike | None = None, **build_kwargs):
        super().__init__()
        self.confidence_thresh = confidence_thresh
        self.weights_path = os.fspath(weights_path) if weights_path is not None else None
        self.weights_sha256: str | None = None
        self.model, self.eval_transforms = self._build(**build_kwargs)
        if freeze and self.model is not None:
            for p in self.model.parameters():
                p.requires_grad = False
            self.model.eval()

    def _build(self, **kwargs):
        raise NotImplementedError

    def _load_weights(self, model: torch.nn.Module, name: str, adapt=None) -> None:
        path = find_weights(name, self.weights_path, self.hub_repo, self.weights_file)
        sd = load_state_dict(path, name)
        load_into(model, adapt(sd) if adapt else sd, name, path)
        self.weights_path, self.weights_sha256 = path, file_checksum(path)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# -- Otsu ------------------------------------------------------------------------------------

def _drop_small_components(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Remove 4-connected foreground components under ``min_area`` pixels."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False
    return keep[labels]


def mask_rgb(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The RGB image with everything outside ``mask`` set to white (background)."""
    out = rgb.copy()
    out[~mask.astype(bool)] = 255
    return out


def _otsu_mask(rgb: np.ndarray) -> np.ndarray:
    # Float luminance (skimage weights 0.2125/0.7154/0.0721), not cv2's rounded uint8 gray: TRIDENT's
    # masks match this one pixel for pixel, and the two disagree on light tissue borders.
    gray = rgb2gray(rgb)
    if gray.min() == gray.max():  # a uniform tile has no tissue to separate
        return np.zeros(gray.shape, bool)
    return gray < threshold_otsu(gray)  # tissue is the strictly darker class


def apply_otsu_thresholding(tile: np.ndarray) -> np.ndarray:
    """(H, W) uint8 tissue mask (1 = tissue) of an RGB uint8 tile.

    Pure black (outside the slide) becomes white; grey (saturation <= 10 and value >= 70) and dark
    (value <= 85) pixels become white; Otsu on grayscale, objects under 60 px dropped; a second Otsu
    pass on the masked tile; holes under 5000 px filled.
    """
    rgb = np.ascontiguousarray(tile[:, :, :3], dtype=np.uint8).copy()
    rgb[(rgb == 0).all(axis=2)] = 255
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat, val = hsv[:, :, 1], hsv[:, :, 2]
    rgb[((sat <= 10) & (val >= 70)) | (val <= 85)] = 255
    mask = _drop_small_components(_otsu_mask(rgb), 60)
    mask = _otsu_mask(mask_rgb(rgb, mask)) & mask
    holes = _drop_small_components(~mask, 5000)  # background regions large enough to stay background
    return (~holes).astype(np.uint8)


class _OtsuTransform:
    """Runs the whole Otsu computation in the data-loader worker; picklable."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(apply_otsu_thresholding(np.asarray(img.convert("RGB"))))


class OtsuSegmenter(SegmentationModel):
    """Classical two-pass Otsu tissue segmentation, per 512-px tile at 1.25x (no weights), as TRIDENT does:
    the threshold and the hole filling are per tile, so a hole cut by a tile border gets straight edges.
    ``whole_slide=True`` thresholds the whole slide at once instead."""

    target_mag = 1.25
    input_size = 512

    def __init__(self, whole_slide: bool = False, **kwargs):
        self.whole_slide = whole_slide
        super().__init__(**kwargs)

    def _build(self, **kwargs):
        return None, _OtsuTransform()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.to(torch.uint8)


# -- models with weights -------------------------------------------------------------------

def _imagenet_transforms(*first):
    return T.Compose([*first, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _hest_keys(sd: dict) -> dict:
    # deeplabv3_seg_v4.ckpt is a Lightning checkpoint: its module held the net as "model." and trained an
    # auxiliary classifier, which inference does not use (TRIDENT removes "model." wherever it occurs).
    return {k.replace("model.", ""): v for k, v in sd.items() if "aux" not in k}


class HESTSegmenter(SegmentationModel):
    """HEST tissue segmenter: torchvision DeepLabV3-ResNet50, 2 classes, 10x, ImageNet normalisation;
    tissue where P(class 1) > ``confidence_thresh``. TRIDENT runs it in fp16."""

    target_mag = 10
    precision = torch.float16
    hub_repo = "MahmoodLab/hest-tissue-seg"
    weights_file = ("deeplabv3_seg_v4.ckpt", "model.safetensors", "pytorch_model.bin")

    def _build(self, **kwargs):
        from torchvision.models.segmentation import deeplabv3_resnet50

        # No ImageNet backbone download (torchvision's default): the checkpoint holds every weight.
        model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=2, aux_loss=False)
        self._load_weights(model, "hest", _hest_keys)
        return model, _imagenet_transforms()

    def forward(self, image):
        probs = torch.softmax(self.model(image)["out"], dim=1)
        return (probs[:, 1] > self.confidence_thresh).to(torch.uint8)


def _smp():
    try:
        import segmentation_models_pytorch as smp
    except ImportError as e:
        raise MissingDependencyError("GrandQC segmentation", "segmentation-models-pytorch") from e
    return smp


class JpegReencode:
    """GrandQC's tissue model saw JPEG tiles: each tile is JPEG-encoded (quality 80) and decoded with OpenCV
    before normalisation, as TRIDENT does (the RGB array goes in and comes out in the same channel order)."""

    def __init__(self, quality: int = 80):
        self.quality = quality

    def __call__(self, img: Image.Image) -> Image.Image:
        _, buf = cv2.imencode(".jpg", np.asarray(img.convert("RGB")), [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        return Image.fromarray(cv2.imdecode(buf, cv2.IMREAD_COLOR))


class GrandQCSegmenter(SegmentationModel):
    """GrandQC tissue detection: Unet++ with a timm-efficientnet-b0 encoder, 2 classes, at 1x, fp16 in
    TRIDENT. Tissue where class 0 wins and its probability is at least ``confidence_thresh``."""

    target_mag = 1
    precision = torch.float16
    hub_repo = "MahmoodLab/hest-tissue-seg"
    weights_file = ("Tissue_Detection_MPP10.pth", "model.safetensors")
    tissue_class = 0  # GrandQC's tissue model predicts class 0 for tissue, 1 for background

    def _build(self, **kwargs):
        model = _smp().UnetPlusPlus(encoder_name="timm-efficientnet-b0", encoder_weights=None, classes=2,
                                    activation=None)
        self._load_weights(model, "grandqc")
        return model, _imagenet_transforms(JpegReencode(80))

    def forward(self, image):
        probs = torch.softmax(self.model(image), dim=1)
        top, cls = probs.max(dim=1)
        return ((top >= self.confidence_thresh) & (cls == self.tissue_class)).to(torch.uint8)


class GrandQCArtifactSegmenter(SegmentationModel):
    """GrandQC artifact detection: Unet with timm-efficientnet-b0, 8 classes, at 10x.

    Classes: 1 tissue, 2 fold, 3 dark spot / foreign object, 4 pen marking, 5 edge / air bubble,
    6 out of focus, 7 background (0 unused). ``remove_penmarks_only`` keeps everything but pen marks.
    """

    target_mag = 10
    precision = torch.float32
    hub_repo = "MahmoodLab/hest-tissue-seg"
    weights_file = ("GrandQC_MPP1_state_dict.pth", "model.safetensors")
    ARTIFACT_CLASSES = (2, 3, 4, 5, 6)

    def __init__(self, remove_penmarks_only: bool = False, **kwargs):
        self.remove_penmarks_only = remove_penmarks_only
        super().__init__(**kwargs)

    def _build(self, **kwargs):
        model = _smp().Unet(encoder_name="timm-efficientnet-b0", encoder_weights=None, classes=8, activation=None)
        self._load_weights(model, "grandqc_artifact")
        return model, _imagenet_transforms()

    def forward(self, image):
        pred = torch.argmax(self.model(image), dim=1)
        bad = (4,) if self.remove_penmarks_only else self.ARTIFACT_CLASSES
        clean = ~torch.isin(pred, torch.tensor(bad, device=pred.device)) & (pred != 7)
        return clean.to(torch.uint8)


SEGMENTERS = {
    "otsu": OtsuSegmenter,
    "hest": HESTSegmenter,
    "grandqc": GrandQCSegmenter,
    "grandqc_artifact": GrandQCArtifactSegmenter,
}


def segmentation_model_factory(model_name: str, confidence_thresh: float = 0.5, freeze: bool = True,
                               **build_kwargs) -> SegmentationModel:
    """Build a segmentation model by name: 'otsu', 'hest', 'grandqc' or 'grandqc_artifact'.

    Weights come from ``weights_path=`` or the local caches (see ``trident_lib.weights``); never downloaded.
    """
    if model_name not in SEGMENTERS:
        raise ValueError(f"Unknown segmentation model {model_name!r}; choose one of {sorted(SEGMENTERS)}.")
    return SEGMENTERS[model_name](freeze=freeze, confidence_thresh=confidence_thresh, **build_kwargs)


__all__ = ["SegmentationModel", "OtsuSegmenter", "HESTSegmenter", "GrandQCSegmenter", "GrandQCArtifactSegmenter",
           "segmentation_model_factory", "apply_otsu_thresholding", "mask_rgb", "SEGMENTERS"]
