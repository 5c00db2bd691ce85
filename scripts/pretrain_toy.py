"""Pretrain the toy pipelines (krona_cli/pipeline/toy.py) from scratch on the toy world (krona_cli/world/scenes.py).

    python scripts/pretrain_toy.py sd15 --threads 1  # text encoders + UNet, jointly, on the shipped VAE: 37 minutes
    python scripts/pretrain_toy.py sdxl --threads 1  # the same for the toy SDXL (side by side, one core each)
    python scripts/pretrain_toy.py vae --threads 2   # the VAE both pipelines share (10 minutes on 2 cores)
    python scripts/pretrain_toy.py flux --threads 1  # the toy FLUX.1's text encoders + transformer on the same VAE

Deterministic for a given thread count (--threads; set the same OMP_NUM_THREADS): the same command gives the same
weights. The diffusion stages read the VAE stage's file, or where it is absent (it is not shipped) the VAE in the
shipped toy SDXL weights (fp16): the shipped toy SDXL and SD 1.5 were made that way (the first two commands, in a
fresh clone; docs/toy.md), so they re-create them; after the VAE stage, the diffusion stages train on its VAE instead.
The VAE learns world scenes and "dead leaves" pictures of random shapes in random colours, two-tone fills
included, so that it can code looks the world never shows; the text encoders and the UNet see only world scenes with
the held-out (colour, shape) pairs left out, captioned with varied wording, 10% of captions dropped (empty prompt for
SD 1.5, zero embeddings for SDXL, as its pipeline's classifier-free guidance uses), min-SNR-5 weighted v-prediction
loss on DDPM's linear noise schedule (krona_cli/pipeline/toy.py says why); the toy FLUX with flow matching and
FLUX.1 [dev]'s guidance input, distilled online (flux_loss says how); EMA of the weights (what is shipped). Writes
krona_cli/weights/toy-<arch>.safetensors (fp16, with the settings, time and losses in its metadata) and prints a line
per 100 steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from krona_cli import families
from krona_cli.pipeline.toy import WEIGHTS_DIR, build_toy_pipeline, read_weights, toy_vae, weights_file
from krona_cli.world.scenes import SIZE, caption, dead_leaves, random_scene, render

VAE_FILE = WEIGHTS_DIR / "toy-vae-pretrain.safetensors"  # the shared VAE between the two stages (not shipped)
TIME_IDS = (SIZE, SIZE, 0, 0, SIZE, SIZE)
DISTILL_FROM = 0.75  # the toy FLUX's guidance distillation: the last quarter of its steps


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(args) -> None:
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    vae = toy_vae()
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr or 1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * (0.1 + 0.9 * (1 + math.cos(math.pi * s / args.steps)) / 2)
    )
    start, losses = time.time(), []
    for step in range(args.steps):
        images = [render(random_scene(rng), rng) if rng.random() < 0.6 else dead_leaves(rng) for _ in range(args.batch)]
        x = to_tensor(images)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        loss = mse + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(mse.item())
        if (step + 1) % 100 == 0:
            print(
                f"vae step {step + 1}/{args.steps} mse {np.mean(losses[-100:]):.5f} {time.time() - start:.0f}s",
                flush=True,
            )
    vae.eval()
    with torch.no_grad():
        x = to_tensor([render(random_scene(rng), rng) for _ in range(512)])
        latents = vae.encode(x).latent_dist.mean
        scaling = 1.0 / latents.std().item()
        recon_mse = F.mse_loss(vae.decode(latents).sample, x).item()
    meta = {
        "scaling_factor": scaling,
        "steps": args.steps,
        "batch": args.batch,
        "seconds": round(time.time() - start),
        "world_mse": recon_mse,
        "threads": torch.get_num_threads(),
        "seed": args.seed,
    }
    print(json.dumps(meta))
    save_file(
        {k: v.contiguous() for k, v in vae.state_dict().items()}, VAE_FILE, metadata={"krona_toy": json.dumps(meta)}
    )


def encode_text(pipe, arch: str, captions: list[str], drop: torch.Tensor):
    """(prompt embeddings, pooled embeddings or None) as the pipeline computes them; dropped captions are the
    pipeline's unconditional input (SDXL: zeros; SD 1.5: the empty prompt)."""
    family = families.get(arch)
    if arch == "sd15":
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        return family.encode_prompts(family.tokenizers(pipe), family.text_models(pipe), captions).embeds, None
    cond = family.encode_prompts(family.tokenizers(pipe), family.text_models(pipe), captions)
    keep = (~drop).float()
    return cond.embeds * keep[:, None, None], cond.pooled * keep[:, None]


