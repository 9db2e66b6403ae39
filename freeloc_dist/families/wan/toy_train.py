"""Training of the toy Wan (freeloc_dist.families.wan.toy) on clips of the procedural world.

One process, one loop, a wall-clock budget: every iteration takes a flow-matching step of the transformer
on TRAINED_FRAMES-latent-frame clips, and every `decoder_every`-th iteration (0: never; the shipped model
trains its decoder in a second process with `train_decoder`) a reconstruction step of the VAE decoder.
Clips are drawn fresh from random world seeds (never from the evaluation seeds, which start at
EVAL_SEED_BASE). Text embeddings of every possible prompt are computed once with the frozen text encoder.
The loss goes to a log file; the model (EMA transformer weights) is saved in diffusers format every
`save_minutes` and at the end, so an interrupted run leaves a usable checkpoint.

Objective (Wan's rectified flow): x_s = (1 - s) x0 + s e, the model predicts e - x0 at timestep 1000 s,
with s = shift u / (1 + (shift - 1) u), u ~ U(0, 1) and the shift of inference (3).
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from freeloc_dist.sampling import encode_prompt
from freeloc_dist.testbed import world as tw

from . import toy as tm

EVAL_SEED_BASE = 10**9  # training never draws a world seed at or above this


def all_prompts() -> list[str]:
    """Every prompt the world can produce (1 or 2 objects of distinct colours)."""
    objs = [(c, s) for c in tw.COLOURS for s in tw.SHAPES]
    one = [f"a {c} {s}" for c, s in objs]
    two = [f"a {c1} {s1} and a {c2} {s2}" for (c1, s1), (c2, s2) in itertools.product(objs, objs) if c1 != c2]
    return one + two


@dataclass
class TrainConfig:
    out_dir: Path
    minutes: float = 70.0
    batch: int = 16
    decoder_batch: int = 2
    decoder_every: int = 6
    decoder_frames: int = 3  # latent frames per decoder clip (first chunk + two 4-frame chunks)
    lr: float = 1e-3
    decoder_lr: float = 1e-3
    warmup: int = 200
    ema: float = 0.999
    cfg_dropout: float = 0.1
    shift: float = 3.0
    save_minutes: float = 5.0
    seed: int = 0
    threads: int = 1
    max_steps: int | None = None  # for smoke runs
    trained_frames: int = tm.TRAINED_FRAMES  # latent frames per clip
    transformer_overrides: dict | None = None  # entries of tm.TRANSFORMER_CONFIG to change (experiments)


def clip_batch(rng: np.random.Generator, n: int, frames: int, stride: int = 1) -> tuple[np.ndarray, list[str]]:
    """n random training clips: uint8 [n, frames / stride, P, P, 3] and their prompts."""
    worlds = [tw.sample_world(int(rng.integers(EVAL_SEED_BASE))) for _ in range(n)]
    return (np.stack([tw.render(w, frames, tm.VIDEO_SIZE, stride) for w in worlds]),
            [w.prompt for w in worlds])


def keyframe_latents(vae_config, keyframes: np.ndarray, frames: int) -> torch.Tensor:
    """Normalised latents [B, C, F, H, W] of stride-4 renders uint8 [B, F, P, P, 3] of `frames` video frames.

    The latent keeps only frames 0, 4, 8, ..., so pack_latents of the stride-4 render repeated is the same."""
    return tm.normalise(vae_config, tm.pack_latents(np.repeat(keyframes, 4, axis=1)[:, :frames]))


def noised(x0: torch.Tensor, s: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The flow objective at noise levels s [B]: (x_s, target e - x0)."""
    s = s.view(-1, *[1] * (x0.dim() - 1))
    return (1 - s) * x0 + s * noise, noise - x0


def latent_statistics(num_clips: int = 256, seed: int = 12345) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(seed)
    video, _ = clip_batch(rng, num_clips, 1)
    z = tm.pack_latents(video)  # [N, C, 1, H, W]
    return z.mean(dim=(0, 2, 3, 4)).tolist(), z.std(dim=(0, 2, 3, 4)).tolist()


