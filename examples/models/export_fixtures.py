#!/usr/bin/env python3
"""Export the small TorchScript fixture models used by Kiln's Rust engine tests.

Usage:
    python examples/models/export_fixtures.py [OUT_DIR]

OUT_DIR defaults to ``examples/models/out`` (the ``out`` folder next to this
script).  The script writes one ``<name>.pt`` per fixture, ``broken.pt`` (not a
model) and ``manifest.json``, then loads every model back with
``torch.jit.load``, cross-checks it and records reference outputs in the
manifest.  It exits non-zero if any check fails.

The script is deterministic and idempotent: running it twice, or from a
different checkout location, produces byte-identical files (given the same
torch version).  It only needs the standard library, torch and numpy, and runs
on CPU.  The calling conventions the models follow are the contract with the
Rust engine and are documented in ``examples/models/README.md``.
"""

import hashlib
import io
import json
import linecache
import os
import struct
import sys
import time
import types
import zipfile
import zlib
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

MANIFEST_FORMAT = 1

SLOW_STEPS_SIZE = 256  # state / matrix size of slow_steps
SLOW_STEPS_MATMULS = 400  # matmuls per step: ~50 ms per step on 2 CPU cores

SH_C0 = 0.28209479177387814


# --------------------------------------------------------------------------
# TorchScript helpers (scripted together with the models that call them)
# --------------------------------------------------------------------------
# 32-bit integer arithmetic on int64 (Python int in TorchScript, or int64
# tensors).  Every value stays in [0, 2**32) and every product below 2**49, so
# nothing overflows and the results are bit-exact on any device.


def mul32(x: int, m: int) -> int:
    """(x * m) mod 2**32 for x, m in [0, 2**32) without int64 overflow."""
    lo = x * (m & 0xFFFF)
    hi = ((x * (m >> 16)) & 0xFFFF) << 16
    return (lo + hi) & 0xFFFFFFFF


def hash32(x: int) -> int:
    """lowbias32 integer hash on a value in [0, 2**32)."""
    x = x & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x


def mul32_t(x: torch.Tensor, m: int) -> torch.Tensor:
    """Elementwise mul32 on an int64 tensor with values in [0, 2**32)."""
    lo = x * (m & 0xFFFF)
    hi = torch.bitwise_left_shift(torch.bitwise_and(x * (m >> 16), 0xFFFF), 16)
    return torch.bitwise_and(lo + hi, 0xFFFFFFFF)


def hash32_t(x: torch.Tensor) -> torch.Tensor:
    """Elementwise hash32 on an int64 tensor."""
    x = torch.bitwise_and(x, 0xFFFFFFFF)
    x = torch.bitwise_xor(x, torch.bitwise_right_shift(x, 16))
    x = mul32_t(x, 0x7FEB352D)
    x = torch.bitwise_xor(x, torch.bitwise_right_shift(x, 15))
    x = mul32_t(x, 0x846CA68B)
    x = torch.bitwise_xor(x, torch.bitwise_right_shift(x, 16))
    return x


def prompt_hash(prompt: str) -> int:
    """Stable prompt hash: h = (h * 31 + byte) % (2**31 - 1) over the UTF-8
    bytes of the prompt (TorchScript iterates a str byte by byte and ord()
    gives the byte value 0..255)."""
    h = 0
    for ch in prompt:
        h = (h * 31 + ord(ch)) % 2147483647
    return h


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


