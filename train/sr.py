"""Train a visattn super-resolution model (L1, Adam, cosine schedule, EMA), BasicSR-style.

    python train/sr.py --model visattn_pan_x2 --iters 3000 --out visattn/weights/pan_x2_skimage.safetensors

The data are the photos that ship with scikit-image (no download): HR images as they are, LR by
MATLAB-compatible bicubic downscaling (``visattn.metrics.imresize_bicubic``) of the whole image,
random aligned HR/LR crops with flips and 90-degree rotations. ``HOLDOUT`` images are never trained
on: after training, the EMA weights are evaluated on them (PSNR / SSIM on Y, crop = scale) against
bicubic upsampling and saved as safetensors with a JSON of the numbers beside them.

Optimizer, schedule and EMA come from timm (``create_optimizer_v2``, ``CosineLRScheduler``,
``ModelEmaV3``). One process on one device; the training issue adds multi-GPU recipes.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

import visattn  # noqa: F401  (registers the models)
from visattn.metrics import imresize_bicubic, psnr, ssim

# scikit-image's bundled photos (gray ones are replicated to RGB); the held-out ones are real photos.
TRAIN = ["coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
         "brick", "grass", "gravel", "moon", "clock", "coins", "cell", "page", "text"]
HOLDOUT = ["astronaut", "chelsea", "camera"]


def load_photo(name: str) -> np.ndarray:
    """A scikit-image photo as ``H x W x 3`` float32 in [0, 1]."""
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img[..., :3].astype(np.float32) / 255.0


def make_pair(hr: np.ndarray, scale: int) -> Tuple[np.ndarray, np.ndarray]:
    """HR cropped to a multiple of ``scale`` and its MATLAB-bicubic LR, both float32 ``H x W x 3``."""
    H, W = hr.shape[0] // scale * scale, hr.shape[1] // scale * scale
    hr = hr[:H, :W]
    return hr, imresize_bicubic(hr, 1.0 / scale).astype(np.float32)


class PatchSampler:
    """Random aligned LR/HR patches from whole-image pairs, with the 8 flip/rotation variants."""

    def __init__(self, pairs: Sequence[Tuple[np.ndarray, np.ndarray]], scale: int, lr_patch: int, seed: int):
        self.pairs = [(torch.from_numpy(hr).permute(2, 0, 1), torch.from_numpy(lr).permute(2, 0, 1)) for hr, lr in pairs]
        # Pick images in proportion to their area, so every region is equally likely.
        areas = np.array([lr.shape[1] * lr.shape[2] for _, lr in self.pairs], dtype=np.float64)
        self.weights = areas / areas.sum()
        self.scale, self.lr_patch = scale, lr_patch
        self.rng = np.random.default_rng(seed)

    def batch(self, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        lrs, hrs = [], []
        p, s = self.lr_patch, self.scale
        for i in self.rng.choice(len(self.pairs), size=size, p=self.weights):
            hr, lr = self.pairs[i]
            y = int(self.rng.integers(0, lr.shape[1] - p + 1))
            x = int(self.rng.integers(0, lr.shape[2] - p + 1))
            lr_crop, hr_crop = lr[:, y:y + p, x:x + p], hr[:, y * s:(y + p) * s, x * s:(x + p) * s]
            k, flip = int(self.rng.integers(0, 4)), bool(self.rng.integers(0, 2))
            lr_crop, hr_crop = (torch.rot90(t, k, (1, 2)) for t in (lr_crop, hr_crop))
            if flip:
                lr_crop, hr_crop = lr_crop.flip(2), hr_crop.flip(2)
            lrs.append(lr_crop)
            hrs.append(hr_crop)
        return torch.stack(lrs), torch.stack(hrs)


@torch.no_grad()
def evaluate(model: torch.nn.Module, pairs: Dict[str, Tuple[np.ndarray, np.ndarray]], scale: int,
             device: torch.device) -> List[Dict[str, float]]:
    """PSNR / SSIM (Y, crop = scale) of the model and of bicubic upsampling on each pair."""
    model.eval()
    rows = []
    for name, (hr, lr) in pairs.items():
        x = torch.from_numpy(lr).permute(2, 0, 1)[None].to(device)
        sr = model(x).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
        bicubic = np.clip(imresize_bicubic(lr, scale), 0, 1)
        rows.append(dict(image=name, psnr=psnr(sr, hr, scale), ssim=ssim(sr, hr, scale),
                         bicubic_psnr=psnr(bicubic, hr, scale), bicubic_ssim=ssim(bicubic, hr, scale)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a visattn SR model name, e.g. visattn_pan_x2")
    parser.add_argument("--iters", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr-patch", type=int, default=32, help="LR patch side (HR = scale x this)")
    parser.add_argument("--lr", type=float, default=7e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", required=True, help="the .safetensors file for the EMA weights")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = timm.create_model(args.model, pretrained=False).to(device)
    scale = model.upscale
    train_pairs = [make_pair(load_photo(n), scale) for n in TRAIN]
    holdout = {n: make_pair(load_photo(n), scale) for n in HOLDOUT}
    sampler = PatchSampler(train_pairs, scale, args.lr_patch, args.seed)

    optimizer = create_optimizer_v2(model, opt="adam", lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    scheduler = CosineLRScheduler(optimizer, t_initial=args.iters, lr_min=1e-6, warmup_t=args.warmup,
                                  warmup_lr_init=args.lr * 0.01, t_in_epochs=False)
    # EMA warm-up: the average starts short and lengthens to 1 / (1 - decay) steps, so a short run's
    # EMA does not drag along its first, untrained weights.
    ema = ModelEmaV3(model, decay=args.ema, use_warmup=True)
    start = time.time()
    for step in range(1, args.iters + 1):
        model.train()
        lr_batch, hr_batch = (t.to(device) for t in sampler.batch(args.batch))
        loss = F.l1_loss(model(lr_batch), hr_batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step_update(step)
        ema.update(model, step)
        if step % 100 == 0 or step == args.iters:
            print(f"step {step}/{args.iters}  L1 {loss.item():.4f}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                  f"{time.time() - start:.0f}s", flush=True)

    rows = evaluate(ema.module, holdout, scale, device)
    for r in rows:
        print(f"{r['image']:12s} PSNR {r['psnr']:.2f} dB (bicubic {r['bicubic_psnr']:.2f})  "
              f"SSIM {r['ssim']:.4f} (bicubic {r['bicubic_ssim']:.4f})")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in ema.module.state_dict().items()}
    save_file(state, args.out, metadata={"model": args.model, "iters": str(args.iters), "data": "scikit-image photos"})
    command = "python train/sr.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                 if k not in ("device", "threads"))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(dict(model=args.model, command=command, train_images=TRAIN, holdout=rows,
                       seconds=round(time.time() - start)), f, indent=1)


if __name__ == "__main__":
    main()
