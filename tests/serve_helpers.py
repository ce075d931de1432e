"""Tiny random runs to serve, sound clips, and a real `kosmo serve` in a subprocess, for the serving tests."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile
import torch
from PIL import Image

IMAGE_SIZE = 16
DRAWS = 16  # the `drawing` run's pictures are DRAWS x DRAWS, a 4 x 4 grid of codes
HEARS_SECONDS = 3  # the longest clip the `hearing` run takes at once


class Letters:
    """A stand-in tokenizer for engine tests: token i is one letter."""

    def encode(self, text):
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def build_runs(root: Path) -> dict[str, Path]:
    """A text-only LM run, a KOSMOS MLLM run, one that also hears and one that draws, with random weights (large
    enough init to vary its words and codes)."""
    from kosmo.data.world import World
    from kosmo.model.audio import AudioConfig
    from kosmo.model.lm import LM, LMConfig
    from kosmo.model.load import save_run
    from kosmo.model.mllm import MLLM, MLLMConfig
    from kosmo.model.vision import VisionConfig
    from kosmo.model.vqvae import VQVAE, VQVAEConfig
    from kosmo.tokenizer import Tokenizer
    from kosmo.train.mllm import with_image_tokenizer

    runs = {"lm": root / "lm", "mllm": root / "mllm", "hearing": root / "hearing", "drawing": root / "drawing"}
    if all((r / "model.safetensors").is_file() for r in runs.values()):
        return runs
    world = World()
    tok = Tokenizer.train((world.text(i, "train") for i in range(300)), vocab_size=300)
    torch.manual_seed(0)
    lm_cfg = LMConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=192,
                      init_std=0.1)
    save_run(runs["lm"], LM(lm_cfg), tok, {"stage": "test", "arch": "lm", "model": lm_cfg.to_dict()})
    cfg = MLLMConfig(vision=VisionConfig(image_size=IMAGE_SIZE, patch_size=8, dim=32, n_layers=1, n_heads=2,
                                         mlp_dim=64), lm=lm_cfg)
    save_run(runs["mllm"], MLLM(cfg), tok, {"stage": "test", "arch": "mllm", "model": cfg.to_dict()})
    cfg = MLLMConfig(vision=cfg.vision, lm=lm_cfg, audio=AudioConfig(dim=32, n_layers=1, n_heads=2, mlp_dim=64,
                                                                     max_frames=HEARS_SECONDS * 100))
    save_run(runs["hearing"], open_ears(MLLM(cfg)), tok, {"stage": "test", "arch": "mllm", "model": cfg.to_dict()})
    coder = VQVAE(VQVAEConfig(image_size=DRAWS, downsample=4, channels=16, n_res_blocks=1, codebook_size=32,
                              code_dim=8))
    drawing = with_image_tokenizer(MLLM(MLLMConfig(vision=cfg.vision, lm=lm_cfg)), coder)
    save_run(runs["drawing"], drawing, tok, {"stage": "test", "arch": "mllm", "model": drawing.cfg.to_dict()})
    return runs


def open_ears(model):
    """At its small init a random audio encoder hears mostly its own position table; larger convolution and
    connector weights let the clip itself change the answers, so parity checks cover the audio path."""
    with torch.no_grad():
        for conv in (model.audio.conv1, model.audio.conv2):
            conv.weight.mul_(20)
        model.audio_connector.mlp[2].weight.mul_(5)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`kosmo serve` on a free local port; `url` is its base address."""

    def __init__(self, run: Path, *args: str, api_key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        cmd = [sys.executable, "-m", "kosmo", "serve", "--model", str(run), "--port", str(self.port),
               "--device", "cpu", *args, *(["--api-key", api_key] if api_key else [])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 180  # a loaded machine imports slowly
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kosmo serve exited ({self.proc.returncode}):\n{self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.close()
        raise RuntimeError("kosmo serve did not come up in 180 s")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def png_bytes(w: int = IMAGE_SIZE, h: int = IMAGE_SIZE, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, "PNG")
    return buf.getvalue()


def wav_bytes(seconds: float = 1.0, rate: int = 16_000, seed: int = 0, fmt: str = "WAV",
              subtype: str | None = "PCM_16") -> bytes:
    """A clip of tones over quiet noise, different for each seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tones = sum(0.3 * np.sin(2 * np.pi * f * t) for f in rng.uniform(80, 4000, 3))
    samples = 0.05 * rng.standard_normal(len(t)) + tones
    buf = io.BytesIO()
    soundfile.write(buf, samples.astype(np.float32), rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
