"""The one training loop every stage reuses. A stage supplies a model, a loss and its data; the
trainer does the rest: AdamW with warmup and cosine decay, gradient accumulation and clipping, bf16
autocast where the hardware runs it natively, DDP/FSDP2, a budget in steps or epochs, progress,
metrics, evaluation, atomic checkpoints and exact resume.

Exact resume rests on three facts. The rows of step s are a pure function of (seed, s), so no data
iterator needs saving; a stream (a corpus larger than memory) saves its position instead, per rank.
The learning rate is a pure function of s. And optimizer state, RNG state, the streams' positions and
weights are saved together and published by one atomic rename of `state/latest.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch.utils import flop_counter
from tqdm import tqdm

from kosmo import checkpoint, hardware
from kosmo.data.audio import Clips
from kosmo.errors import KosmoError
from kosmo.model import lora
from kosmo.train import distributed as D


@dataclass
class TrainConfig:
    seed: int = 0
    max_steps: int = 0           # optimizer steps; 0: as many as `epochs` passes over the data take
    epochs: float = 3.0          # the budget when max_steps is 0, so that it scales with the data
    batch_size: int = 8          # rows per micro-batch, per process
    grad_accum: int = 1          # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1    # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0       # 0 disables clipping
    lr_scale: dict = field(default_factory=dict)  # name prefix or glob -> lr multiplier, e.g. {vision: 0.1, "*_gate": 30}
    precision: str = "auto"      # auto: bf16 where the device runs it natively; bf16 (autocast); fp32
    device: str = "auto"         # auto, cpu, cuda, cuda:1 ...
    parallel: str = "ddp"        # under torchrun: ddp or fsdp
    compile: bool = False        # torch.compile the model's forward (pays off on runs of hundreds of steps)
    eval_every: int = 100        # 0 disables evaluation
    eval_batches: int = 8
    save_every: int = 200        # a checkpoint also closes every run
    log_every: int = 1
    max_nonfinite: int = 5       # consecutive non-finite steps before the run stops
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self):
        if self.precision not in hardware.PRECISIONS:
            raise ValueError(f"train.precision must be one of {', '.join(hardware.PRECISIONS)}, got {self.precision!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"train.parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be at least 1")
        if self.max_steps < 0:
            raise ValueError("train.max_steps must be at least 1 (or 0: from train.epochs)")
        if self.max_steps == 0 and not self.epochs > 0:
            raise ValueError(f"train.epochs must be positive when train.max_steps is 0, got {self.epochs}")
        for key, scale in self.lr_scale.items():
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0:
                raise ValueError(f"train.lr_scale.{key} must be a number of at least 0, got {scale!r}")


class Dataset(Protocol):
    """Examples addressed by index; `collate` builds a batch dict holding `n_targets`, the number of
    loss terms in it, so that the loss of a step is a mean over all of its targets on all ranks.

    A dataset may also have `arrange(order, batch_size, head, generator) -> order`, which rearranges an
    epoch's random order so that each micro-batch (`batch_size` consecutive rows, after the first `head`,
    which complete the previous epoch's last batch) batches well, e.g. clips of similar lengths together.
    """

    def __len__(self) -> int: ...

    def collate(self, indices: list[int]) -> dict: ...


class Stream(Protocol):
    """Examples read in order, endlessly (`kosmo.data.stream.TextStream`): each rank's stream reads its own
    part of the data, and its position is saved with every checkpoint."""

    def next_batch(self, n: int) -> dict: ...

    def state_dict(self) -> dict: ...  # JSON-able values and tensors

    def load_state_dict(self, state: dict): ...


# loss(model, batch) -> (sum of the loss over the batch's targets, extra metrics as floats)
LossFn = Callable[[torch.nn.Module, dict], "tuple[torch.Tensor, dict[str, float]]"]


def _count_cpu_attention():
    """torch counts the FLOPs of the GPU's attention kernels but not of the CPU's flash attention; same maths."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(op)(lambda q, k, v, *args, **kw: flop_counter.sdpa_flop_count(q, k, v))


