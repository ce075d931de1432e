"""Constitutional AI (Bai et al. 2022): harmlessness from a written constitution instead of human labels.

Supervised stage (`kosmo train cai-sl --init runs/sft --data red_team.jsonl [helpful=helpful.jsonl]`):
the model answers each red-team prompt, is asked to critique its answer under a principle drawn at
random, then to revise it; after `rounds` rounds it is fine-tuned on the revised answers. Few-shot
conversations from the constitution file show the critique and revision format. As in the paper, the
fine-tuning set also holds the model's own answers to helpfulness prompts, unrevised, so that it
learns to refuse what the red team asks without unlearning how to help.

RL stage (`kosmo train cai-rl --init runs/cai-sl --data prompts.jsonl`): the model samples two replies
per prompt; a feedback model (`feedback=RUN`, by default the --init model) reads a multiple-choice
question under a drawn labelling principle, and the normalised probabilities of "(A)" and "(B)"
become soft preference labels. A preference model trained on them is the run's output; `kosmo train
ppo reward=RUN` then optimises the policy against it. No judge label is used anywhere.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kosmo.align import data as A
from kosmo.align.reward import StageConfig as RewardStageConfig
from kosmo.align.reward import adapted, make_loss, split
from kosmo.config import read_yaml
from kosmo.data import chat
from kosmo.data.multimodal import Example, MultimodalDataset
from kosmo.errors import KosmoError
from kosmo.generate import Sampling
from kosmo.model import lora
from kosmo.model.causal_lm import CausalLM
from kosmo.model.reward import RewardModel
from kosmo.train.lm import lm_loss
from kosmo.train.mllm import mllm_loss
from kosmo.train.trainer import TrainConfig

DEFAULT_CONSTITUTION = Path(__file__).resolve().parents[2] / "configs" / "constitution" / "default.yaml"
EXAMPLE_FIELDS = ("request", "response", "critique", "revision")


@dataclass
class Principle:
    critique: str
    revision: str


@dataclass
class Constitution:
    principles: list[Principle]
    labelling: list[str]
    examples: list[dict]


def load_constitution(path: str | Path) -> Constitution:
    path = Path(path)
    if not path.is_file():
        raise KosmoError(f"{path}: constitution file not found")
    doc = read_yaml(path)

    def strings(obj, keys, where):
        for key in keys:
            if not isinstance(obj, dict) or not isinstance(obj.get(key), str) or not obj[key].strip():
                raise KosmoError(f"{path}: {where} needs a non-empty string '{key}'")

    principles = doc.get("principles")
    if not isinstance(principles, list) or not principles:
        raise KosmoError(f"{path}: 'principles' must be a non-empty list")
    for i, p in enumerate(principles):
        strings(p, ("critique", "revision"), f"principles[{i}]")
    labelling = doc.get("labelling")
    if not isinstance(labelling, list) or not labelling or not all(isinstance(x, str) and x for x in labelling):
        raise KosmoError(f"{path}: 'labelling' must be a non-empty list of strings")
    examples = doc.get("examples") or []
    for i, ex in enumerate(examples):
        strings(ex, EXAMPLE_FIELDS, f"examples[{i}]")
        if not 0 <= ex.get("principle", 0) < len(principles):
            raise KosmoError(f"{path}: examples[{i}].principle is not the index of a principle")
    return Constitution([Principle(p["critique"], p["revision"]) for p in principles], labelling, examples)


# ---- the supervised stage: critique -> revision ---------------------------------------------------------------------
def few_shot_turns(con: Constitution, shots: int) -> list[dict]:
    """The constitution's format examples as earlier turns of the conversation."""
    turns = []
    for ex in con.examples[:shots]:
        p = con.principles[ex.get("principle", 0)]
        if ex.get("system"):
            turns.append({"role": "system", "content": ex["system"]})
        turns += [{"role": "user", "content": ex["request"]}, {"role": "assistant", "content": ex["response"]},
                  {"role": "user", "content": p.critique}, {"role": "assistant", "content": ex["critique"]},
                  {"role": "user", "content": p.revision}, {"role": "assistant", "content": ex["revision"]}]
    return turns


def with_few_shot(messages: list[dict], shots: list[dict]) -> list[dict]:
    """The examples go before the conversation, which keeps its own system prompt in front of its request."""
    return shots + messages


@dataclass
class SLConfig(lora.LoRAStage):
    train: TrainConfig = field(default_factory=TrainConfig)
    constitution: str = str(DEFAULT_CONSTITUTION)
    rounds: int = 1               # critique -> revision rounds per answer
    shots: int = 3                # few-shot format examples in each critique and revision prompt
    seq_len: int = 512
    temperature: float = 1.0      # the first answer is sampled; critiques and revisions are greedy
    max_new_tokens: int = 32
    batch_size: int = 64          # generation batch
    image_mode: str = "crop"
    helpful: str = ""             # helpfulness prompts (JSONL): the model's own greedy answers join the data


