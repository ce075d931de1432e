"""Running a training stage end to end: config, tokenizer, model, data, trainer. The CLI and the
demo both come through here, so a stage behaves the same whichever way it is started."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from kosmo import config as C
from kosmo.data.formats import parse_source
from kosmo.model import lora
from kosmo.tokenizer import Tokenizer
from kosmo.train import distributed as D
from kosmo.train.trainer import Trainer


def stages() -> dict:
    from types import SimpleNamespace

    from kosmo.align import cai, dpo, ppo, reward
    from kosmo.train import audio, clip, flamingo, lm, mllm, sft, vqvae
    return {"lm": lm, "clip": clip, "mllm": mllm, "sft": sft, "flamingo": flamingo,
            "reward": reward, "ppo": ppo, "dpo": dpo, "audio": audio, "vqvae": vqvae,
            "cai-sl": SimpleNamespace(StageConfig=cai.SLConfig, build=cai.build_sl),
            "cai-rl": SimpleNamespace(StageConfig=cai.RLConfig, build=cai.build_rl, report=reward.report)}


def run_stage(stage_name: str, data: list, out, init=None, tokenizer=None, config_file=None,
              overrides: list[str] = ()) -> dict:
    """Trains `stage_name` on `data` into run directory `out`; returns the last step's metrics."""
    from kosmo.model.load import arch_of, load_run
    stage = stages()[stage_name]
    cfg = C.load(stage.StageConfig, config_file, overrides)
    for path in data:
        parse_source(path).files  # a missing file or an empty shard folder fails here, before any work
    out = Path(out)
    env = D.setup(cfg.train.device)
    init_model = None
    if init:
        init_model, tok, _ = load_run(init)
    elif tokenizer:
        tok = Tokenizer.load(tokenizer)
    elif (out / "tokenizer.json").is_file():
        tok = Tokenizer.load(out / "tokenizer.json")
    else:
        if env.main:
            from kosmo.data.jsonl import iter_texts
            # a stage without text (an image tokenizer) still leaves a run's tokenizer.json, of bytes alone
            texts = iter_texts(data) if getattr(stage, "reads_text", True) else iter(())
            Tokenizer.train(texts, cfg.vocab_size).save(out)
        D.barrier()
        tok = Tokenizer.load(out / "tokenizer.json")
    torch.manual_seed(cfg.train.seed)  # the initial weights are part of what a seed reproduces
    model, loss_fn, train_set, eval_set = stage.build(cfg, data, tok, init_model)
    published = getattr(model, "policy", model)  # PPO trains a policy with its critic; the run is the policy
    run_config = {"stage": stage_name, "arch": arch_of(published), "model": published.cfg.to_dict(),
                  "config": dataclasses.asdict(cfg), "data": [str(p) for p in data],
                  "init": str(init) if init else None}
    if lora.adapters(published):
        # the run keeps its adapters only: loading it starts from the base run, wherever the run is read from
        run_config |= {"lora": dataclasses.asdict(cfg.lora), "base": str(Path(init).resolve())}
    trainer = getattr(stage, "Trainer", Trainer)(cfg.train, model, loss_fn, train_set, out, run_config,
                                                 eval_set=eval_set, env=env)
    if env.main:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        b = trainer.budget
        rows = f"{b['rows']} training rows" if b["rows"] else "training rows streamed"
        epochs = f"{b['epochs']} epochs, " if b["epochs"] else ""
        print(f"{stage_name}: {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable), "
              f"{rows}, {b['steps']} steps of {b['rows_per_step']} rows "
              f"({epochs}from train.{b['from']}), world size {env.world}, device {env.device}, "
              f"{trainer.precision}", file=sys.stderr)
        tok.save(out)
    try:
        last = trainer.fit()
        if hasattr(stage, "report") and env.main:  # figures a stage measures once, after training
            last.update(stage.report(D.unwrap(trainer.model), train_set, eval_set))
        return last
    finally:
        D.teardown()