class Affine(torch.nn.Module):
    """plain, batchable: x [B,4] -> x @ W + b  ([B,3])."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight) + self.bias


class TinySampler(torch.nn.Module):
    """step-wise prompt-to-image sampler.

    args (inputs then params): prompt: str, steps: int, seed: int,
    width: int, height: int.
    """

    def __init__(self):
        super().__init__()
        # Empty buffer whose device follows module.to(device); new tensors are
        # created on it.
        self.register_buffer("anchor", torch.zeros(0))

    def _check(self, steps: int, width: int, height: int):
        if steps < 1:
            raise ValueError("tiny_sampler: steps must be >= 1")
        if width < 1 or height < 1:
            raise ValueError("tiny_sampler: width and height must be >= 1")

    def _key(self, prompt: str, seed: int) -> int:
        seed_lo = seed & 0xFFFFFFFF
        seed_hi = (seed >> 32) & 0xFFFFFFFF
        return hash32(hash32(seed_lo ^ prompt_hash(prompt)) ^ seed_hi)

    def _target(self, prompt: str, width: int, height: int) -> torch.Tensor:
        ph = prompt_hash(prompt)
        dev = self.anchor.device
        c1 = torch.tensor(
            [ph & 255, (ph >> 8) & 255, (ph >> 16) & 255], dtype=torch.int64, device=dev
        ).reshape(1, 3, 1, 1)
        c2 = torch.div(c1, 4, rounding_mode="floor")  # darker shade of c1
        xs = torch.arange(width, dtype=torch.int64, device=dev).reshape(1, 1, 1, width)
        ys = torch.arange(height, dtype=torch.int64, device=dev).reshape(1, 1, height, 1)
        mode = ph % 3
        if mode == 0:  # horizontal gradient c1 -> c2 (left to right)
            den = max(width - 1, 1)
            t = torch.div(c1 * (width - 1 - xs) + c2 * xs, den, rounding_mode="floor")
            t = t.expand(1, 3, height, width)
        elif mode == 1:  # vertical gradient c1 -> c2 (top to bottom)
            den = max(height - 1, 1)
            t = torch.div(c1 * (height - 1 - ys) + c2 * ys, den, rounding_mode="floor")
            t = t.expand(1, 3, height, width)
        else:  # diagonal stripes of period p alternating c1 / c2
            p = 2 + (ph >> 24) % 7
            even = torch.remainder(torch.div(xs + ys, p, rounding_mode="floor"), 2) == 0
            t = torch.where(even, c1, c2)
        return t.to(torch.float32) * (1.0 / 255.0)

    @torch.jit.export
    def num_steps(self, prompt: str, steps: int, seed: int, width: int, height: int) -> int:
        self._check(steps, width, height)
        return steps

    @torch.jit.export
    def init(self, prompt: str, steps: int, seed: int, width: int, height: int) -> torch.Tensor:
        self._check(steps, width, height)
        key = self._key(prompt, seed)
        idx = torch.arange(3 * height * width, dtype=torch.int64, device=self.anchor.device)
        h = hash32_t(torch.bitwise_xor(mul32_t(idx, 0x9E3779B9), key))
        # top 24 bits -> [0, 1), exact in float32
        noise = torch.bitwise_right_shift(h, 8).to(torch.float32) * (1.0 / 16777216.0)
        return noise.reshape(1, 3, height, width)

    @torch.jit.export
    def step(
        self, state: torch.Tensor, i: int, prompt: str, steps: int, seed: int, width: int, height: int
    ) -> torch.Tensor:
        self._check(steps, width, height)
        if i < 0 or i >= steps:
            raise ValueError("tiny_sampler: step index out of range")
        target = self._target(prompt, width, height)
        # Divisor (steps - i + 1), not (steps - i): the final image keeps
        # 1/(steps+1) of the seed's noise, so the seed changes the output.
        return state + (target - state) * (1.0 / float(steps - i + 1))

    @torch.jit.export
    def decode(
        self, state: torch.Tensor, prompt: str, steps: int, seed: int, width: int, height: int
    ) -> Dict[str, torch.Tensor]:
        return {"image": torch.clamp(state, 0.0, 1.0)}

    def forward(self, prompt: str, steps: int, seed: int, width: int, height: int) -> Dict[str, torch.Tensor]:
        n = self.num_steps(prompt, steps, seed, width, height)
        state = self.init(prompt, steps, seed, width, height)
        for i in range(n):
            state = self.step(state, i, prompt, steps, seed, width, height)
        return self.decode(state, prompt, steps, seed, width, height)


class ImageToGaussians(torch.nn.Module):
    """plain: image [1,3,H,W] in [0,1], focal_length: float -> per-pixel 3DGS."""

    def forward(self, image: torch.Tensor, focal_length: float) -> Dict[str, torch.Tensor]:
        if image.dim() != 4 or image.size(0) != 1 or image.size(1) != 3:
            raise ValueError("image_to_gaussians: image must have shape [1,3,H,W]")
        if not focal_length > 0.0:
            raise ValueError("image_to_gaussians: focal_length must be > 0")
        h = image.size(2)
        w = image.size(3)
        n = h * w
        img = image[0].to(torch.float32)
        rgb = img.reshape(3, n).t()  # [N,3], pixel n = y*W + x
        r = rgb[:, 0]
        g = rgb[:, 1]
        b = rgb[:, 2]
        lum = torch.clamp(0.299 * r + 0.587 * g + 0.114 * b, 0.0, 1.0)
        depth = 1.0 + 2.0 * (1.0 - lum)  # brighter = closer, depth in [1,3]
        ys = torch.arange(h, dtype=torch.float32, device=image.device)
        xs = torch.arange(w, dtype=torch.float32, device=image.device)
        u = (xs + 0.5).reshape(1, w).expand(h, w).reshape(n)
        v = (ys + 0.5).reshape(h, 1).expand(h, w).reshape(n)
        cx = 0.5 * float(w)
        cy = 0.5 * float(h)
        means = torch.stack(
            [(u - cx) * depth / focal_length, (v - cy) * depth / focal_length, depth], dim=1
        )
        footprint = depth / focal_length  # world size of one pixel at that depth
        scales = torch.stack(
            [torch.log(footprint), torch.log(footprint), torch.log(0.1 * footprint)], dim=1
        )
        rotations = torch.zeros(n, 4, dtype=torch.float32, device=image.device)
        rotations[:, 0] = 1.0
        alpha = 0.05 + 0.9 * lum
        opacities = torch.log(alpha / (1.0 - alpha)).reshape(n, 1)
        colors = (rgb - 0.5) / 0.28209479177387814
        return {
            "means": means,
            "scales": scales,
            "rotations": rotations,
            "opacities": opacities,
            "colors": colors,
        }


class SlowSteps(torch.nn.Module):
    """step-wise, deliberately slow (~50 ms per step on 2 CPU cores).

    args: steps: int.  decode/forward return a Tensor [1] (mean of the state).
    """

    def __init__(self, matrix: torch.Tensor, matmuls: int):
        super().__init__()
        self.register_buffer("matrix", matrix)
        self.matmuls = matmuls

    @torch.jit.export
    def num_steps(self, steps: int) -> int:
        if steps < 1:
            raise ValueError("slow_steps: steps must be >= 1")
        return steps

    @torch.jit.export
    def init(self, steps: int) -> torch.Tensor:
        size = self.matrix.size(0)
        idx = torch.arange(size * size, dtype=torch.int64, device=self.matrix.device)
        return ((torch.remainder(idx, 17) - 8).to(torch.float32) * 0.125).reshape(size, size)

    @torch.jit.export
    def step(self, state: torch.Tensor, i: int, steps: int) -> torch.Tensor:
        x = state
        for _ in range(self.matmuls):
            x = torch.tanh(torch.mm(x, self.matrix) + 0.1)
        return x

    @torch.jit.export
    def decode(self, state: torch.Tensor, steps: int) -> torch.Tensor:
        return state.mean().reshape(1)

    def forward(self, steps: int) -> torch.Tensor:
        n = self.num_steps(steps)
        state = self.init(steps)
        for i in range(n):
            state = self.step(state, i, steps)
        return self.decode(state, steps)


class ShapeStrict(torch.nn.Module):
    """plain: x [N,4] -> x @ W ([N,2]); any other inner dim is a torch shape error."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight)