def train(cfg: TrainConfig, log=print) -> Path:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    mean, std = latent_statistics()
    parts = tm.build_toy_components(cfg.seed, mean, std, cfg.transformer_overrides)
    transformer, vae = parts.transformer.train(), parts.vae.train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)

    prompts = all_prompts()
    with torch.no_grad():
        table = {p: encode_prompt(parts, p, tm.MAX_TEXT_TOKENS)[0]
                 for p in prompts + [""]}  # [L, D] each

    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.99))
    dec_params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    dec_opt = torch.optim.AdamW(dec_params, lr=cfg.decoder_lr, weight_decay=0.0)
    frames = 4 * (cfg.trained_frames - 1) + 1
    out_dir = Path(cfg.out_dir)
    log_path = out_dir.with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = last_save = time.perf_counter()
    budget = cfg.minutes * 60
    loss_avg = dec_avg = None

    def save():
        ema_parts = tm.Components(transformer=ema, vae=vae.eval(), text_encoder=parts.text_encoder,
                                     tokenizer=parts.tokenizer, scheduler=parts.scheduler,
                                     trained_frames=cfg.trained_frames)
        tm.save_components(ema_parts, out_dir)
        vae.train()

    for step in itertools.count(1):
        elapsed = time.perf_counter() - start
        if elapsed > budget or (cfg.max_steps is not None and step > cfg.max_steps):
            break
        # Linear warm-up, then cosine decay over the wall-clock budget to 10% of the peak.
        frac = min(elapsed / budget, 1.0)
        scale = min(1.0, step / cfg.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = cfg.lr * scale

        keyframes, texts = clip_batch(rng, cfg.batch, frames, stride=4)
        x0 = keyframe_latents(vae.config, keyframes, frames)
        texts = ["" if rng.random() < cfg.cfg_dropout else t for t in texts]
        cond = torch.stack([table[t] for t in texts])  # [B, L, D]
        u = torch.rand(cfg.batch)
        s = cfg.shift * u / (1 + (cfg.shift - 1) * u)  # [B]
        xs, target = noised(x0, s, torch.randn_like(x0))
        pred = transformer(hidden_states=xs, timestep=s * 1000, encoder_hidden_states=cond, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), transformer.parameters()):
                pe.lerp_(p, 1 - d)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()

        if cfg.decoder_every and step % cfg.decoder_every == 0:
            dec_loss = decoder_step(vae, dec_params, dec_opt, rng, cfg.decoder_batch, cfg.decoder_frames,
                                    torch.tensor(std).view(1, -1, 1, 1, 1), object_weight=1.0)
            dec_avg = dec_loss if dec_avg is None else 0.95 * dec_avg + 0.05 * dec_loss

        if step % 25 == 0 or step == 1:
            line = (f"step {step} t {elapsed / 60:.1f}min loss {loss.item():.4f} avg {loss_avg:.4f} "
                    f"dec {dec_avg if dec_avg is not None else float('nan'):.4f} lr {cfg.lr * scale:.2e}")
            log(line)
            with open(log_path, "a") as fh:
                fh.write(line + "\n")
        if time.perf_counter() - last_save > cfg.save_minutes * 60:
            save()
            last_save = time.perf_counter()
    save()
    with open(log_path, "a") as fh:
        fh.write(f"done: {step - 1} steps in {(time.perf_counter() - start) / 60:.1f} min\n")
    return out_dir


def decoder_step(vae, params, opt, rng, batch: int, latent_frames: int, std: torch.Tensor, *,
                 object_weight: float) -> float:
    """One reconstruction step of the VAE decoder on fresh clips; returns the loss.

    Loss: L1 + L2 per pixel, pixels of saturated (object) colour weighted `object_weight` times. The latents
    get a little noise (x `std` [1, C, 1, 1, 1]): sampled latents are never exact, the decoder should not care."""
    video, _ = clip_batch(rng, batch, 4 * (latent_frames - 1) + 1)
    target = (torch.as_tensor(video).float() / 127.5 - 1).permute(0, 4, 1, 2, 3)  # [b, 3, V, P, P]
    z = tm.pack_latents(video)
    z = z + 0.03 * torch.randn_like(z) * std
    err = tm.decode_frames(vae, z) - target
    sat = target.amax(1, keepdim=True) - target.amin(1, keepdim=True)  # [b, 1, V, P, P], 0..2
    weight = 1 + (object_weight - 1) * (sat > 0.4).float()
    loss = ((err.abs() + err**2) * weight).mean() / weight.mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()


def train_decoder(init_dir: Path, out_dir: Path, minutes: float, *, batch: int = 2, lr: float = 1e-3,
                  seed: int = 1, threads: int = 1, save_minutes: float = 5.0, log=print) -> Path:
    """Decoder-only training of the VAE in `init_dir`/vae (same latent scheme), saved to `out_dir`/vae.

    The decoder learns more slowly than the transformer; this runs beside (or after) `train`, and the
    shipped checkpoint takes its VAE from here."""
    from diffusers import AutoencoderKLWan

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 10**6)
    vae = AutoencoderKLWan.from_pretrained(init_dir, subfolder="vae", local_files_only=True).train()
    # the statistics of the current world (the transformer's run computes the same ones)
    mean, std_list = latent_statistics()
    vae.register_to_config(latents_mean=mean, latents_std=std_list)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    out_dir = Path(out_dir)
    log_path = out_dir.with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = last_save = time.perf_counter()
    budget = minutes * 60
    avg = None
    for step in itertools.count(1):
        elapsed = time.perf_counter() - start
        if elapsed > budget:
            break
        frac = min(elapsed / budget, 1.0)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / 50) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        # objects cover ~8% of a frame: weight their pixels up, or the decoder learns only the background
        loss = decoder_step(vae, params, opt, rng, batch, 3, std, object_weight=10.0)
        avg = loss if avg is None else 0.95 * avg + 0.05 * loss
        if step % 25 == 0 or step == 1:
            line = f"step {step} t {elapsed / 60:.1f}min loss {loss:.4f} avg {avg:.4f}"
            log(line)
            with open(log_path, "a") as fh:
                fh.write(line + "\n")
        if time.perf_counter() - last_save > save_minutes * 60:
            vae.eval().save_pretrained(out_dir / "vae")
            vae.train()
            last_save = time.perf_counter()
    vae.eval().save_pretrained(out_dir / "vae")
    with open(log_path, "a") as fh:
        fh.write(f"done: {step - 1} steps\n")
    return out_dir
