"""The world on disk: a JSONL file per kind of item and split, the pictures as PNG files and the clips as
WAV files beside them."""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from kosmo.data.audio import SAMPLE_RATE
from kosmo.data.world.documents import Episode, Recall, Segment
from kosmo.data.world.drawing import CATEGORIES
from kosmo.data.world.generator import World
from kosmo.data.world.mockups import PROMPT, Mockup, mockup, render_mockup
from kosmo.data.world.reasoning import eval_record, reasoning_item
from kosmo.data.world.scenes import Scene, WorldConfig
from kosmo.data.world.signs import Sign
from kosmo.data.world.speech import SOUND_CLASSES, sound_event, speak
from kosmo.data.world.text import QTYPES


class Pictures:
    """A folder's images/: each scene rendered once, as images/<scene id>.png, and named by that relative path."""

    def __init__(self, world: World, out: Path):
        self.world, self.out, self.saved = world, out, set()
        (out / "images").mkdir(parents=True, exist_ok=True)

    def path(self, scene: Scene | Sign) -> str:
        rel = f"images/{scene.id}.png"
        if scene.id not in self.saved:
            picture = self.world.render_sign(scene) if isinstance(scene, Sign) else self.world.render(scene)
            picture.save(self.out / rel)
            self.saved.add(scene.id)
        return rel

    def parts(self, segments: list[Segment]) -> list[dict[str, str]]:
        """A document's content: {"image": path} and {"text": ...} parts."""
        return [{"image": self.path(s.scene)} if s.scene else {"text": s.text} for s in segments]

    def messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Chat messages with each image content part's scene replaced by its path."""
        return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                 [{"type": "image", "image": self.path(p["image"])} if p["type"] == "image" else p
                  for p in m["content"]]}
                for m in messages]


def _write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return path


def _question(pictures: Pictures, item: Episode | Recall) -> dict:
    """An episode's line to evaluate on: the document up to the query, the answer and the labels to rank."""
    segments, answer = item.document()
    return {"content": pictures.parts(segments), "answer": answer, "labels": item.labels}


def _vqa(world: World, pictures: Pictures, split: str, i: int) -> dict:
    """VQA line `i` of a split: the scenes are the captions', so both files share images, and the question
    types take turns."""
    scene = world.scene(i, split)
    items = world.vqa(scene, i)
    it = next((x for x in items if x.qtype == QTYPES[i % len(QTYPES)]), items[0])
    return {"image": pictures.path(scene), "question": it.question, "answers": [it.answer] * 10, "qtype": it.qtype}


