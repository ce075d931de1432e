import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def kosmo(*args, cwd=None, check=True, timeout=600, env=None):
    """Runs the real CLI in a subprocess, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "kosmo", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"kosmo {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A small text JSONL from the shapes world."""
    from kosmo.data.world import World
    world = World()
    path = tmp_path_factory.mktemp("corpus") / "text.jsonl"
    with path.open("w") as f:
        for i in range(1500):
            f.write(json.dumps({"text": world.text(i, "train")}) + "\n")
    return path


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def kill_after(args: list, run: Path, logged: int) -> int:
    """Starts `kosmo ARGS --out RUN`, SIGKILLs it once it has logged `logged` steps and written a checkpoint,
    and returns the step of the checkpoint it left."""
    proc = subprocess.Popen([sys.executable, "-m", "kosmo", *map(str, args), "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "state" / "latest.json").is_file() and len(read_metrics(run)) >= logged:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return json.loads((run / "state" / "latest.json").read_text())["step"]


def assert_cached_decoding_equals_uncached(model, prompts, images, max_new_tokens: int = 6, audio=None) -> list:
    """Greedy decoding with the KV cache gives the uncached tokens and logits; returns the cached logits."""
    import torch

    from kosmo.generate import Sampling, generate_ids
    s = Sampling(max_new_tokens=max_new_tokens)
    a, _, la = generate_ids(model, prompts, s, stop_ids=(), images=images, audio=audio, return_logits=True)
    b, _, lb = generate_ids(model, prompts, s, stop_ids=(), images=images, audio=audio, use_cache=False,
                            return_logits=True)
    assert a == b
    for x, y in zip(la, lb):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    return la


def pytest_collection_modifyitems(config, items):
    """`cuda`-marked tests need a GPU: skipped where there is none (benchmarks/gpu_check.sh runs them)."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
