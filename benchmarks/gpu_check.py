"""The figures of `benchmarks/gpu_check.sh`, each step's as JSON on stdout, and the report that gathers them.

    gpu_check.py corpus OUT.jsonl N          N shapes-world texts to train on
    gpu_check.py mfu RUN                     a training run's tokens/s and MFU (below)
    gpu_check.py fsdp PLAIN_RUN FSDP_RUN     one run with FSDP beside the same run without it
    gpu_check.py pytest JUNIT.xml            passed / failed / skipped of a pytest run
    gpu_check.py jsonlines LOG               the JSON lines a benchmark printed
    gpu_check.py report STEPS.jsonl OUT      the report: the device, then each step's status, time and figures

MFU counts a token's training FLOPs as 6 per matmul weight (the embedding table is a lookup, not a matmul,
unless the head shares it) plus 12 * layers * dim * seq_len for attention's two matmuls (PaLM's appendix B
convention, no discount for causality), at the run's median tokens/s after its first quarter of steps
(compilation and warm-up). It is given against two peaks: the GPU's dense bf16 figure from its datasheet
(where its name is known) and the best bf16 matmul measured here.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from kosmo.model.lm import LM, LMConfig

# dense bf16 TFLOP/s from NVIDIA's datasheets, by a piece of torch.cuda.get_device_name(); the first match counts
DATASHEET_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.4), ("H200", 989.4),
                    ("H100", 989.4), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak(dev: torch.device, dtype=torch.bfloat16, n: int = 8192, repeats: int = 10) -> float:
    """The best FLOP/s of an n x n x n matmul (n 1024 on a CPU, where bf16 may be emulated and slow)."""
    n = n if dev.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def datasheet_peak(name: str) -> float | None:
    return next((tflops * 1e12 for key, tflops in DATASHEET_TFLOPS if key in name), None)


def flops_per_token(cfg: LMConfig, seq_len: int) -> tuple[float, int]:
    """(training FLOPs a token, parameters) of an LM, counted as the module docstring says."""
    with torch.device("meta"):
        model = LM(cfg)
    params = model.num_params()
    matmul = params - (0 if cfg.tie_embeddings else model.embed.weight.numel())
    return 6 * matmul + 12 * cfg.n_layers * cfg.dim * seq_len, params


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def steady(rows: list[dict], key: str) -> float:
    """The median of `key` over the steps after the first quarter."""
    return statistics.median(r[key] for r in rows[len(rows) // 4:])


def mfu(run: Path) -> dict:
    config = json.loads((run / "config.json").read_text())
    cfg = LMConfig(**config["model"])
    seq_len = config["config"]["seq_len"]
    per_token, params = flops_per_token(cfg, seq_len)
    rows = metrics(run)
    tok_per_s = steady(rows, "tok_per_s")
    dev = device()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    measured, datasheet = matmul_peak(dev), datasheet_peak(name)
    out = {"device_name": name, "params": params, "layers": cfg.n_layers, "dim": cfg.dim, "vocab": cfg.vocab_size,
           "seq_len": seq_len, "steps": len(rows), "precision": rows[-1].get("precision"),
           "compile": config["config"]["train"]["compile"], "tok_per_s": round(tok_per_s, 1),
           "flops_per_token": per_token, "achieved_tflops": round(per_token * tok_per_s / 1e12, 2),
           "measured_bf16_matmul_tflops": round(measured / 1e12, 2),
           "mfu_vs_measured_matmul": round(per_token * tok_per_s / measured, 4),
           "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"]}
    if datasheet:
        out |= {"datasheet_bf16_tflops": datasheet / 1e12,
                "mfu_vs_datasheet": round(per_token * tok_per_s / datasheet, 4)}
    if "mfu" in rows[-1]:  # the trainer's own figure, against the peak it measured
        out["trainer_mfu"] = round(steady(rows, "mfu"), 4)
    return out


def fsdp(plain: Path, sharded: Path) -> dict:
    """FSDP on one device holds every shard itself, so its losses are the plain run's up to rounding."""
    a, b = metrics(plain), metrics(sharded)
    if len(a) != len(b):
        raise SystemExit(f"the runs logged {len(a)} and {len(b)} steps")
    diff = max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b))
    out = {"steps": len(a), "plain_tok_per_s": round(steady(a, "tok_per_s"), 1),
           "fsdp_tok_per_s": round(steady(b, "tok_per_s"), 1), "max_relative_loss_difference": diff,
           "losses_plain": [r["loss"] for r in a], "losses_fsdp": [r["loss"] for r in b]}
    if diff > 1e-2:
        print(json.dumps(out))
        raise SystemExit(f"FSDP's losses differ from the plain run's by up to {diff:.2%}")
    return out


def pytest_counts(junit: Path) -> dict:
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed_tests"] = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                              if case.find("failure") is not None or case.find("error") is not None]
    return counts


def json_lines(log: Path) -> list:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a log line that only looks like JSON
    return out


def report(steps: Path, out: Path):
    dev = device()
    head = {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda}
    rows = [json.loads(line) for line in steps.read_text().splitlines()]
    body = {**head, "ok": all(r["status"] == "ok" for r in rows), "seconds": round(sum(r["seconds"] for r in rows)),
            "steps": rows}
    out.write_text(json.dumps(body, indent=1))
    for r in rows:
        print(f"{r['step']:<12} {r['status']:<8} {r['seconds']:>5} s")
    print(f"{'ok' if body['ok'] else 'FAILED'}: {out}")


def main():
    command, args = sys.argv[1], sys.argv[2:]
    if command == "corpus":
        from kosmo.data.world import World
        world = World()
        with open(args[0], "w") as f:
            for i in range(int(args[1])):
                f.write(json.dumps({"text": world.text(i, "train")}) + "\n")
    elif command == "report":
        report(Path(args[0]), Path(args[1]))
    else:
        figures = {"mfu": lambda: mfu(Path(args[0])), "fsdp": lambda: fsdp(Path(args[0]), Path(args[1])),
                   "pytest": lambda: pytest_counts(Path(args[0])), "jsonlines": lambda: json_lines(Path(args[0]))}
        print(json.dumps(figures[command]()))


if __name__ == "__main__":
    main()