def write_world(out_dir: str | Path, n: int, seed: int = 0, image_size: int = 32) -> dict[str, Path]:
    """Write n items of every kind as JSONL plus smaller val_/heldout_ files; the work of `kosmo world`.

    Images go to out_dir/images/<scene id>.png, once per distinct scene, referenced by relative path.
    """
    world = World(WorldConfig(seed=seed, image_size=image_size))
    out = Path(out_dir)
    pictures = Pictures(world, out)

    def caption(split: str, i: int) -> dict:
        scene = world.scene(i, split)
        caps = world.captions(scene)
        return {"image": pictures.path(scene), "text": caps[0], "captions": caps}

    def vqa(split: str, i: int) -> dict:
        return _vqa(world, pictures, split, i)

    def fewshot(split: str, i: int) -> dict:
        cycle = (2, 3, 4) if split == "train" else (0, 1, 2, 4)  # evaluation wants a curve over shots
        ep = world.episode(i, split, shots=cycle[i % len(cycle)])
        return {**_question(pictures, ep), "attribute": ep.attribute, "shots": len(ep.support)}

    def chat(split: str, i: int) -> dict:
        d = world.chat(i, split)
        return {"messages": pictures.messages(d.messages), "style": d.style, "answer": d.answers[-1]}

    def align(split: str, i: int) -> dict:
        p = world.align_prompt(i, split)
        return {"messages": pictures.messages(p.messages), "kind": p.kind, "answer": p.answer, "truth": p.truth,
                "secret": p.secret, "style": p.style}

    kinds = {"text": lambda split, i: {"text": world.text(i, split)}, "captions": caption, "vqa": vqa,
             "interleaved": lambda split, i: {"content": pictures.parts(world.interleaved(i, split))},
             "fewshot": fewshot, "chat": chat, "align": align}
    m = max(n // 10, 20)
    plan = [(name, "train", n) for name in kinds] + [
        (name, split, m) for split, names in (("val", ("captions", "vqa", "fewshot", "chat", "align")),
                                              ("heldout", ("captions", "vqa"))) for name in names]
    paths: dict[str, Path] = {}
    for name, split, count in plan:
        key = name if split == "train" else f"{split}_{name}"
        paths[key] = _write_jsonl(out / f"{key}.jsonl", (kinds[name](split, i) for i in range(count)))
    return paths


def write_fewshot(world: World, out_dir: str | Path, *, episodes: int, shots: Sequence[int], recall: int, val: int,
                  val_shots: int) -> dict[str, Path]:
    """Documents for learning from context, beyond write_world's: `episodes` training episodes, their shots
    cycling through `shots`, and `recall` picture-recall documents, every label written out; and `val` held-out
    documents of each, ending at the query, the episodes with `val_shots` examples."""
    out = Path(out_dir)
    pictures = Pictures(world, out)

    def train_episode(i: int) -> dict:
        ep = world.episode(i, "train", shots=shots[i % len(shots)])
        return {"content": pictures.parts(ep.training_document())}

    def val_episode(i: int) -> dict:
        ep = world.episode(i, "val", shots=val_shots)
        return {**_question(pictures, ep), "attribute": ep.attribute}

    kinds = {"episodes": (train_episode, episodes), "val_episodes": (val_episode, val),
             "recall": (lambda i: {"content": pictures.parts(world.recall(i).training_document())}, recall),
             "val_recall": (lambda i: _question(pictures, world.recall(i, "val")), val)}
    return {key: _write_jsonl(out / f"{key}.jsonl", (line(i) for i in range(count)))
            for key, (line, count) in kinds.items()}


def write_vqa_documents(out_dir: str | Path) -> Path:
    """write_world's training VQA as documents, a picture then 'Question: … Answer: ….' (vqa_docs.jsonl)."""
    out = Path(out_dir)
    with (out / "vqa.jsonl").open(encoding="utf-8") as vqa:
        items = [json.loads(line) for line in vqa]
    return _write_jsonl(out / "vqa_docs.jsonl", ({"content": [
        {"image": item["image"]}, {"text": f"Question: {item['question']} Answer: {item['answers'][0]}."}]}
        for item in items))


def write_signs(world: World, out_dir: str | Path, *, n: int, val: int) -> dict[str, Path]:
    """Pictures with text to read: `n` training signs and `val` held-out ones (whose numbers and prices training
    never shows), each as a caption line in signs.jsonl / val_signs.jsonl and as a reading question, the answer
    the text as written and the qtype the sign's kind, in signs_vqa.jsonl / val_signs_vqa.jsonl."""
    out = Path(out_dir)
    pictures = Pictures(world, out)

    def caption(split: str, i: int) -> dict:
        sign = world.sign(i, split)
        caps = world.sign_captions(sign)
        return {"image": pictures.path(sign), "text": caps[0], "captions": caps}

    def vqa(split: str, i: int) -> dict:
        sign = world.sign(i, split)
        item = world.sign_question(sign, i)
        return {"image": pictures.path(sign), "question": item.question, "answers": [item.answer] * 10,
                "qtype": item.qtype}

    plan = {"signs": (caption, "train", n), "signs_vqa": (vqa, "train", n),
            "val_signs": (caption, "val", val), "val_signs_vqa": (vqa, "val", val)}
    return {key: _write_jsonl(out / f"{key}.jsonl", (make(split, i) for i in range(count)))
            for key, (make, split, count) in plan.items()}


def write_drawing(world: World, out_dir: str | Path, *, n: int, val: int) -> dict[str, Path]:
    """Prompts to draw from and to be judged on: draw.jsonl, `n` lines {"prompt", "image"}, a training scene's
    picture and a true prompt for it; and val_draw.jsonl, `val` evaluation items of each category, lines
    {"prompt", "category", "spec", "image"}, the picture the held-out scene the prompt was drawn from (a real
    picture that satisfies it), the categories taking turns."""
    out = Path(out_dir)
    pictures = Pictures(world, out)

    def train(i: int) -> dict:
        scene = world.scene(i, "train")
        return {"prompt": world.draw_prompt(scene, i), "image": pictures.path(scene)}

    def evaluation(i: int) -> dict:
        item = world.draw_item(i, "val")
        return {"prompt": item.prompt, "category": item.category, "spec": item.spec,
                "image": pictures.path(item.scene)}

    return {"draw": _write_jsonl(out / "draw.jsonl", (train(i) for i in range(n))),
            "val_draw": _write_jsonl(out / "val_draw.jsonl", (evaluation(i) for i in range(val * len(CATEGORIES))))}


def write_reasoning(world: World, out_dir: str | Path, *, n: int, val: int) -> dict[str, Path]:
    """Counting questions about a row of places (kosmo.data.world.reasoning), as chats: `n` training items with
    the number as the answer (reasoning_direct.jsonl) and the same items with the worked answer
    (reasoning_worked.jsonl), so that two models trained on them differ only in their targets; the same items
    again for one chat model that knows both forms (reasoning_chat.jsonl), every other one with the system prompt
    THINK and the worked answer, the rest without it and with the number; and val_reasoning.jsonl, `val` held-out
    items in distribution then `val` out of distribution, each with its exact answer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = world.config.seed
    items = [reasoning_item(seed, "train", i) for i in range(n)]
    held_out = [reasoning_item(seed, "val", i, ood) for ood in (False, True) for i in range(val)]
    return {"reasoning_direct": _write_jsonl(out / "reasoning_direct.jsonl",
                                             ({"messages": it.messages(think=False)} for it in items)),
            "reasoning_worked": _write_jsonl(out / "reasoning_worked.jsonl",
                                             ({"messages": it.messages(think=True)} for it in items)),
            "reasoning_chat": _write_jsonl(out / "reasoning_chat.jsonl",
                                           ({"messages": it.messages(think=i % 2 == 0, system=i % 2 == 0)}
                                            for i, it in enumerate(items))),
            "val_reasoning": _write_jsonl(out / "val_reasoning.jsonl", (eval_record(it) for it in held_out))}


def write_mockups(out_dir: str | Path, *, n: int, val: int, seed: int = 0, image_size: int = 128
                  ) -> dict[str, Path]:
    """Mockups to turn into HTML: mockups.jsonl, `n` training chats (the picture and PROMPT, answered by the
    canonical page), and val_mockups.jsonl, `val` held-out ones whose lines add the page ("html") and the ground
    truth kosmo.eval.html checks a page against ("spec"). Pictures go to out_dir/images/mockup-<id>.png."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)

    def line(m: Mockup) -> dict:
        rel = f"images/mockup-{m.id}.png"
        render_mockup(m, image_size).save(out / rel)
        return {"messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT},
                                                          {"type": "image", "image": rel}]},
                             {"role": "assistant", "content": m.html()}]}

    def evaluation(i: int) -> dict:
        m = mockup(seed, "val", i)
        chat = line(m)
        return {"messages": chat["messages"][:1], "image": chat["messages"][0]["content"][1]["image"],
                "html": m.html(), "spec": m.spec()}

    return {"mockups": _write_jsonl(out / "mockups.jsonl", (line(mockup(seed, "train", i)) for i in range(n))),
            "val_mockups": _write_jsonl(out / "val_mockups.jsonl", (evaluation(i) for i in range(val)))}