class Allocate(torch.nn.Module):
    """plain: mb: int -> allocates mb MiB of float32 zeros, returns [1] = element count."""

    def __init__(self):
        super().__init__()
        self.register_buffer("anchor", torch.zeros(0))

    def forward(self, mb: int) -> torch.Tensor:
        t = torch.zeros(mb * 1024 * 1024 // 4, dtype=torch.float32, device=self.anchor.device)
        return (t.sum() + float(t.numel())).reshape(1)


# --------------------------------------------------------------------------
# Export machinery
# --------------------------------------------------------------------------


def dyadic(t: torch.Tensor, denom: int = 256) -> torch.Tensor:
    """Round to multiples of 1/denom so that small dyadic inputs give results
    exactly representable in float32 (no dependence on summation order)."""
    return torch.round(t * denom) / denom


def utf8_prompt_hash(prompt: str) -> int:
    """Eager-Python twin of prompt_hash as TorchScript computes it."""
    h = 0
    for byte in prompt.encode("utf-8"):
        h = (h * 31 + byte) % 2147483647
    return h


def f32list(t: torch.Tensor):
    """float32 tensor -> nested lists of Python floats (exact: every float32 is
    a double, and json writes the shortest repr that round-trips)."""
    return t.detach().cpu().to(torch.float32).numpy().astype(np.float64).tolist()


def f32(x: torch.Tensor) -> float:
    return float(x.detach().cpu().to(torch.float32).item())


def tensor_sha256(t: torch.Tensor) -> str:
    arr = np.ascontiguousarray(t.detach().cpu().to(torch.float32).numpy()).astype("<f4")
    return hashlib.sha256(arr.tobytes()).hexdigest()


def _fix_crc_fields(data: bytearray, info: zipfile.ZipInfo, crc: int, start_dir: int):
    """Write a new CRC-32 for one stored zip entry (local header or data
    descriptor, and its central directory record)."""
    off = info.header_offset
    assert data[off:off + 4] == b"PK\x03\x04"
    name_len, extra_len = struct.unpack_from("<HH", data, off + 26)
    data_start = off + 30 + name_len + extra_len
    if info.flag_bits & 0x08:  # CRC lives in the data descriptor after the data
        desc = data_start + info.compress_size
        if data[desc:desc + 4] == b"PK\x07\x08":
            desc += 4
        struct.pack_into("<I", data, desc, crc)
    else:
        struct.pack_into("<I", data, off + 14, crc)
    # central directory
    pos = start_dir
    while data[pos:pos + 4] == b"PK\x01\x02":
        n_len, e_len, c_len = struct.unpack_from("<HHH", data, pos + 28)
        (local_off,) = struct.unpack_from("<I", data, pos + 42)
        name = bytes(data[pos + 46:pos + 46 + n_len]).decode("utf-8")
        if name == info.filename:
            struct.pack_into("<I", data, pos + 16, crc)
            return
        pos += 46 + n_len + e_len + c_len
    raise RuntimeError("central directory entry not found for " + info.filename)


def pin_serialization_id(raw: bytes, stem: str) -> bytes:
    """torch.jit.save writes a random `.data/serialization_id` into every
    archive.  Replace it (same length) by a value derived from the model name so
    the file is byte-for-byte reproducible; fix the entry's CRC-32."""
    data = bytearray(raw)
    zf = zipfile.ZipFile(io.BytesIO(raw))
    infos = [i for i in zf.infolist() if i.filename.endswith("/.data/serialization_id")]
    if not infos:
        return raw
    info = infos[0]
    assert info.compress_type == zipfile.ZIP_STORED
    old = zf.read(info)
    digest = hashlib.sha256(("kiln-fixture:" + stem).encode()).hexdigest()
    new = str(int(digest, 16)).encode()[: len(old)].rjust(len(old), b"0")
    off = info.header_offset
    name_len, extra_len = struct.unpack_from("<HH", data, off + 26)
    data_start = off + 30 + name_len + extra_len
    assert bytes(data[data_start:data_start + len(old)]) == old
    data[data_start:data_start + len(old)] = new
    _fix_crc_fields(data, info, zlib.crc32(new) & 0xFFFFFFFF, zf.start_dir)
    out = bytes(data)
    bad = zipfile.ZipFile(io.BytesIO(out)).testzip()
    assert bad is None, bad
    return out


def write_atomic(path: Path, data: bytes):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_scripted(module: torch.nn.Module, out_dir: Path, stem: str) -> Path:
    scripted = torch.jit.script(module)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    path = out_dir / (stem + ".pt")
    write_atomic(path, pin_serialization_id(buf.getvalue(), stem))
    return path


def file_info(path: Path) -> dict:
    data = path.read_bytes()
    return {"size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def check(cond: bool, msg: str):
    if not cond:
        raise AssertionError(msg)


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=0.0, atol=atol))


