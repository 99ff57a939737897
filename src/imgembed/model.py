"""The embedding network: a timm backbone, a small head, optional L2 normalisation (exported by imgembed.artifacts)."""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from imgembed.errors import UserError

log = logging.getLogger("imgembed")


class EmbeddingNet(nn.Module):
    """backbone (pooled features) -> head -> embedding, L2-normalised when `normalize`."""

    def __init__(self, backbone: nn.Module, head: nn.Module, normalize: bool, freeze_backbone: bool,
                 freeze_batchnorm: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.normalize = normalize
        self.freeze_backbone = freeze_backbone
        self.freeze_batchnorm = freeze_batchnorm
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> "EmbeddingNet":
        """A frozen backbone stays in eval mode, so its BatchNorm statistics never drift."""
        super().train(mode)
        if mode and self.freeze_backbone:
            self.backbone.eval()
        elif mode and self.freeze_batchnorm:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        out = self.head(features)
        return F.normalize(out, dim=1) if self.normalize else out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.backbone(images))


def build_head(in_features: int, embedding_dim: int, kind: str, hidden: list[int]) -> nn.Module:
    """`linear`, or the original pipeline's `mlp` (features -> hidden... -> embedding_dim with PReLU)."""
    if kind == "linear":
        return nn.Linear(in_features, embedding_dim)
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.PReLU()]
        width = size
    layers.append(nn.Linear(width, embedding_dim))
    return nn.Sequential(*layers)


def check_backbone_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise UserError(f"model.backbone: '{name}' is not a timm model{hint}")


def create_backbone(model_cfg: dict[str, Any]) -> nn.Module:
    """timm backbone without classifier; pretrained from model.weights or timm's hub.

    If pretrained weights are asked for and cannot be loaded this stops: training from random
    weights by accident would waste hours and look like a bad recipe.
    """
    name = model_cfg["backbone"]
    check_backbone_name(name)
    weights = model_cfg["weights"]
    if weights and not model_cfg["pretrained"]:
        raise UserError("model.weights is set but model.pretrained is false; set model.pretrained: true to use it")
    if not model_cfg["pretrained"]:
        return timm.create_model(name, pretrained=False, num_classes=0)
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"model.weights: {path}: file not found")
        try:
            backbone, loaded = _create_recording_loads(name, path)
        except Exception as err:  # timm raises RuntimeError/KeyError/pickle errors for a file that does not fit
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"model.weights: {path} does not fit backbone {name}: {first[:300]}") from None
        check_weights_fit(name, path, loaded)
        return backbone
    try:
        return timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"model.pretrained: could not load pretrained weights for {name} ({first[:200]}); "
            "set model.weights to a local file, or model.pretrained: false to train from scratch"
        ) from None


def _create_recording_loads(name: str, path: Path) -> tuple[nn.Module, list[Any]]:
    """timm backbone from a local weights file, plus what each load_state_dict call reported.

    timm loads non-strictly once the classifier is dropped (num_classes=0), so a file made for
    another network would load nothing, silently; the recorded missing keys show it.
    """
    loaded: list[Any] = []
    original = nn.Module.load_state_dict

    def recording(module: nn.Module, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(module, state_dict, *args, **kwargs)
        loaded.append((result, list(state_dict)))
        return result

    timm_log = logging.getLogger("timm.models._builder")  # its key lists run to pages; check_weights_fit says it in one line
    level = timm_log.level
    timm_log.setLevel(logging.ERROR)
    try:
        with mock.patch.object(nn.Module, "load_state_dict", recording):
            backbone = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path)))
    finally:
        timm_log.setLevel(level)
    return backbone, loaded


def check_weights_fit(name: str, path: Path, loaded: list[Any]) -> None:
    """Stop when the weights file left backbone weights unset (wrong network, or prefixed keys)."""
    for result, file_keys in loaded:
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        if not missing:
            continue
        hint = f"; the file's keys look like '{file_keys[0]}'" if file_keys else "; the file holds no weights"
        raise UserError(
            f"model.weights: {path} does not fit backbone {name}: {len(missing)} of its weights are not in the file "
            f"(e.g. '{missing[0]}'){hint}. Use a file saved from timm.create_model('{name}').state_dict()"
        )
    extra = [k for result, _ in loaded for k in result.unexpected_keys]
    if extra:
        log.warning("model.weights: %s has %d entries that %s does not use (e.g. '%s'); ignored", path, len(extra), name, extra[0])


def create_embedding_net(model_cfg: dict[str, Any]) -> EmbeddingNet:
    backbone = create_backbone(model_cfg)
    head = build_head(backbone.num_features, model_cfg["embedding_dim"], model_cfg["head"], model_cfg["head_hidden"])
    return EmbeddingNet(backbone, head, model_cfg["normalize"], model_cfg["freeze_backbone"], model_cfg["freeze_batchnorm"])


def preprocessing(backbone: nn.Module, image_size: int) -> dict[str, Any]:
    """The input a backbone expects (model.json's image_size, mean, std, interpolation), from
    timm's pretrained_cfg: what data.build_transform turns into the preprocessing, and what
    artifacts.describe_model records."""
    pretrained_cfg = backbone.pretrained_cfg
    return {
        "image_size": int(image_size),
        "mean": [float(v) for v in pretrained_cfg.get("mean", (0.485, 0.456, 0.406))],
        "std": [float(v) for v in pretrained_cfg.get("std", (0.229, 0.224, 0.225))],
        "interpolation": pretrained_cfg.get("interpolation", "bicubic"),
    }


def prefer_channels_last(net: nn.Module, device: torch.device) -> nn.Module:
    """NHWC weights on a CUDA device, where cuDNN's convolutions (tensor cores in bf16/fp16) run
    fastest in that layout and activations follow the weights' layout. Left as is on the CPU,
    where it was not measured to help."""
    if device.type == "cuda":
        net.to(memory_format=torch.channels_last)
    return net


def eager_copy(scripted: nn.Module, model_cfg: dict[str, Any]) -> EmbeddingNet:
    """The exported network rebuilt as timm's eager modules, with the exported file's weights;
    `model_cfg` comes from its model.json (imgembed.artifacts.model_config).

    Under bf16 autocast on the CPU the traced graph ran 15-20 % slower than the same network
    run eagerly (bench/README.md), so the embed stage runs this copy of the shipped weights.
    """
    net = create_embedding_net(model_cfg)
    net.load_state_dict(scripted.state_dict())  # strict: any mismatch is an error, never a silent skip
    return net.eval()


@torch.inference_mode()  # no autograd bookkeeping at all, as timm's own inference benchmark runs
def embed_batches(net: nn.Module, loader: Any, accelerator: Any, desc: str = "embed") -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and labels of every item of `loader`, gathered from all processes.

    `gather_for_metrics` drops the samples a distributed sampler repeats to even out the last
    batch, so each item appears exactly once, in loader order.
    """
    from tqdm import tqdm

    net.eval()
    embeddings, labels = [], []
    for inputs, targets in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_main_process, mininterval=1):
        with accelerator.autocast():
            out = net(inputs)
        out, targets = accelerator.gather_for_metrics((out.float(), targets))
        embeddings.append(out.cpu())
        labels.append(targets.cpu())
    return torch.cat(embeddings).numpy(), torch.cat(labels).numpy()
