#!/usr/bin/env python3
"""`text-to-image`: a Stable-Diffusion-shaped pipeline on Kiln's worker SDK, built with diffusers.

The parts are diffusers' own (`UNet2DConditionModel`, `AutoencoderKL`, `DDIMScheduler` in a
`StableDiffusionPipeline`), built
from a config with random weights, so nothing is downloaded: the denoising loop, its steps, the
classifier-free guidance, the VAE decode, the memory and the time are those of the real thing;
the pictures are noise. Two configs:

  KILN_DIFFUSION_CONFIG=tiny   (default) a UNet of ~1.6 M parameters: 64x64 on a CPU in a second
  KILN_DIFFUSION_CONFIG=sd15   Stable Diffusion 1.5's shapes: a UNet of ~860 M parameters, the
                               SD VAE; 512x512 in 25 steps wants a GPU (float16 there)

The text encoder is a stand-in: each word of the prompt picks a fixed pseudo-random embedding
(seeded by the word's hash), so the same prompt gives the same conditioning in every process.
A real port loads CLIP here (`transformers.CLIPTextModel`); the UNet sees the same shapes.

Weights are drawn from a fixed seed, so every worker process (every slot, every restart) holds
the same model: the same prompt, seed and size give the same PNG bytes on the same device.
The loop is diffusers' `StableDiffusionPipeline` itself; its `callback_on_step_end` hook is where
progress, previews and cancel come in (docs/PROTOCOL.md, "Port your diffusers model").

Inputs:  prompt (string, required)
Params:  steps 1..150 (25), seed (0), width and height 8..2048, multiples of 8 (64 tiny, 512 sd15),
         guidance 0..30 (7.5), preview_every (steps between previews, 1; 0: none)
Output:  image.png

Progress: one `progress` event per denoising step (stage `inference`, message `step i/n`), then
`decoding`. Cancel is honoured between steps. A preview (the latents mapped to RGB by a fixed
linear map, no VAE: a few milliseconds) is offered every `preview_every` steps; the SDK sends at
most one per the model's `preview_interval_ms`.

Run it without Kiln (the same pipeline, for measuring Kiln's overhead against it):
  python3 examples/workers/text_to_image.py --direct --jobs 5 --steps 25 --width 64 --height 64
prints one JSON line per job with its run time, then a summary (`--stdin`: a job per line read,
its seed, each answered with its run time; tests/generation.rs interleaves these with jobs
through Kiln, so that both meet the same load).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

try:
    from kiln_worker import Job, UserError, Worker
except ImportError:  # run from a checkout without the SDK installed: use its source, beside us
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python" / "kiln-worker" / "src"))
    from kiln_worker import Job, UserError, Worker

# The weights' seed: every process builds the same model.
WEIGHTS_SEED = 1234
# Tokens the stand-in text encoder reads (CLIP's context length).
CONTEXT_TOKENS = 77

CONFIGS = {
    "tiny": {
        "unet": dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
        ),
        "vae": dict(
            block_out_channels=(32, 64),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            layers_per_block=1,
        ),
        "default_size": 64,
    },
    # Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5 unet/config.json, vae/config.json).
    "sd15": {
        "unet": dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        "vae": dict(
            block_out_channels=(128, 256, 512, 512),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
        ),
        "default_size": 512,
    },
}

# SD's latent -> RGB approximation (the "latent2rgb" factors previews commonly use): a preview
# costs a 4x3 matrix product, not a VAE decode.
LATENT_TO_RGB = [
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
]


class Pipeline:
    """The model: UNet, VAE and scheduler, on one device. No Kiln in here: `--direct` runs it
    alone, the worker below runs it for Kiln."""

    def __init__(self, config_name: str) -> None:
        import torch
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

        if config_name not in CONFIGS:
            raise ValueError(f"KILN_DIFFUSION_CONFIG must be one of {sorted(CONFIGS)}, got {config_name!r}")
        self.torch = torch
        self.config_name = config_name
        config = CONFIGS[config_name]
        self.default_size = config["default_size"]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        if self.device.type == "cpu":
            # A CPU slot is one core's worth of work: torch's default (a thread per core) makes
            # two slots, or a slot beside a build, fight over every core (10x slower here).
            torch.set_num_threads(int(os.environ.get("KILN_TORCH_THREADS", "1")))
        torch.manual_seed(WEIGHTS_SEED)
        # Built on the device itself: drawing 860 M random weights on a CPU takes longer than
        # the whole job on a GPU.
        with torch.device(self.device):
            self.unet = UNet2DConditionModel(**config["unet"]).to(self.dtype).eval()
            self.vae = AutoencoderKL(**config["vae"]).eval()
            if self.dtype != torch.float32:
                self.vae = self.vae.to(self.dtype)
        scheduler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        # diffusers' own Stable Diffusion pipeline, as a service would hold it after
        # `from_pretrained`; the prompt goes in as embeddings, so it needs no text encoder.
        self.pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=None,
            tokenizer=None,
            unet=self.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.text_dim = config["unet"]["cross_attention_dim"]
        self.latent_to_rgb = torch.tensor(LATENT_TO_RGB, dtype=torch.float32)

    def parameters(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())

    def encode_prompt(self, prompt: str):
        """The stand-in text encoder: one fixed embedding per word, seeded by the word."""
        torch = self.torch
        rows = []
        for word in prompt.lower().split()[:CONTEXT_TOKENS]:
            seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little") & ((1 << 63) - 1)
            rows.append(torch.randn(self.text_dim, generator=torch.Generator().manual_seed(seed)))
        rows += [torch.zeros(self.text_dim)] * (CONTEXT_TOKENS - len(rows))
        return torch.stack(rows).unsqueeze(0).to(self.device, self.dtype)

    def generate(self, prompt, steps, seed, width, height, guidance=7.5, on_step=None, preview_every=0, on_preview=None):
        """Runs the pipeline; `on_step(i, n)` after each step (it may raise, which stops the loop
        there), and `on_preview(latents)` every `preview_every` steps. Returns the PNG bytes."""
        torch = self.torch

        def step_end(pipe, i, timestep, tensors):
            # diffusers calls this after each denoising step (`callback_on_step_end`): the one
            # hook a port needs for progress, previews and cancel.
            done = i + 1
            if on_preview is not None and preview_every > 0 and done % preview_every == 0 and done < steps:
                on_preview(tensors["latents"])
            if on_step is not None:
                on_step(done, steps)
            return tensors

        with torch.inference_mode():
            negative = self.encode_prompt("")
            image = self.pipe(
                prompt_embeds=self.encode_prompt(prompt),
                negative_prompt_embeds=negative,
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=width,
                height=height,
                # A CPU generator: the same noise from the same seed on every device.
                generator=torch.Generator().manual_seed(seed),
                callback_on_step_end=step_end,
                output_type="pt",
            ).images[0]
        return png(image)

    def preview_png(self, latents) -> bytes:
        """The latents as a small RGB picture, without the VAE."""
        rgb = self.torch.einsum("chw,cr->rhw", latents[0].float().cpu(), self.latent_to_rgb)
        return png(((rgb + 1) / 2).clamp(0, 1))

    def memory_bytes(self) -> int:
        """What the model holds on its GPU (0 on the CPU: the node measures the process)."""
        if self.device.type != "cuda":
            return 0
        return int(self.torch.cuda.memory_reserved(self.device))


def png(chw) -> bytes:
    """A [3, h, w] tensor in 0..1 as PNG bytes."""
    from PIL import Image

    array = (chw.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype("uint8")
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def size_param(job: Job, name: str, default: int) -> int:
    value = job.int_param(name, default, 8, 2048)
    if value % 8:
        raise UserError(f"param {name} must be a multiple of 8, got {value}")
    return value


class TextToImage(Worker):
    name = "text_to_image"

    def load(self) -> None:
        started = time.monotonic()
        self.pipeline = Pipeline(os.environ.get("KILN_DIFFUSION_CONFIG", "tiny"))
        self.diag(
            f"loaded {self.pipeline.config_name}: UNet of {self.pipeline.parameters():,} parameters "
            f"on {self.pipeline.device} in {time.monotonic() - started:.1f} s"
        )

    def warmup(self) -> None:
        # One step at a small size: CUDA kernels and allocator pools are ready for the first
        # job. On a GPU the SDK then reports CUDA's reserved memory to Kiln by itself (the
        # figure the slot's memory budget counts); on a CPU slot Kiln measures the process.
        self.pipeline.generate("warmup", 1, 0, 64, 64)

    def run(self, job: Job):
        prompt = job.inputs.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError("input prompt is required: a non-empty string")
        pipeline = self.pipeline
        steps = job.int_param("steps", 25, 1, 150)
        seed = job.int_param("seed", 0, 0, 2**63 - 1)
        width = size_param(job, "width", pipeline.default_size)
        height = size_param(job, "height", pipeline.default_size)
        guidance = job.number_param("guidance", 7.5, 0, 30)
        preview_every = job.int_param("preview_every", 1, 0, 150)

        def on_step(i: int, n: int) -> None:
            job.progress(100.0 * i / (n + 1), stage="inference", message=f"step {i}/{n}")
            job.check_cancelled()
            if i == n:
                job.progress(100.0 * n / (n + 1), stage="decoding", message="VAE decode")

        def on_preview(latents) -> None:
            # Encoding is skipped when the SDK would drop the preview anyway.
            if job.preview_due():
                job.preview(pipeline.preview_png(latents), "image/png")

        image = pipeline.generate(prompt, steps, seed, width, height, guidance, on_step, preview_every, on_preview)
        job.write_bytes("image.png", image, content_type="image/png")


def direct(argv) -> None:
    """The same pipeline, called directly: the floor Kiln's figure is compared with."""
    parser = argparse.ArgumentParser(description="run the text-to-image pipeline without Kiln")
    parser.add_argument("--direct", action="store_true")
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--prompt", default="a lighthouse at dusk")
    parser.add_argument("--out", default=None, help="write the last image here")
    parser.add_argument("--stdin", action="store_true", help="run one job per line read (its seed), answering its time: to interleave with jobs through Kiln")
    args = parser.parse_args(argv)
    started = time.monotonic()
    pipeline = Pipeline(os.environ.get("KILN_DIFFUSION_CONFIG", "tiny"))
    load_s = time.monotonic() - started
    width = args.width or pipeline.default_size
    height = args.height or pipeline.default_size
    pipeline.generate("warmup", 1, 0, 64, 64)
    if args.stdin:
        print(json.dumps({"ready": True, "load_s": round(load_s, 3)}), flush=True)
        for line in sys.stdin:
            t0 = time.monotonic()
            pipeline.generate(args.prompt, args.steps, int(line), width, height)
            if pipeline.device.type == "cuda":
                pipeline.torch.cuda.synchronize()
            print(json.dumps({"job": int(line), "run_s": round(time.monotonic() - t0, 4)}), flush=True)
        return
    times = []
    image = b""
    for seed in range(args.jobs):
        t0 = time.monotonic()
        image = pipeline.generate(args.prompt, args.steps, seed, width, height)
        if pipeline.device.type == "cuda":
            pipeline.torch.cuda.synchronize()
        times.append(time.monotonic() - t0)
        print(json.dumps({"job": seed, "run_s": round(times[-1], 4)}), flush=True)
    if args.out:
        Path(args.out).write_bytes(image)
    times.sort()
    print(
        json.dumps(
            {
                "config": pipeline.config_name,
                "device": str(pipeline.device),
                "unet_parameters": pipeline.parameters(),
                "load_s": round(load_s, 3),
                "jobs": args.jobs,
                "steps": args.steps,
                "size": [width, height],
                "run_s_mean": round(sum(times) / len(times), 4),
                "run_s_median": round(times[len(times) // 2], 4),
                "gpu_memory_bytes": pipeline.memory_bytes(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    if "--direct" in sys.argv[1:]:
        direct(sys.argv[1:])
    else:
        TextToImage().serve()