def gaussians_test_image(h: int = 4, w: int = 4) -> torch.Tensor:
    """value[0, c, y, x] = ((c + 1) * (y * W + x)) % 17 / 16."""
    c = torch.arange(3, dtype=torch.int64).reshape(3, 1, 1)
    y = torch.arange(h, dtype=torch.int64).reshape(1, h, 1)
    x = torch.arange(w, dtype=torch.int64).reshape(1, 1, w)
    v = torch.remainder((c + 1) * (y * w + x), 17).to(torch.float32) / 16.0
    return v.reshape(1, 3, h, w)


# --------------------------------------------------------------------------
# Per-fixture export + verification
# --------------------------------------------------------------------------


def export_affine(out_dir: Path) -> dict:
    g = torch.Generator().manual_seed(0)
    weight = dyadic(torch.randn(4, 3, generator=g))
    bias = dyadic(torch.randn(3, generator=g))
    path = save_scripted(Affine(weight, bias), out_dir, "affine")

    m = torch.jit.load(str(path))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, -1.0, 2.0]])
    batched = m(x)
    check(torch.equal(batched, x @ weight + bias), "affine: output != x @ W + b")
    for k in range(x.shape[0]):
        single = m(x[k:k + 1])
        check(close(single, batched[k:k + 1]), "affine: batch != per-item")
        check(torch.equal(single, batched[k:k + 1]), "affine: batch not bit-equal to per-item")
    return {
        "file": path.name,
        "kind": "plain",
        "batchable": True,
        "inputs": [{"name": "x", "kind": "tensor", "dtype": "float32", "shape": ["B", 4]}],
        "params": [],
        "methods": ["forward"],
        "output_form": "tensor",
        "outputs": [{"name": "output", "dtype": "float32", "shape": ["B", 3]}],
        **file_info(path),
        "reference": {
            "note": "W and b are torch.randn(generator=manual_seed(0)) rounded to multiples of 1/256; "
            "with these inputs every output is exact in float32 (compare with ==)",
            "weight": f32list(weight),
            "bias": f32list(bias),
            "input": f32list(x),
            "output": f32list(batched),
        },
    }


