"""`kosmo chat`: a conversation with a run in the terminal, streamed token by token.

Commands: `/image PATH` attaches a picture to the next message, `/audio PATH` a sound clip (a spoken
question, say), `/system TEXT` sets the system prompt, `/reset` starts over, `/quit` (or Ctrl-D) leaves.
Answers go to stdout, everything else to stderr, so a piped session's stdout is the model's words alone.
"""

from __future__ import annotations

import queue
import sys

import torch

from kosmo.data.audio import batch_clips, clip_features, load_audio
from kosmo.data.chat import render
from kosmo.data.images import load_image
from kosmo.errors import KosmoError
from kosmo.serve.engine import Engine, Params, Request

HELP = "/image PATH attaches a picture to your next message, /audio PATH a sound clip, " \
       "/system TEXT sets the system prompt, /reset starts over, /quit leaves"


class Conversation:
    def __init__(self, engine: Engine, tokenizer, max_tokens: int, temperature: float):
        self.engine, self.tokenizer = engine, tokenizer
        self.max_tokens, self.temperature = max_tokens, temperature
        self.system: str | None = None
        self.reset()

    def reset(self):
        self.messages: list[dict] = []
        self.pictures: dict[str, torch.Tensor] = {}  # path -> pixels, for every image in the conversation
        self.clips: dict[str, torch.Tensor] = {}  # path -> log-mel features, for every clip in it
        self.attached: list[dict] = []  # image and audio parts waiting for the next message, in order

    def attach_image(self, path: str):
        if not self.engine.model.image_size:
            raise KosmoError("this model is text-only; it does not take images")
        self.pictures[path] = load_image(path, self.engine.model.image_size, self.engine.image_mode)
        self.attached.append({"type": "image", "image": path})

    def attach_audio(self, path: str):
        model = self.engine.model
        if not model.n_mels:
            raise KosmoError("this model has no ears; it does not take audio")
        features = clip_features(load_audio(path), model.n_mels, path)
        try:
            model.audio_tokens(features.shape[-1])  # refuse a clip too long now, not at the next message
        except ValueError as e:
            raise KosmoError(f"{path}: {e}") from None
        self.clips[path] = features
        self.attached.append({"type": "audio", "audio": path})

    def say(self, text: str, out) -> str:
        """Sends a user message; streams the answer to `out` and returns it."""
        model = self.engine.model
        messages = self.messages + [{"role": "user", "content": [{"type": "text", "text": text}, *self.attached]}]
        system = [{"role": "system", "content": self.system}] if self.system else []
        ids, _, pictures, clips = render(system + messages, self.tokenizer, model.tokens_per_image,
                                         add_generation_prompt=True,
                                         audio_tokens=lambda path, _: model.audio_tokens(self.clips[path].shape[-1]))
        room = self.engine.context - len(ids)
        if room < 1:
            raise KosmoError(f"the conversation ({len(ids)} tokens) fills the model's context of "
                             f"{self.engine.context}; /reset to start over")
        images = torch.stack([self.pictures[p] for p in pictures]) if pictures else None
        audio = batch_clips([self.clips[p] for p in clips], model.n_mels) if clips else None
        events: queue.Queue = queue.Queue()
        try:
            self.engine.submit(Request(ids, Params(max_tokens=min(self.max_tokens, room),
                                                   temperature=self.temperature), events.put, images, audio))
        except ValueError as e:  # too many pictures for the engine's room
            raise KosmoError(f"{e}; /reset to start over") from None
        answer = ""
        while True:
            event = events.get()
            if isinstance(event, Exception):
                raise KosmoError(f"generation failed: {event}")
            answer += event.text
            out.write(event.text)
            out.flush()
            if event.finish:
                break
        out.write("\n")
        self.messages = messages + [{"role": "assistant", "content": answer}]
        self.attached = []
        return answer


def chat(run: str, device: str = "auto", max_tokens: int = 256, temperature: float = 0.0, precision: str = "auto"):
    from kosmo.hardware import pick_device
    from kosmo.model.load import load_run
    model, tokenizer, config = load_run(run, pick_device(device), precision)
    try:
        engine = Engine(model, tokenizer, max_batch=1, max_images=16,
                        image_mode=config.get("config", {}).get("image_mode", "crop"), precision=precision).start()
    except ValueError as e:
        raise KosmoError(f"{run}: {e}") from None
    talk = Conversation(engine, tokenizer, max_tokens, temperature)
    interactive = sys.stdin.isatty()
    print(f"kosmo chat with {run}: {HELP}", file=sys.stderr)
    try:
        while True:
            try:
                line = input("> " if interactive else "").strip()
            except EOFError:
                break
            command, _, arg = line.partition(" ")
            try:
                if command == "/quit":
                    break
                elif command == "/reset":
                    talk.reset()
                    print("(new conversation)", file=sys.stderr)
                elif command == "/system":
                    talk.system = arg.strip() or None
                    print("(system prompt set)" if talk.system else "(system prompt cleared)", file=sys.stderr)
                elif command in ("/image", "/audio"):
                    (talk.attach_image if command == "/image" else talk.attach_audio)(arg.strip())
                    print(f"(attached {arg.strip()})", file=sys.stderr)
                elif line.startswith("/"):
                    print(f"unknown command {command!r}: {HELP}", file=sys.stderr)
                elif line:
                    talk.say(line, sys.stdout)
            except KosmoError as e:
                print(f"error: {e}", file=sys.stderr)
    finally:
        engine.stop()
