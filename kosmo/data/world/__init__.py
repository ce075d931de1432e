"""The shapes world: a seeded, procedural source of every kind of data kosmo trains and evaluates on.

A picture is a tiny RGB image (32x32 by default) of 1-3 coloured shapes, each in its own cell of a 3x3 grid, on a
light background. Every item (scene, caption, VQA, document, few-shot episode, chat, alignment prompt) is a pure
function of (seed, split, index), so nothing is stored, and because the world knows the truth a program can grade
any answer. A few (colour, shape) pairs never occur outside the "heldout" split, to measure composition.

scenes.py draws scenes and renders them; text.py says what they show (captions, corpus paragraphs, VQA);
documents.py lays pictures and text out as documents, few-shot episodes and picture recall; chats.py makes
dialogues and alignment prompts; styles.py puts answers in the form a system prompt asks for; judge.py grades
replies; signs.py sets short words, numbers and prices on signs in a real font, to be read back; speech.py reads
sentences aloud with espeak-ng and makes sound events; drawing.py writes prompts to draw a scene from and
GenEval-style evaluation items whose pictures kosmo.eval.imagegen checks; mockups.py sketches web pages to turn
into HTML, with the ground truth kosmo.eval.html checks pages against; reasoning.py asks counting questions about a
row of objects, with worked answers (chain of thought); generator.py joins the makers into one `World`; writer.py
writes it all to disk.
"""
from kosmo.data.world.chats import REFUSAL, AlignPrompt, system_prompt
from kosmo.data.world.documents import EPISODE_EXAMPLE, EPISODE_QUERY, NONCE_WORDS
from kosmo.data.world.drawing import CATEGORIES, PROMPT_STYLES, DrawItem
from kosmo.data.world.fonts import font_path
from kosmo.data.world.generator import World
from kosmo.data.world.judge import Judgement, answer_matches, judge
from kosmo.data.world.mockups import ACTIONS, Element, Mockup, mockup, render_mockup
from kosmo.data.world.reasoning import THINK, ReasoningItem, parse_answer, reasoning_item
from kosmo.data.world.scenes import COLOURS, SHAPES, SIZES, Obj, Scene, WorldConfig
from kosmo.data.world.signs import SIGN_KINDS, WORDS, Sign
from kosmo.data.world.speech import SOUND_CLASSES, Voice, sound_event, synthesise
from kosmo.data.world.styles import STYLES, apply_style, complies
from kosmo.data.world.text import FACTS, QTYPES
from kosmo.data.world.writer import (
    write_audio,
    write_drawing,
    write_fewshot,
    write_mockups,
    write_reasoning,
    write_signs,
    write_vqa_documents,
    write_world,
)

__all__ = ["ACTIONS", "CATEGORIES", "COLOURS", "EPISODE_EXAMPLE", "EPISODE_QUERY", "FACTS", "NONCE_WORDS",
           "PROMPT_STYLES", "QTYPES", "REFUSAL", "SHAPES", "SIGN_KINDS", "SIZES", "SOUND_CLASSES", "STYLES", "THINK",
           "WORDS", "AlignPrompt", "DrawItem", "Element", "Judgement", "Mockup", "Obj", "ReasoningItem", "Scene", "Sign",
           "Voice", "World", "WorldConfig", "answer_matches", "apply_style", "complies", "font_path", "judge", "mockup",
           "parse_answer", "reasoning_item", "render_mockup", "sound_event", "synthesise", "system_prompt",
           "write_audio", "write_drawing", "write_fewshot", "write_mockups", "write_reasoning", "write_signs",
           "write_vqa_documents", "write_world"]