def export_tiny_sampler(out_dir: Path) -> dict:
    path = save_scripted(TinySampler(), out_dir, "tiny_sampler")

    m = torch.jit.load(str(path))
    prompt, steps, seed, width, height = "a red fox", 8, 7, 16, 16
    args = (prompt, steps, seed, width, height)
    n = m.num_steps(*args)
    check(n == steps, "tiny_sampler: num_steps != steps")
    state = m.init(*args)
    check(list(state.shape) == [1, 3, height, width], "tiny_sampler: bad init shape")
    init_mean = f32(state.mean())
    step_means: List[float] = []
    for i in range(n):
        state = m.step(state, i, *args)
        step_means.append(f32(state.mean()))
    stepped = m.decode(state, *args)["image"]
    plain = m(*args)["image"]
    check(torch.equal(stepped, plain), "tiny_sampler: forward != step-wise path")
    check(torch.equal(m(*args)["image"], plain), "tiny_sampler: not deterministic")
    check(list(plain.shape) == [1, 3, height, width], "tiny_sampler: bad image shape")
    check(float(plain.min()) >= 0.0 and float(plain.max()) <= 1.0, "tiny_sampler: out of [0,1]")
    scripted_hash = torch.jit.script(prompt_hash)
    hash_examples = {}
    for p in [prompt, "", "été 🦊"]:
        hash_examples[p] = scripted_hash(p)
        check(hash_examples[p] == utf8_prompt_hash(p), "tiny_sampler: prompt hash is not over UTF-8 bytes")
    other_seed = m(prompt, steps, seed + 1, width, height)["image"]
    other_prompt = m("a blue fox", steps, seed, width, height)["image"]
    check(not torch.equal(other_seed, plain), "tiny_sampler: seed has no effect")
    check(list(m("x", 2, 0, 8, 4)["image"].shape) == [1, 3, 4, 8], "tiny_sampler: non-square shape")
    check(not torch.equal(other_prompt, plain), "tiny_sampler: prompt has no effect")
    check(not torch.equal(m.init(prompt, steps, seed + 1, width, height), m.init(*args)),
          "tiny_sampler: seed does not change noise")
    return {
        "file": path.name,
        "kind": "stepwise",
        "batchable": False,
        "inputs": [{"name": "prompt", "kind": "text"}],
        "params": [
            {"name": "steps", "kind": "int", "default": 8},
            {"name": "seed", "kind": "int", "default": 0},
            {"name": "width", "kind": "int", "default": 64},
            {"name": "height", "kind": "int", "default": 64},
        ],
        "methods": ["num_steps", "init", "step", "decode", "forward"],
        "output_form": "dict",
        "outputs": [{"name": "image", "dtype": "float32", "shape": [1, 3, "height", "width"]}],
        **file_info(path),
        "reference": {
            "prompt": prompt,
            "params": {"steps": steps, "seed": seed, "width": width, "height": height},
            "prompt_hash": hash_examples[prompt],
            "prompt_hash_examples": hash_examples,
            "image_shape": list(plain.shape),
            "image_sha256": tensor_sha256(plain),
            "image_mean": f32(plain.mean()),
            "image_first8": f32list(plain.reshape(-1)[:8]),
            "init_mean": init_mean,
            "step_means": step_means,
            "note": "image_sha256 is over the float32 little-endian bytes of the [1,3,H,W] "
            "image in row-major order (elementwise ops only: exact on CPU). "
            "step_means[i] is the mean of the state returned by step(i) (before decode's clamp); "
            "means are float32 reductions, compare with a small tolerance (1e-6)",
        },
    }