_count_cpu_attention()


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def to_device(batch: dict, device) -> dict:
    """Tensors and `Clips` (a batch's audio) to `device`; everything else as it is."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v.to(device) if isinstance(v, Clips) else v
            for k, v in batch.items()}


class Trainer:
    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, loss_fn: LossFn, train_set: Dataset | Stream,
                 out: str | Path, run_config: dict, eval_set: Dataset | None = None, env: D.Env | None = None):
        self.cfg, self.loss_fn, self.train_set, self.eval_set = cfg, loss_fn, train_set, eval_set
        self.out = Path(out)
        self.env = env or D.setup(cfg.device)
        # the precision is decided once per run, by the hardware unless the config forces one
        self.precision = hardware.resolve_precision(cfg.precision, self.env.device)
        self.run_config = {**run_config, "hardware": hardware.describe(self.env.device, self.precision)}
        self.streaming = hasattr(train_set, "next_batch")
        if self.streaming and not cfg.max_steps:
            raise KosmoError("streamed data has no length to count epochs in: set train.max_steps")
        if not self.streaming and len(train_set) == 0:
            raise KosmoError("the training data holds no examples")
        self.budget = self._budget(cfg, None if self.streaming else len(train_set))
        self.run_config["budget"] = self.budget
        if cfg.max_steps == 0:
            self.cfg = cfg = dataclasses.replace(cfg, max_steps=self.budget["steps"])
        torch.manual_seed(cfg.seed + self.env.rank)
        # a LoRA run keeps only what trains; its frozen base is rebuilt from --init on resume
        self.adapted = bool(lora.adapters(model))
        self.weights_file = "adapter.safetensors" if self.adapted else "model.safetensors"
        if cfg.compile:
            # One graph for the whole forward lets Inductor fuse the norms, RoPE, SwiGLU and residual adds
            # across blocks; under FSDP, which shards block by block, each block is compiled alone.
            fsdp = cfg.parallel == "fsdp" and self.env.world > 1
            for m in D.blocks_of(model) if fsdp else [model]:
                m.compile()
        self.model = D.wrap(model.to(self.env.device), cfg.parallel, self.env)
        self.optimizer = self._make_optimizer()
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self._perm_epoch, self._perm = -1, None
        self._check_resumable()
        # MFU: the model's FLOPs a target token (see _train_step) at the step's tokens/s, over the matmul peak
        # measured on this machine and precision
        self.flops_per_token: float | None = None
        self.peak_flops = hardware.matmul_peak(self.env.device, self.precision) * self.env.world

    def _budget(self, cfg: TrainConfig, n: int | None) -> dict:
        """The run's length in steps, and in passes over the data (unknown for a stream: n is None)."""
        per_step = cfg.batch_size * cfg.grad_accum * self.env.world
        steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * n / per_step))
        return {"steps": steps, "epochs": round(steps * per_step / n, 2) if n else None, "rows": n,
                "rows_per_step": per_step, "from": "max_steps" if cfg.max_steps else "epochs"}

    def _check_resumable(self):
        """A run directory resumes only the run it holds; anything else would mix two models."""
        if not (self.out / "state" / "latest.json").is_file():
            return
        saved = checkpoint.read_json(self.out / "config.json")
        for key in ("model", "stage", "lora"):
            if saved.get(key) != self.run_config.get(key):
                raise KosmoError(f"{self.out}: holds a run with another '{key}' config; "
                                 "use a new --out or delete it to start over")

    def _make_optimizer(self):
        """AdamW with one group per (lr scale, decay or not): no decay on norms and biases; fused, one
        kernel over all parameters (transformers' Trainer's default too), on CPU as on GPU."""
        groups: dict[tuple[float, bool], list] = {}
        for name, p in D.unwrap(self.model).named_parameters():
            if p.requires_grad:
                scale = next((float(v) for k, v in self.cfg.lr_scale.items()
                              if name.startswith(k) or fnmatch.fnmatchcase(name, k)), 1.0)
                groups.setdefault((scale, p.ndim >= 2), []).append(p)
        param_groups = [{"params": ps, "lr_scale": scale, "weight_decay": self.cfg.weight_decay if decay else 0.0}
                        for (scale, decay), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))]
        return torch.optim.AdamW(param_groups, lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2), fused=True)

    # ---- data order ------------------------------------------------------------------------
    def _rows(self, step: int, micro: int) -> list[int]:
        """The dataset indices of one micro-batch: a seeded permutation per epoch, consumed in order.
        Ranks take consecutive slices of each global step, so 2 ranks x B rows = 1 rank x 2B rows."""
        B, world, n = self.cfg.batch_size, self.env.world, len(self.train_set)
        per_step = B * world * self.cfg.grad_accum
        first = step * per_step + (micro * world + self.env.rank) * B
        rows = []
        for g in range(first, first + B):
            epoch = g // n
            if epoch != self._perm_epoch:
                gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
                self._perm, self._perm_epoch = torch.randperm(n, generator=gen).tolist(), epoch
                if hasattr(self.train_set, "arrange"):
                    self._perm = self.train_set.arrange(self._perm, B, (-epoch * n) % B, gen)
            rows.append(self._perm[g % n])
        return rows

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, env = self.cfg, self.env
        if torch.is_autocast_enabled(env.device.type):
            # autocast caches its casts of the weights until the outermost autocast exits: under a
            # caller's autocast every step would run on the weights of the first
            raise KosmoError("training runs its own autocast (train.precision); start it outside torch.autocast")
        self._resume()
        if env.main:
            self.out.mkdir(parents=True, exist_ok=True)
            checkpoint.write_json(self.out / "config.json", self.run_config)
        writer = self._tensorboard()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (env.main and cfg.progress),
                   file=sys.stderr, dynamic_ncols=True,
                   desc=f"{self.run_config.get('stage', 'train')} ({self.budget['epochs'] or '?'} epochs)",
                   mininterval=0.5 if sys.stderr.isatty() else 30)  # keep CI logs short
        last = {}
        self.model.train()
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            last = self._train_step()
            last["step_time"] = time.perf_counter() - t0
            last["tok_per_s"] = last["tokens"] / last["step_time"]
            if self.flops_per_token is not None:  # (PPO's steps, rollouts and all, are not counted)
                last["mfu"] = self.flops_per_token * last["tok_per_s"] / self.peak_flops
            self.step += 1
            if cfg.eval_every and self.eval_set is not None and (self.step % cfg.eval_every == 0
                                                                 or self.step == cfg.max_steps):
                last["eval_loss"] = self.evaluate()
            if env.main and (self.step % cfg.log_every == 0 or "eval_loss" in last):
                self._log(last, writer)
            bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tok_per_s']:.0f}",
                            **({"mfu": f"{last['mfu']:.1%}"} if "mfu" in last else {}), refresh=False)
            bar.update(1)
            if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                self.save()
        bar.close()
        if writer:
            writer.close()
        return last

    def _train_step(self) -> dict:
        cfg, env = self.cfg, self.env
        lr = lr_at(self.step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        if self.streaming:
            batches = [self.train_set.next_batch(cfg.batch_size) for _ in range(cfg.grad_accum)]
        else:
            batches = [self.train_set.collate(self._rows(self.step, m)) for m in range(cfg.grad_accum)]
        n_total = D.all_reduce_sum(torch.tensor(float(sum(b["n_targets"] for b in batches)), device=env.device))
        loss_sum = torch.zeros((), device=env.device)
        extras: dict[str, float] = {}
        # MFU counts the model's FLOPs as PaLM does: three times the forward's (a backward's matmuls are
        # twice its forward's), the forward's counted by torch on the first step. (Counting the backward
        # too would change its numbers: under the counter some ops take other kernels, and resume is exact.)
        counter = flop_counter.FlopCounterMode(display=False) if self.flops_per_token is None else None
        for m, batch in enumerate(batches):
            no_sync = getattr(self.model, "no_sync", None)
            ctx = no_sync() if no_sync and m < cfg.grad_accum - 1 else contextlib.nullcontext()
            with ctx:
                with counter or contextlib.nullcontext(), hardware.autocast(env.device, self.precision):
                    loss, metrics = self.loss_fn(self.model, to_device(batch, env.device))
                # Sum over targets / global target count: the exact mean even when micro-batches and ranks
                # hold different numbers of targets. DDP averages gradients over ranks, hence * world.
                (loss * env.world / n_total.clamp(min=1)).backward()
            loss_sum += loss.detach().float()
            for k, v in metrics.items():
                extras[k] = extras.get(k, 0.0) + float(v) / cfg.grad_accum
        if counter is not None:
            # this rank's FLOPs over every rank's tokens: the FLOPs of a token are world times that
            self.flops_per_token = 3 * counter.get_total_flops() * env.world / max(1.0, float(n_total))
        loss_mean = (D.all_reduce_sum(loss_sum) / n_total.clamp(min=1)).item()
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if math.isfinite(loss_mean) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.nonfinite_run = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_run += 1
            if self.nonfinite_run >= cfg.max_nonfinite:
                raise KosmoError(f"loss or gradient was non-finite for {self.nonfinite_run} steps in a row "
                                 f"(last at step {self.step + 1}); lower train.lr or use train.precision=fp32")
        self.optimizer.zero_grad(set_to_none=True)
        return {"step": self.step + 1, "loss": loss_mean, "lr": lr, "grad_norm": grad_norm,
                "tokens": int(n_total.item()), "skipped_steps": self.nonfinite_total, "precision": self.precision,
                **extras}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first `eval_batches` batches of the eval set, split across ranks."""
        cfg, env = self.cfg, self.env
        self.model.eval()
        loss_sum = torch.zeros((), device=env.device)
        count = torch.zeros((), device=env.device)
        n = len(self.eval_set)
        starts = range(0, min(n, cfg.eval_batches * cfg.batch_size * env.world), cfg.batch_size * env.world)
        for s in starts:
            lo = s + env.rank * cfg.batch_size
            rows = list(range(lo, min(lo + cfg.batch_size, n)))
            if not rows:
                continue
            batch = self.eval_set.collate(rows)
            with hardware.autocast(env.device, self.precision):
                loss, _ = self.loss_fn(self.model, to_device(batch, env.device))
            loss_sum += loss.float()
            count += batch["n_targets"]
        self.model.train()
        return (D.all_reduce_sum(loss_sum) / D.all_reduce_sum(count).clamp(min=1)).item()

    # ---- metrics ----------------------------------------------------------------------------
    def _tensorboard(self):
        if not (self.env.main and self.cfg.tensorboard):
            return None
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(self.out / "tb"), purge_step=self.step + 1)

    def _log(self, row: dict, writer):
        row = {k: (float(f"{v:.6g}") if k in ("step_time", "tok_per_s", "mfu") else v) for k, v in row.items()}
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if writer:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    writer.add_scalar(f"train/{k}" if k != "eval_loss" else "eval/loss", v, row["step"])

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self):
        """Writes state/step-N/, then publishes it with an atomic rewrite of state/latest.json."""
        env = self.env
        weights = D.full_model_state(self.model)
        optim = D.full_optimizer_state(self.model, self.optimizer)
        state_dir = self.out / "state" / f"step-{self.step:08d}"
        if env.main:
            inner = D.unwrap(self.model)
            names = set(lora.trained_tensors(inner) if self.adapted else checkpoint.model_tensors(inner))
            checkpoint.save_tensors(state_dir / self.weights_file, {k: v for k, v in weights.items() if k in names})
            tensors, groups = _flatten_optimizer(optim)
            checkpoint.save_tensors(state_dir / "optimizer.safetensors", tensors)
            checkpoint.write_json(state_dir / "trainer.json", {
                "step": self.step, "nonfinite_total": self.nonfinite_total, "nonfinite_run": self.nonfinite_run,
                "world": env.world, "param_groups": groups})
        D.barrier()
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state(env.device if env.device.type == "cuda" else None)
        checkpoint.save_tensors(state_dir / f"rng-rank{env.rank}.safetensors", rng)
        if self.streaming:
            position = self.train_set.state_dict()
            checkpoint.save_tensors(state_dir / f"stream-rank{env.rank}.safetensors",
                                    {k: v for k, v in position.items() if torch.is_tensor(v)})
            checkpoint.write_json(state_dir / f"stream-rank{env.rank}.json",
                                  {k: v for k, v in position.items() if not torch.is_tensor(v)})
        D.barrier()
        if env.main:
            checkpoint.write_json(self.out / "state" / "latest.json", {"step": self.step, "dir": state_dir.name})
            _publish_link(state_dir / self.weights_file, self.out / self.weights_file)
            for old in (self.out / "state").glob("step-*"):
                if old != state_dir:
                    shutil.rmtree(old, ignore_errors=True)
        D.barrier()

    def _resume(self):
        latest = self.out / "state" / "latest.json"
        if not latest.is_file():
            return
        info = checkpoint.read_json(latest)
        state_dir = self.out / "state" / info["dir"]
        trainer = checkpoint.read_json(state_dir / "trainer.json")
        D.load_model_state(self.model, checkpoint.load_tensors(state_dir / self.weights_file))
        optim = _unflatten_optimizer(checkpoint.load_tensors(state_dir / "optimizer.safetensors"),
                                     trainer["param_groups"])
        D.load_optimizer_state(self.model, self.optimizer, optim)
        rng_file = state_dir / f"rng-rank{self.env.rank}.safetensors"
        if rng_file.is_file():
            rng = checkpoint.load_tensors(rng_file)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"], self.env.device if self.env.device.type == "cuda" else None)
        if self.streaming:
            self._resume_stream(state_dir, trainer["world"])
        self.step = trainer["step"]
        self.nonfinite_total, self.nonfinite_run = trainer["nonfinite_total"], trainer["nonfinite_run"]
        if self.env.main:
            _truncate_metrics(self.out / "metrics.jsonl", self.step)
            print(f"resuming {self.out} from step {self.step}", file=sys.stderr)


    def _resume_stream(self, state_dir: Path, world: int):
        """Each rank's stream back where its checkpoint left it; its part of the data depends on the world size."""
        if world != self.env.world:
            raise KosmoError(f"{self.out}: its stream positions were saved by {world} processes; "
                             f"resume with {world}, not {self.env.world}")
        name = state_dir / f"stream-rank{self.env.rank}"
        if not name.with_suffix(".json").is_file():
            raise KosmoError(f"{name}.json: no saved stream position (was the run started on in-memory data?)")
        self.train_set.load_state_dict({**checkpoint.read_json(name.with_suffix(".json")),
                                        **checkpoint.load_tensors(name.with_suffix(".safetensors"))})


def _flatten_optimizer(optim: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for name, st in optim["state"].items():
        for key, value in st.items():
            tensors[f"{name}::{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in optim["param_groups"]]
    return tensors, groups


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[str, dict] = {}
    for flat, value in tensors.items():
        name, key = flat.rsplit("::", 1)
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in groups]}


def _publish_link(src: Path, dst: Path):
    """Makes `dst` the same file as `src` without copying (hard link, then atomic rename)."""
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        tmp.hardlink_to(src)
    except OSError:
        shutil.copyfile(src, tmp)
    tmp.replace(dst)


def _truncate_metrics(path: Path, step: int):
    """Drops rows a killed run logged after its last checkpoint (and a torn last line)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            keep.append(line)
    checkpoint.atomic_write(path, lambda p: Path(p).write_text("".join(line + "\n" for line in keep)))