def _sentence(world: World, split: str, index: int) -> str:
    """What clip `index` says: a caption or, every other clip, a question about the split's scene `index`."""
    scene = world.scene(index, split)
    if index % 2:
        questions = world.vqa(scene, index)
        return questions[index // 2 % len(questions)].question
    captions = world.captions(scene)
    return captions[index // 2 % len(captions)]


def write_audio(world: World, out_dir: str | Path, *, n: int, val: int, questions: int | None = None
                ) -> dict[str, Path]:
    """Spoken sentences, spoken questions and sound events: `n` training and `val` evaluation clips of each (of
    training questions, `questions` if given), as 16-bit 16 kHz WAV files under out_dir/audio/ and speech.jsonl,
    spoken_vqa.jsonl, sounds.jsonl and their val_ files.

    Speech and sounds are lines {"audio": path, "text": target}, the target a transcript or a sound's class
    name, so transcription and naming sounds share one format; a speech line adds the voice that read it, a
    sound line the class names to rank. A spoken question is a VQA line with the question read aloud in
    `question_audio`. Training asks every question of each picture in turn, so that every kind of question is
    heard about the same picture; evaluation asks write_world's VQA lines (the same picture and question of the
    same index): the first `val` lines of val_vqa.jsonl, asked aloud, are val_spoken_vqa.jsonl.
    """
    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    seed = world.config.seed
    pictures = Pictures(world, out)

    def spoken(split: str, i: int) -> tuple[np.ndarray, dict]:
        text = _sentence(world, split, i)
        voice, audio = speak(text, seed, split, i)
        return audio, {"text": text, "voice": asdict(voice)}

    def question(split: str, i: int) -> tuple[np.ndarray, dict]:
        if split == "val":
            line = _vqa(world, pictures, split, i)
        else:
            scene = world.scene(i // len(QTYPES), split)
            item = world.vqa(scene, i // len(QTYPES))[i % len(QTYPES)]
            line = {"image": pictures.path(scene), "question": item.question, "answers": [item.answer] * 10,
                    "qtype": item.qtype}
        voice, audio = speak(line["question"], seed, split, i, stream="question_voice")
        return audio, {**line, "voice": asdict(voice)}

    def sound(split: str, i: int) -> tuple[np.ndarray, dict]:
        name, audio = sound_event(seed, split, i)
        return audio, {"text": name, "labels": list(SOUND_CLASSES)}

    def clips(key: str, make: Callable[[str, int], tuple[np.ndarray, dict]], split: str, count: int):
        def line(i: int) -> dict:
            audio, fields = make(split, i)
            rel = f"audio/{key}_{i:05d}.wav"
            soundfile.write(out / rel, audio, SAMPLE_RATE, subtype="PCM_16")
            return {"question_audio": rel, **fields} if "question" in fields else {"audio": rel, **fields}
        # espeak-ng runs as a subprocess and numpy releases the GIL, so threads keep every core busy.
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            return list(pool.map(line, range(count)))

    plan = {"speech": (spoken, "train", n), "val_speech": (spoken, "val", val),
            "spoken_vqa": (question, "train", n if questions is None else questions),
            "val_spoken_vqa": (question, "val", val),
            "sounds": (sound, "train", n), "val_sounds": (sound, "val", val)}
    return {key: _write_jsonl(out / f"{key}.jsonl", clips(key, make, split, count))
            for key, (make, split, count) in plan.items()}