def export_image_to_gaussians(out_dir: Path) -> dict:
    path = save_scripted(ImageToGaussians(), out_dir, "image_to_gaussians")

    m = torch.jit.load(str(path))
    image = gaussians_test_image()
    focal = 10.0
    out = m(image, focal)
    again = m(image, focal)
    names = ["means", "scales", "rotations", "opacities", "colors"]
    check(sorted(out.keys()) == sorted(names), "image_to_gaussians: bad keys")
    n = 16
    widths = {"means": 3, "scales": 3, "rotations": 4, "opacities": 1, "colors": 3}
    for k in names:
        check(torch.equal(out[k], again[k]), "image_to_gaussians: not deterministic")
        check(list(out[k].shape) == [n, widths[k]], "image_to_gaussians: bad shape " + k)
        check(bool(torch.isfinite(out[k]).all()), "image_to_gaussians: non-finite " + k)
    check(close(out["rotations"].norm(dim=1), torch.ones(n)), "image_to_gaussians: rotations not unit")
    # Independent numpy reference for the documented formulas.
    px = image[0].numpy().astype(np.float64).reshape(3, n).T
    lum = px @ np.array([0.299, 0.587, 0.114])
    depth = 1.0 + 2.0 * (1.0 - lum)
    yy, xx = np.meshgrid(np.arange(4) + 0.5, np.arange(4) + 0.5, indexing="ij")
    u, v = xx.reshape(n), yy.reshape(n)
    alpha = 0.05 + 0.9 * lum
    expect = {
        "means": np.stack([(u - 2.0) * depth / focal, (v - 2.0) * depth / focal, depth], 1),
        "scales": np.log(np.stack([depth / focal, depth / focal, 0.1 * depth / focal], 1)),
        "rotations": np.tile([1.0, 0.0, 0.0, 0.0], (n, 1)),
        "opacities": np.log(alpha / (1.0 - alpha)).reshape(n, 1),
        "colors": (px - 0.5) / SH_C0,
    }
    for k in names:
        check(np.allclose(out[k].numpy(), expect[k], rtol=0.0, atol=1e-5), "image_to_gaussians: formula " + k)
    return {
        "file": path.name,
        "kind": "plain",
        "batchable": False,
        "inputs": [{"name": "image", "kind": "image", "dtype": "float32", "shape": [1, 3, "H", "W"]}],
        "params": [{"name": "focal_length", "kind": "float", "default": 64.0}],
        "methods": ["forward"],
        "output_form": "dict",
        "outputs": [
            {"name": "means", "dtype": "float32", "shape": ["N", 3]},
            {"name": "scales", "dtype": "float32", "shape": ["N", 3]},
            {"name": "rotations", "dtype": "float32", "shape": ["N", 4]},
            {"name": "opacities", "dtype": "float32", "shape": ["N", 1]},
            {"name": "colors", "dtype": "float32", "shape": ["N", 3]},
        ],
        "n_gaussians": "H*W (pixel n = y*W + x)",
        **file_info(path),
        "reference": {
            "image_shape": [1, 3, 4, 4],
            "image_formula": "image[0, c, y, x] = ((c + 1) * (y * 4 + x)) % 17 / 16 (float32)",
            "image": f32list(image),
            "params": {"focal_length": focal},
            "shapes": {k: list(out[k].shape) for k in names},
            "first_rows": {k: f32list(out[k][:2]) for k in names},
            "sha256": {k: tensor_sha256(out[k]) for k in names},
            "note": "compare first_rows with atol 1e-5",
        },
    }