def shared_vae() -> tuple[dict, dict]:
    """The VAE both pipelines share and the settings it was made with: the VAE stage's file, or where that is absent
    (it is not shipped), the VAE in the shipped toy SDXL weights (the same weights in fp16), so that one pipeline can
    be pretrained again without the VAE stage."""
    if VAE_FILE.is_file():
        return read_weights(VAE_FILE)
    shipped, meta = read_weights(weights_file("sdxl"))
    state = {key[4:]: value for key, value in shipped.items() if key.startswith("vae.")}
    print(f"{VAE_FILE.name} is absent: the VAE of {weights_file('sdxl').name} (fp16) is used", flush=True)
    return state, {
        "scaling_factor": meta["scaling_factor"],
        "seconds": meta["vae_seconds"],
        "world_mse": meta["vae_world_mse"],
    }


def unet_loss(pipe, arch: str, batch: int):
    """The toy SDXL's and SD 1.5's loss of a batch: min-SNR-5 weighted v-prediction on DDPM's linear schedule, 10% of
    captions dropped."""
    alphas = pipe.scheduler.alphas_cumprod
    time_ids = torch.tensor([TIME_IDS] * batch, dtype=torch.float32)

    def loss(x0: torch.Tensor, captions: list[str], rng, step: int) -> torch.Tensor:
        drop = torch.from_numpy(rng.random(batch) < 0.1)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,))
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        embeds, pooled = encode_text(pipe, arch, captions, drop)
        extra = {} if pooled is None else {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        pred = pipe.unet(noisy, t, encoder_hidden_states=embeds, **extra).sample
        velocity = a.sqrt() * noise - (1 - a).sqrt() * x0
        snr = a.view(-1) / (1 - a.view(-1))
        weight = torch.clamp(snr, max=5.0) / (snr + 1)  # min-SNR-5 for v-prediction
        return (F.mse_loss(pred, velocity, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()

    return loss


def flux_loss(pipe, ema: list, steps: int):
    """The toy FLUX's loss of a batch: flow matching as krona trains it (the scheduler's noise levels, shifted by the
    token count; target ε − x0), then FLUX.1 [dev]'s guidance distillation, done online. For the first DISTILL_FROM
    of the ``steps``, plain flow matching at guidance 1 with 10% of captions empty (a base model). From then on, half
    the batch stays so (a fifth of those captions empty); the other half gets a guidance g drawn from U(1, 5) and, as
    its target, the EMA model's classifier-free guided velocity u + g·(c − u) at guidance 1 (c with the caption, u
    with the empty prompt), so the guidance input comes to mean what it means in [dev]. (Distilling from the start
    held the model to its own EMA on half of every batch: 47% of object colours right after 6,800 steps.)"""
    family = families.get("flux")
    objective = family.objective(pipe.scheduler.config)
    tokenizers = family.tokenizers(pipe)
    teacher, *teacher_text = ema

    def velocity(transformer, noisy, sigmas, guidance, cond) -> torch.Tensor:
        """The transformer's velocity for ``noisy`` latents at ``sigmas`` (its timesteps), each at its own guidance."""
        return family.denoise(transformer, noisy, sigmas, cond, None, torch.float32, guidance=guidance)

    def loss(x0: torch.Tensor, captions: list[str], rng, step: int) -> torch.Tensor:
        batch = x0.shape[0]
        distilling = step >= DISTILL_FROM * steps
        guided = torch.from_numpy(rng.random(batch) < 0.5) & distilling
        drop = torch.from_numpy(rng.random(batch) < (0.2 if distilling else 0.1)) & ~guided
        guidance = torch.where(guided, 1 + 4 * torch.from_numpy(rng.random(batch)).float(), torch.ones(batch))
        noise = torch.randn_like(x0)
        sigmas = objective.sigmas_for(torch.rand(batch), tuple(x0.shape))
        noisy = objective.noisy(x0, noise, sigmas)
        target = objective.target(x0, noise, sigmas)
        if guided.any():
            with torch.no_grad():
                k = int(guided.sum())
                shown = [c for c, g in zip(captions, guided.tolist()) if g]
                both = family.encode_prompts(tokenizers, teacher_text, shown + [""] * k)
                ones = torch.ones(2 * k)
                v = velocity(teacher, noisy[guided].repeat(2, 1, 1, 1), sigmas[guided].repeat(2), ones, both)
                c, u = v[:k], v[k:]
                target[guided] = u + guidance[guided].view(-1, 1, 1, 1) * (c - u)
        given = ["" if d else c for c, d in zip(captions, drop.tolist())]
        cond = family.encode_prompts(tokenizers, family.text_models(pipe), given)
        pred = velocity(pipe.transformer, noisy, sigmas, guidance, cond)
        return F.mse_loss(pred, target)

    return loss


def train_diffusion(args) -> None:
    arch = args.stage
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    pipe = build_toy_pipeline(arch, weights=False)
    vae_state, vae_meta = shared_vae()
    pipe.vae.load_state_dict(vae_state)
    pipe.vae.register_to_config(scaling_factor=vae_meta["scaling_factor"])
    scaling = vae_meta["scaling_factor"]

    start = time.time()
    # the bank of scenes: rendered and encoded once (latent means), captions drawn anew at every use
    scenes = [random_scene(rng) for _ in range(args.bank)]
    latents = []
    with torch.no_grad():
        for i in range(0, args.bank, 256):
            x = to_tensor([render(s, rng) for s in scenes[i : i + 256]])
            latents.append(pipe.vae.encode(x).latent_dist.mean * scaling)
    latents = torch.cat(latents)
    print(
        f"{arch}: {args.bank} scenes encoded in {time.time() - start:.0f}s, latent std {latents.std():.3f}", flush=True
    )

    family = families.get(arch)
    models = [getattr(pipe, family.denoiser), *family.text_models(pipe)]
    for m in models:
        m.train()
    params = [p for m in models for p in m.parameters()]
    ema = [copy.deepcopy(m).eval().requires_grad_(False) for m in models]
    args.lr = args.lr or 8e-4
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    warmup = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * (1 + math.cos(math.pi * s / args.steps)) / 2)
    )
    step_loss = flux_loss(pipe, ema, args.steps) if arch == "flux" else unet_loss(pipe, arch, args.batch)
    losses = []
    for step in range(args.steps):
        index = torch.from_numpy(rng.integers(0, args.bank, args.batch))
        x0 = latents[index].float()
        captions = [caption(scenes[i], rng) for i in index.tolist()]
        loss = step_loss(x0, captions, rng, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for live, avg in zip(models, ema):
                for p, q in zip(live.parameters(), avg.parameters()):
                    q.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(
                f"{arch} step {step + 1}/{args.steps} loss {np.mean(losses[-100:]):.4f} {time.time() - start:.0f}s",
                flush=True,
            )
        if (step + 1) % 400 == 0 and step + 1 < args.steps:
            save(arch, ema, vae_state, args, scaling, vae_meta, start, losses, done=step + 1)

    save(arch, ema, vae_state, args, scaling, vae_meta, start, losses)


def save(arch, ema, vae_state, args, scaling, vae_meta, start, losses, done: int | None = None) -> None:
    """The EMA weights as the shipped file (also part-way, ``done`` steps in, so a long run can be tried early)."""
    names = [families.get(arch).denoiser, "text_encoder", "text_encoder_2"][: len(ema)]
    state = {f"vae.{k}": v for k, v in vae_state.items()}
    for name, model in zip(names, ema):
        state |= {f"{name}.{k}": v for k, v in model.state_dict().items()}
    meta = {
        "scaling_factor": scaling,
        "arch": arch,
        "steps": done or args.steps,
        "batch": args.batch,
        "bank": args.bank,
        "lr": args.lr,
        "seconds": round(time.time() - start),
        "vae_seconds": vae_meta["seconds"],
        "vae_world_mse": vae_meta["world_mse"],
        "final_loss": float(np.mean(losses[-200:])),
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "ema": args.ema,
    }
    print(json.dumps(meta), flush=True)
    save_file(
        {k: v.half().contiguous() for k, v in state.items()},
        weights_file(arch),
        metadata={"krona_toy": json.dumps(meta)},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["vae", "sdxl", "sd15", "flux"])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--bank", type=int, default=16000, help="world scenes rendered and encoded once")
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.stage == "vae":
        args.steps, args.batch = args.steps or 800, args.batch or 16
        train_vae(args)
    else:
        # batch 16 for 10,800 steps: shapes come late, after about 6,000 steps (docs/toy.md); at batch 48 for 1,800
        # steps, or 16 for 4,500, the toy pipelines drew blobs
        args.steps, args.batch = args.steps or 10_800, args.batch or 16
        train_diffusion(args)


if __name__ == "__main__":
    main()
