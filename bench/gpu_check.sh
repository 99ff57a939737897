#!/usr/bin/env bash
# One prepared check for a single-GPU machine with PyTorch, timm and accelerate installed
# (and this project: pip install -e ".[workflow]"). No internet needed; under 5 minutes.
# Prints: raw efficientnet_b3 forward+backward images/s at 224 px in bf16 (the ceiling), the
# workflow's own training images/s on the same settings and their ratio, a short real training
# run on the sample data through `accelerate launch` (bf16) with its metrics, and that the
# TorchScript export loads and runs on the GPU; with two or more GPUs also data-parallel training
# on two of them (multi_gpu) and its speed against one.
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root
#   SMOKE=1 bash bench/gpu_check.sh    # tiny settings, runs on a CPU (to test this script)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg
WORK=$(mktemp -d /tmp/imgembed-gpu-check.XXXX)
if [ "${SMOKE:-0}" = 1 ]; then
  BACKBONE=test_efficientnet SIZE=32 BATCH=16 P=4 ACC=cpu PREC=bf16 EPOCHS=1 RAW_STEPS=3
else
  BACKBONE=efficientnet_b3 SIZE=224 BATCH=64 P=8 ACC=gpu PREC=bf16 EPOCHS=3 RAW_STEPS=30
fi
echo "== environment"
python - <<PY
import torch, timm, accelerate
print("torch", torch.__version__, "timm", timm.__version__, "accelerate", accelerate.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-",
      "bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
PY

echo "== 1. raw timm forward+backward ($BACKBONE, ${SIZE}px, batch $BATCH, $PREC)"
python - "$BACKBONE" "$SIZE" "$BATCH" "$RAW_STEPS" > "$WORK/raw.txt" <<'PY'
import sys, time, torch, timm
name, size, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
dev = "cuda" if torch.cuda.is_available() else "cpu"
m = timm.create_model(name, pretrained=False, num_classes=0).to(dev).to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(m.parameters())
x = torch.randn(batch, 3, size, size, device=dev).to(memory_format=torch.channels_last)
def step():
    with torch.autocast(dev, dtype=torch.bfloat16):
        loss = m(x).float().pow(2).mean()
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
for _ in range(3): step()
if dev == "cuda": torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(steps): step()
if dev == "cuda": torch.cuda.synchronize()
print(f"{batch * steps / (time.perf_counter() - t):.1f}")
PY
RAW=$(cat "$WORK/raw.txt"); echo "raw images/s: $RAW"

echo "== 2. the workflow's training step, same settings (generated dataset, accelerate launch)"
python - "$WORK" "$SIZE" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from helpers import make_dataset_zip
make_dataset_zip(Path(sys.argv[1]) / "speed.zip", classes=16, per_split={"train": 48, "val": 8, "test": 8}, size=int(sys.argv[2]))
PY
cat > "$WORK/speed.yaml" <<YAML
model: {backbone: $BACKBONE, pretrained: false, image_size: $SIZE}
data: {classes_per_batch: $P, samples_per_class: $((BATCH / P)), num_workers: auto, augment: true}
train: {epochs: 2, warmup_epochs: 0, mixed_precision: $PREC, accelerate: $ACC}
YAML
python -m imgembed unpack "$WORK/speed.zip" -o "$WORK/speed" --configfile config/config.yaml "$WORK/speed.yaml"
accelerate launch --quiet --config_file "config/accelerate/$ACC.yaml" -m imgembed train "$WORK/speed" -o "$WORK/speed_model" \
  --live-dir "$WORK/speed_live" --configfile config/config.yaml "$WORK/speed.yaml"
WF=$(python -c "import json,sys; h=json.load(open(sys.argv[1]))['history']; print(round(h[-1]['train/images_per_s'],1))" "$WORK/speed_model/checkpoints/state.json")
echo "workflow images/s (epoch 2, incl. data loading, mining, logging): $WF"
python -c "print(f'RATIO gpu_train {float(\"$WF\") / float(\"$RAW\"):.3f}')"

echo "== 3. short real training on the sample data (snakemake, accelerate launch, $PREC)"
mkdir -p "$WORK/project" && cp -r Snakefile config workflow envs profiles dvc.yaml "$WORK/project/"
mkdir -p "$WORK/project/src/imgembed" && cp -r src/imgembed/schemas "$WORK/project/src/imgembed/"
cat > "$WORK/project/config/gpu_check.yaml" <<YAML
model: {backbone: $BACKBONE}
train: {epochs: $EPOCHS, mixed_precision: $PREC, accelerate: $ACC}
YAML
(cd "$WORK/project" && snakemake --cores all --quiet --configfile config/config.yaml config/gpu_check.yaml)
cat "$WORK/project/reports/sample/metrics.json"
grep -h "precision\|done:" "$WORK/project/logs/train/sample.log" | tail -3 || true

echo "== 4. TorchScript export on the GPU"
python - "$WORK/project/models/sample" <<'PY'
import json, sys, torch
d = sys.argv[1]; info = json.load(open(f"{d}/model.json"))
dev = "cuda" if torch.cuda.is_available() else "cpu"
net = torch.jit.load(f"{d}/embedding_net.pt", map_location=dev).eval()
with torch.no_grad():
    out = net(torch.randn(4, 3, info["image_size"], info["image_size"], device=dev))
print(f"embedding_net.pt runs on {out.device}: output {tuple(out.shape)}, norms {out.norm(dim=1).tolist()}")
PY
echo "== 5. data-parallel training on two GPUs (train.accelerate: multi_gpu; skipped with fewer than 2)"
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "${SMOKE:-0}" = 1 ]; then MULTI=multi_cpu; elif [ "$GPUS" -ge 2 ]; then MULTI=multi_gpu; else MULTI=; fi
if [ -z "$MULTI" ]; then
  echo "skipped: $GPUS GPU(s) visible"
else
  sed "s/accelerate: $ACC/accelerate: $MULTI/" "$WORK/speed.yaml" > "$WORK/speed2.yaml"
  accelerate launch --quiet --config_file "config/accelerate/$MULTI.yaml" -m imgembed train "$WORK/speed" -o "$WORK/speed2_model" \
    --live-dir "$WORK/speed2_live" --configfile config/config.yaml "$WORK/speed2.yaml" 2> "$WORK/speed2.log" || { tail -20 "$WORK/speed2.log"; exit 1; }
  tr '\r' '\n' < "$WORK/speed2.log" | grep "on cuda x2\|on cpu x2\|steps per epoch\|done:"  # not tqdm's bars
  WF2=$(python -c "import json,sys; h=json.load(open(sys.argv[1]))['history']; print(round(h[-1]['train/images_per_s'],1))" "$WORK/speed2_model/checkpoints/state.json")
  echo "workflow images/s on two processes (epoch 2): $WF2"
  python -c "print(f'RATIO two_process_vs_one {float(\"$WF2\") / float(\"$WF\"):.3f}')"
  test -s "$WORK/speed2_model/embedding_net.pt" && echo "export written once, by the main process: $WORK/speed2_model/embedding_net.pt"
fi
echo "outputs in $WORK"