def export_slow_steps(out_dir: Path) -> dict:
    g = torch.Generator().manual_seed(2)
    size = SLOW_STEPS_SIZE
    matrix = torch.randn(size, size, generator=g) * (0.5 / size ** 0.5)
    path = save_scripted(SlowSteps(matrix, SLOW_STEPS_MATMULS), out_dir, "slow_steps")

    m = torch.jit.load(str(path))
    steps = 2
    n = m.num_steps(steps)
    state = m.init(steps)
    step_ms: List[float] = []
    for i in range(n):
        t0 = time.perf_counter()
        state = m.step(state, i, steps)
        step_ms.append((time.perf_counter() - t0) * 1000.0)
    stepped = m.decode(state, steps)
    plain = m(steps)
    check(close(stepped, plain, 1e-6), "slow_steps: forward != step-wise path")
    check(list(plain.shape) == [1], "slow_steps: bad output shape")
    print("  slow_steps: step times %s ms (1 thread)" % ", ".join("%.0f" % t for t in step_ms))
    return {
        "file": path.name,
        "kind": "stepwise",
        "batchable": False,
        "inputs": [],
        "params": [{"name": "steps", "kind": "int", "default": 40}],
        "methods": ["num_steps", "init", "step", "decode", "forward"],
        "output_form": "tensor",
        "outputs": [{"name": "output", "dtype": "float32", "shape": [1]}],
        "step_work": "%d x (tanh(state[%d,%d] @ M + 0.1)) per step, ~50 ms on 2 CPU cores"
        % (SLOW_STEPS_MATMULS, size, size),
        **file_info(path),
        "reference": {
            "params": {"steps": steps},
            "output": f32list(plain),
            "note": "BLAS-dependent; compare with atol 1e-4",
        },
    }


def export_shape_strict(out_dir: Path) -> dict:
    g = torch.Generator().manual_seed(1)
    weight = dyadic(torch.randn(4, 2, generator=g))
    path = save_scripted(ShapeStrict(weight), out_dir, "shape_strict")

    m = torch.jit.load(str(path))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out = m(x)
    check(torch.equal(out, x @ weight), "shape_strict: wrong output")
    bad = torch.ones(1, 5)
    try:
        m(bad)
    except RuntimeError:
        pass
    else:
        raise AssertionError("shape_strict: [1,5] input did not raise")
    return {
        "file": path.name,
        "kind": "plain",
        "batchable": False,
        "inputs": [{"name": "x", "kind": "tensor", "dtype": "float32", "shape": ["N", 4]}],
        "params": [],
        "methods": ["forward"],
        "output_form": "tensor",
        "outputs": [{"name": "output", "dtype": "float32", "shape": ["N", 2]}],
        **file_info(path),
        "reference": {
            "weight": f32list(weight),
            "input": f32list(x),
            "output": f32list(out),
            "bad_input_shape": [1, 5],
            "note": "exact (dyadic weights); an input whose last dim != 4 raises a torch shape error",
        },
    }