def _ask(model, tok, k, max_len, prompts: list[A.Prompt], chats: list[list[dict]], bank, s: Sampling,
         batch_size: int) -> list[str]:
    """The model's replies to follow-up turns of each prompt's conversation (same images)."""
    asks = [A.make_prompt(c, tok, k, max_len, p.record, "cai") for p, c in zip(prompts, chats)]
    for a, p in zip(asks, prompts):
        a.images = p.images
    return [tok.decode(t).strip() for t, _ in A.sample(model, asks, bank, s, batch_size)]


def critique_and_revise(model, tok, con: Constitution, prompts: list[A.Prompt], bank, cfg: SLConfig,
                        max_len: int) -> list[dict]:
    """Per prompt: the first answer and every (principle, critique, revision) round, last revision last."""
    k = model.tokens_per_image
    rng = random.Random(cfg.train.seed)
    shots = few_shot_turns(con, cfg.shots)
    first = A.sample(model, prompts, bank, Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                                    seed=cfg.train.seed), cfg.batch_size)
    answers = [tok.decode(t).strip() for t, _ in first]
    logs = [{"answer": a, "rounds": []} for a in answers]
    greedy = Sampling(max_new_tokens=cfg.max_new_tokens)
    for _ in range(cfg.rounds):
        drawn = [con.principles[rng.randrange(len(con.principles))] for _ in prompts]
        chats = [with_few_shot(p.messages, shots) + [{"role": "assistant", "content": a},
                                                     {"role": "user", "content": pr.critique}]
                 for p, a, pr in zip(prompts, answers, drawn)]
        critiques = _ask(model, tok, k, max_len, prompts, chats, bank, greedy, cfg.batch_size)
        chats = [c + [{"role": "assistant", "content": cr}, {"role": "user", "content": pr.revision}]
                 for c, cr, pr in zip(chats, critiques, drawn)]
        revisions = _ask(model, tok, k, max_len, prompts, chats, bank, greedy, cfg.batch_size)
        # an empty revision changed nothing worth keeping: the answer it was to revise stands
        revisions = [rv or a for rv, a in zip(revisions, answers)]
        for log, pr, cr, rv in zip(logs, drawn, critiques, revisions):
            log["rounds"].append({"critique_request": pr.critique, "critique": cr, "revision": rv})
        answers = revisions
    return logs


def build_sl(cfg: SLConfig, data: list, tok, init_model=None):
    if not isinstance(init_model, CausalLM):
        raise KosmoError("cai-sl needs --init RUN: the helpful model whose answers it revises")
    con = load_constitution(cfg.constitution)
    k = init_model.tokens_per_image
    max_len = min(cfg.seq_len, init_model.context_length)
    prompts = A.read_prompts(data, tok, k, max_len - cfg.max_new_tokens)
    helpful = A.read_prompts([cfg.helpful], tok, k, max_len - cfg.max_new_tokens) if cfg.helpful else []
    bank = A.image_bank(init_model, prompts + helpful, cfg.image_mode)
    logs = critique_and_revise(init_model, tok, con, prompts, bank, cfg, max_len)
    for p, log in list(zip(prompts, logs))[:3]:
        print(f"cai-sl: {tok.decode(p.ids[-24:])!r}\n  answer: {log['answer']!r}\n"
              f"  critique: {log['rounds'][-1]['critique']!r}\n  revision: {log['rounds'][-1]['revision']!r}",
              file=sys.stderr)
    answers = [log["rounds"][-1]["revision"] for log in logs]
    if helpful:
        greedy = Sampling(max_new_tokens=cfg.max_new_tokens)
        answers += [tok.decode(t).strip() for t, _ in A.sample(init_model, helpful, bank, greedy, cfg.batch_size)]
        print(f"cai-sl: {len(prompts)} revised red-team answers, {len(helpful)} helpful answers kept as they were",
              file=sys.stderr)
    examples = []
    for p, answer in zip(prompts + helpful, answers):
        ids, target, _, _ = chat.render(p.messages + [{"role": "assistant", "content": answer}], tok, k)
        examples.append(Example(ids[:max_len], target[:max_len], p.images, "chat"))
    train = MultimodalDataset(examples, bank)
    model = lora.adapt(init_model, cfg.lora) if cfg.freeze == "lora" else A.freeze_vision(init_model)
    return model, (mllm_loss if k else lm_loss), train, None


