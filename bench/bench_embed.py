"""Embedding speed: the embed stage against timm's raw inference on a synthetic batch.

The stage side is `imgembed.embed.embed_split` itself, timed as a whole: it loads the exported
TorchScript network and model.json, decodes the test images of a generated dataset through
the DataLoader workers, embeds them in the precision training recorded, and writes the .npz.
The network is a freshly initialised one exported the way training exports it (weights do not
change the speed). Stage runs alternate with blocks of raw timm inference (same backbone, image
size, batch size and autocast precision, no gradients) covering the same number of images, and
each run is compared with the raw blocks right before and after it. The first --warmup runs
are reported but left out of the ratio.

    flock /tmp/imgembed-heavy.lock python bench/bench_embed.py            # efficientnet_b3, 128 px, bf16, batch 128

Last line: `RATIO embed <stage images/s divided by raw images/s>` (target >= 0.90).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import RawTimm, bench_config, make_dataset, print_table, quiet, ratio_line, workers_setting  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="efficientnet_b3")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    p.add_argument("--batch-size", type=int, default=128, help="embed.batch_size")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--test-per-class", type=int, default=256, help="test images per class (default: %(default)s, 2048 images: a test split of real size)")
    p.add_argument("--num-workers", type=workers_setting, default="auto", help="data.num_workers (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="stage runs (each between two raw blocks)")
    p.add_argument("--warmup", type=int, default=1, help="first stage runs left out of the ratio")
    p.add_argument("--workdir", type=Path, help="default: a temporary folder")
    return p.parse_args(argv)


def export_model(cfg: dict, precision: str, model_dir: Path) -> None:
    """embedding_net.pt and model.json exactly as training writes them (random weights)."""
    from imgembed.artifacts import describe_model, write_model_folder
    from imgembed.model import create_embedding_net, preprocessing

    torch.manual_seed(0)
    net = create_embedding_net(cfg["model"])
    description = describe_model(cfg["model"], net.backbone.num_features,
                                 preprocessing(net.backbone, cfg["model"]["image_size"]), precision)
    write_model_folder(model_dir, net, cfg["model"], description)


def run(args: argparse.Namespace, workdir: Path) -> float:
    from imgembed.embed import embed_split

    cfg = bench_config({
        "model": {"backbone": args.backbone, "pretrained": False, "weights": None, "image_size": args.image_size,
                  "export_onnx": False},
        "data": {"num_workers": args.num_workers},
        "embed": {"batch_size": args.batch_size},
    })
    n_images = args.classes * args.test_per_class
    data_dir = make_dataset(workdir, args.classes, {"train": 2, "val": 1, "test": args.test_per_class},
                            args.image_size)
    export_model(cfg, args.precision, workdir / "model")
    raw = RawTimm(args.backbone, args.image_size, args.batch_size, args.precision)
    raw_steps = -(-n_images // args.batch_size)
    raw.rate(raw.infer_step, 1)  # warm-up

    blocks = [raw.rate(raw.infer_step, raw_steps)]
    runs = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        with quiet():
            count = embed_split(data_dir, workdir / "model", workdir / "test.npz", cfg)
        runs.append((count, time.perf_counter() - started))
        blocks.append(raw.rate(raw.infer_step, raw_steps))

    rows, num, den = [], [0.0, 0.0], [0.0, 0.0]
    for i, (count, seconds) in enumerate(runs):
        raw_images, raw_seconds = blocks[i][0] + blocks[i + 1][0], blocks[i][1] + blocks[i + 1][1]
        counted = i >= args.warmup or args.warmup >= len(runs)
        rows.append([i + 1, count, round(seconds, 2), count / seconds, raw_images / raw_seconds,
                     (count / seconds) / (raw_images / raw_seconds), "yes" if counted else "warm-up"])
        if counted:
            num[0] += count
            num[1] += seconds
            den[0] += raw_images
            den[1] += raw_seconds
    print(f"embed: {args.backbone}, {args.image_size} px, batch {args.batch_size}, {args.precision}, "
          f"data.num_workers {args.num_workers}, {torch.get_num_threads()} threads, {n_images} test images per run")
    print_table(["run", "images", "seconds", "stage img/s", "raw img/s (adjacent)", "ratio", "counted"], rows)
    print(f"overall: embed stage {num[0] / num[1]:.2f} img/s vs raw timm inference {den[0] / den[1]:.2f} img/s "
          "(stage time includes loading the model and writing the .npz)")
    return (num[0] / num[1]) / (den[0] / den[1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        ratio = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_embed_") as tmp:
            ratio = run(args, Path(tmp))
    ratio_line("embed", ratio)


if __name__ == "__main__":
    main()