def export_allocate(out_dir: Path) -> dict:
    path = save_scripted(Allocate(), out_dir, "allocate")

    m = torch.jit.load(str(path))
    out = m(1)
    check(torch.equal(out, torch.tensor([262144.0])), "allocate: wrong output")
    check(torch.equal(m(0), torch.tensor([0.0])), "allocate: mb=0")
    return {
        "file": path.name,
        "kind": "plain",
        "batchable": False,
        "inputs": [],
        "params": [{"name": "mb", "kind": "int", "default": 1}],
        "methods": ["forward"],
        "output_form": "tensor",
        "outputs": [{"name": "output", "dtype": "float32", "shape": [1]}],
        **file_info(path),
        "reference": {
            "params": {"mb": 1},
            "output": f32list(out),
            "note": "allocates torch.zeros(mb*1024*1024 // 4) float32 on the module's device; "
            "output = [number of elements allocated]",
        },
    }


def export_broken(out_dir: Path) -> dict:
    # Starts like a zip local file header (what a .pt archive is), then garbage.
    blob = b"PK\x03\x04"
    block = b"kiln-broken-fixture"
    while len(blob) < 1024:
        block = hashlib.sha256(block).digest()
        blob += block
    blob = blob[:1024]
    path = out_dir / "broken.pt"
    write_atomic(path, blob)
    try:
        torch.jit.load(str(path))
    except Exception:
        pass
    else:
        raise AssertionError("broken.pt loaded")
    return {
        "file": path.name,
        "kind": "corrupt",
        "note": "not a model: 'PK\\x03\\x04' followed by deterministic garbage; loading must fail",
        **file_info(path),
    }


def main(argv: List[str], default_out: Path) -> int:
    t_start = time.perf_counter()
    out_dir = Path(argv[0]) if argv else default_out
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    # One intra-op thread: the checks stay fast when other processes (a cargo
    # build) contend for the cores; two-thread OpenMP matmuls then stall badly.
    torch.set_num_threads(1)

    models = {}
    for name, fn in [
        ("affine", export_affine),
        ("tiny_sampler", export_tiny_sampler),
        ("image_to_gaussians", export_image_to_gaussians),
        ("slow_steps", export_slow_steps),
        ("shape_strict", export_shape_strict),
        ("allocate", export_allocate),
    ]:
        t0 = time.perf_counter()
        models[name] = fn(out_dir)
        print("  %-20s %7d bytes  %.2fs" % (name + ".pt", models[name]["size_bytes"], time.perf_counter() - t0))
    corrupt = {"broken": export_broken(out_dir)}

    manifest = {
        "format": MANIFEST_FORMAT,
        "generator": "examples/models/export_fixtures.py",
        "torch_version": torch.__version__.split("+")[0],
        "conventions": "examples/models/README.md",
        "models": models,
        "corrupt": corrupt,
    }
    text = json.dumps(manifest, indent=2) + "\n"
    write_atomic(out_dir / "manifest.json", text.encode("utf-8"))
    print("wrote %d models + broken.pt + manifest.json to %s in %.2fs"
          % (len(models), out_dir, time.perf_counter() - t_start))
    return 0


def _load_with_stable_filename(real_path: Path) -> types.ModuleType:
    """TorchScript records the source file name in each archive's debug info.
    Re-load this file under a fixed pseudo file name (served from linecache) so
    the exported bytes do not depend on where the checkout lives."""
    fname = "export_fixtures.py"
    src = real_path.read_text(encoding="utf-8")
    linecache.cache[fname] = (len(src), None, src.splitlines(True), fname)
    mod = types.ModuleType("kiln_fixtures")
    mod.__file__ = fname
    sys.modules[mod.__name__] = mod
    exec(compile(src, fname, "exec"), mod.__dict__)
    return mod


if __name__ == "__main__":
    here = Path(__file__).resolve()
    fixtures = _load_with_stable_filename(here)
    sys.exit(fixtures.main(sys.argv[1:], here.parent / "out"))