# ---- the RL stage: AI feedback -> preference model ----------------------------------------------------------------
def soft_labels(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """P("(A)") / (P("(A)") + P("(B)")) from the two options' log-probs."""
    return torch.sigmoid(logp_a - logp_b)


def choice_messages(messages: list[dict], a: str, b: str, principle: str) -> list[dict]:
    """The conversation with a multiple-choice question about its two candidate replies as the last user turn."""
    *before, last = messages
    content = last["content"] if isinstance(last["content"], list) else [{"type": "text", "text": last["content"]}]
    question = f"\n{principle}\nOptions:\n(A) {a}\n(B) {b}\nThe answer is:"
    return before + [{"role": "user", "content": content + [{"type": "text", "text": question}]}]


@torch.no_grad()
def option_logprobs(model, tok, prompts: list[A.Prompt], option: str, bank, batch_size: int = 32) -> torch.Tensor:
    """log P(option | prompt) for each prompt: the summed log-probs of the option's tokens."""
    device = next(model.parameters()).device
    cont = tok.encode(option)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids, reply = A.pad_right([(p.ids + cont, len(p.ids)) for p in chunk], 10 ** 9)
        paths = [x for p in chunk for x in p.images]
        batch = {"input": ids.to(device), "reply": reply.to(device),
                 "images": bank.get(paths).to(device) if paths else None}
        out.append(A.sequence_logprobs(model, batch).float().cpu())
    return torch.cat(out)


@dataclass
class RLConfig(RewardStageConfig):
    constitution: str = str(DEFAULT_CONSTITUTION)
    feedback: str = ""            # the feedback model's run (default: the --init model)


def ai_feedback(policy, feedback, tok, con: Constitution, prompts: list[A.Prompt], bank, cfg: RLConfig,
                max_len: int) -> list[A.Pair]:
    """Two sampled replies per prompt, labelled by the feedback model under a drawn labelling principle."""
    rng = random.Random(cfg.train.seed)
    s = Sampling(max_new_tokens=cfg.label.max_new_tokens, temperature=cfg.label.temperature, seed=cfg.train.seed)
    first, second = (A.sample(policy, prompts, bank, Sampling(**{**s.__dict__, "seed": s.seed + j}),
                              cfg.label.batch_size) for j in range(2))
    k = feedback.tokens_per_image
    kept, questions = [], []
    for p, (ta, _), (tb, _) in zip(prompts, first, second):
        a, b = tok.decode(ta).strip(), tok.decode(tb).strip()
        if a == b:
            continue  # nothing to choose between
        ids = chat.render(choice_messages(p.messages, a, b, rng.choice(con.labelling)), tok, k,
                          add_generation_prompt=True).ids
        if len(ids) + 4 > max_len:
            continue  # the question does not fit the feedback model's context
        kept.append((p, a, b))
        questions.append(A.Prompt(ids, p.images, p.messages, p.record))
    if not kept:
        raise KosmoError("no prompt gave two different replies whose comparison fits seq_len; "
                         "raise label.temperature or seq_len")
    p_a = soft_labels(option_logprobs(feedback, tok, questions, "(A)", bank),
                      option_logprobs(feedback, tok, questions, "(B)", bank)).tolist()
    # the preferred reply goes first, so that pair accuracy reads as agreement with the feedback model
    return [A.Pair(p, a, b, prob=q) if q >= 0.5 else A.Pair(p, b, a, prob=1 - q) for (p, a, b), q in zip(kept, p_a)]


def build_rl(cfg: RLConfig, data: list, tok, init_model=None):
    from kosmo.model.load import load_run
    if not isinstance(init_model, CausalLM):
        raise KosmoError("cai-rl needs --init RUN: the policy whose replies are compared (e.g. the cai-sl run)")
    con = load_constitution(cfg.constitution)
    feedback = load_run(cfg.feedback)[0] if cfg.feedback else init_model
    k = init_model.tokens_per_image
    max_len = min(cfg.seq_len, init_model.context_length)
    prompts = A.read_prompts(data, tok, k, max_len - cfg.label.max_new_tokens)
    bank = A.image_bank(init_model, prompts, cfg.image_mode)
    pairs = ai_feedback(init_model, feedback, tok, con, prompts, bank, cfg, max_len)
    print(f"cai-rl: {len(pairs)} AI-labelled pairs, mean confidence "
          f"{sum(p.prob for p in pairs) / len(pairs):.3f}", file=sys.stderr)
    train, val = split(pairs, cfg.val_fraction)
    model = adapted(RewardModel.from_model(init_model), cfg)
    return (model, make_loss(cfg), A.PairDataset(train, tok, bank, max_len),
            A.PairDataset(val, tok, bank, max_len) if val else None)
