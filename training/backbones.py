"""torchvision backbones cut before their pooling/classifier, and ImageNet weight loading."""
from __future__ import annotations

import urllib.error
from pathlib import Path

import torch
import torchvision
from torch import nn

from training.config import backbone_spec
from training.errors import WeightsUnavailable, first_line


def build_backbone(name: str, pretrained: bool | str | Path = False) -> nn.Module:
    """The feature extractor ``(n_img, 3, H, W) -> (n_img, channels, H/stride, W/stride)``.

    ``pretrained``: False for random initialisation, True for torchvision's default ImageNet
    weights (downloaded once into the torch hub cache), or the path of a local weights file
    (the torchvision ``.pth`` of the full classifier).
    """
    spec = backbone_spec(name)
    net = torchvision.models.get_model(spec.arch, weights=None)
    if pretrained:
        net.load_state_dict(_imagenet_state_dict(spec.arch, pretrained))
    if spec.arch.startswith("resnet"):
        return nn.Sequential(*list(net.children())[:-2])  # drop avgpool, fc
    return net.features[: spec.n_blocks] if spec.n_blocks else net.features


def _imagenet_state_dict(arch: str, pretrained: bool | str | Path) -> dict[str, torch.Tensor]:
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    if pretrained is not True:
        path = Path(pretrained)
        if not path.is_file():
            raise WeightsUnavailable(f"{path}: weights file not found (expected torchvision {weights} .pth)")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure here means "not a weights file"
            raise WeightsUnavailable(f"{path}: not a readable {arch} weights file ({first_line(err)})") from None
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise WeightsUnavailable(
            f"cannot download ImageNet weights {weights} from {weights.url} ({err}); "
            f"copy that file to {cache} or pass its path with --pretrained-weights, "
            "or train from random initialisation (omit --pretrained)"
        ) from None
