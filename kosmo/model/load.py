"""Loading a model back from a run directory (config.json + model.safetensors + tokenizer.json; a LoRA
run holds adapter.safetensors instead, and names its base run in config.json)."""

from __future__ import annotations

from pathlib import Path

import torch

from kosmo import checkpoint, hardware
from kosmo.errors import KosmoError
from kosmo.model import lora
from kosmo.model.clip import CLIP, CLIPConfig
from kosmo.model.ctc import AudioCTC, CTCConfig
from kosmo.model.flamingo import Flamingo, FlamingoConfig
from kosmo.model.lm import LM, LMConfig
from kosmo.model.mllm import MLLM, MLLMConfig
from kosmo.model.reward import RewardConfig, RewardModel
from kosmo.model.vqvae import VQVAE, VQVAEConfig
from kosmo.tokenizer import Tokenizer

ARCHS = {"lm": (LM, LMConfig), "mllm": (MLLM, MLLMConfig), "clip": (CLIP, CLIPConfig),
         "flamingo": (Flamingo, FlamingoConfig), "reward": (RewardModel, RewardConfig),
         "ctc": (AudioCTC, CTCConfig), "vqvae": (VQVAE, VQVAEConfig)}


def arch_of(model: torch.nn.Module) -> str:
    return next(name for name, (cls, _) in ARCHS.items() if isinstance(model, cls))


def build_model(config: dict, where: str) -> torch.nn.Module:
    arch = config.get("arch", "lm")
    if arch not in ARCHS:
        raise KosmoError(f"{where}: unknown model arch {arch!r} (known: {', '.join(ARCHS)})")
    cls, cfg_cls = ARCHS[arch]
    if not isinstance(config.get("model"), dict):
        raise KosmoError(f"{where}: no 'model' config")
    try:
        return cls(cfg_cls.from_dict(config["model"], "model."))
    except KosmoError as e:
        raise KosmoError(f"{where}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise KosmoError(f"{where}: invalid model config ({e})") from None


def load_run(run: str | Path, device: str | torch.device = "cpu", precision: str = "fp32",
             merge: bool = True) -> tuple[torch.nn.Module, Tokenizer, dict]:
    """The run's model on `device`, its tokenizer and its config. A model loaded to infer in bf16
    (`precision` bf16, or auto where bf16 is native) holds bf16 weights: under autocast, fp32 weights
    would be cast afresh at every call, which costs a decode step more than bf16 saves. A LoRA run's
    adapters are merged into the weights unless `merge` is false."""
    run = Path(run)
    if not run.is_dir():
        raise KosmoError(f"{run}: run directory not found")
    config = checkpoint.read_json(run / "config.json")
    model = build_model(config, str(run / "config.json"))
    if "lora" in config:
        load_adapted(model, run, config, merge)
    else:
        checkpoint.load_weights(model, checkpoint.load_tensors(run / "model.safetensors"), run / "model.safetensors")
    tokenizer = Tokenizer.load(run / "tokenizer.json")
    # a CTC model writes characters: the run's tokenizer is there for the stages that chain from it
    vocab = model.cfg.text.vocab_size if isinstance(model, CLIP) else getattr(model, "vocab_size", None)
    if vocab is not None and tokenizer.vocab_size > vocab:
        raise KosmoError(f"{run}: tokenizer has {tokenizer.vocab_size} tokens, the model only {vocab}")
    device = torch.device(device)
    dtype = torch.bfloat16 if hardware.resolve_precision(precision, device) == "bf16" else None
    return model.to(device, dtype).eval(), tokenizer, config


def load_adapted(model: torch.nn.Module, run: Path, config: dict, merge: bool = True):
    """Fills `model` from a LoRA run: its base run's weights, then the run's adapters (and whatever else
    it trained) on top, merged into the weights if `merge`."""
    base_dir = Path(config.get("base") or "")
    if not (base_dir / "config.json").is_file():
        raise KosmoError(f"{run}: a LoRA run holds only its adapters, and its base run {str(base_dir)!r} "
                         "is not there (it is named by 'base' in config.json)")
    base, _, _ = load_run(base_dir)
    if isinstance(model, RewardModel) and not isinstance(base, RewardModel):
        base = RewardModel.from_model(base)  # a reward model starts from its base's backbone; its head trained
    checkpoint.load_weights(model, checkpoint.model_tensors(base), base_dir)
    try:
        lora.add_adapters(model, lora.LoRAConfig(**config["lora"]))
    except (TypeError, ValueError) as e:
        raise KosmoError(f"{run / 'config.json'}: invalid lora config ({e})") from None
    path = run / "adapter.safetensors"
    adapter = checkpoint.load_tensors(path)
    missing = [n for n in model.state_dict() if n.endswith((".lora_a", ".lora_b")) and n not in adapter]
    if missing:
        raise KosmoError(f"{path}: missing tensor '{missing[0]}' ({len(missing)} missing in all)")
    checkpoint.load_weights(model, {**checkpoint.model_tensors(model), **adapter}, path)
    if merge:
        lora.merge(model)


def save_run(run: str | Path, model: torch.nn.Module, tokenizer: Tokenizer, config: dict):
    """A complete run directory for a model made outside the trainer (e.g. imported)."""
    run = Path(run)
    checkpoint.save_tensors(run / "model.safetensors", checkpoint.model_tensors(model))
    tokenizer.save(run / "tokenizer.json")
    checkpoint.write_json(run / "config.json", config)
