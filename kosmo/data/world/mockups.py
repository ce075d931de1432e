"""Hand-drawn web-page mockups, the HTML each one asks for, and the ground truth an evaluator checks a page against.

A mockup is a page of 3-6 elements on a grid of ROWS rows and COLS columns: a header with a title across the
top row, then buttons, a text input, an image placeholder and a list, each in one cell or across a whole row.
Some buttons carry a handwritten note in red ink ("↑ joke") that asks for an action, from ACTIONS, each with an
effect a browser can check. Every mockup is a pure function of (seed, split, index), and a tenth of all pages
(by hash) are held out: only splits other than train draw them.

The picture is drawn as a person sketches one: wobbly pen strokes, boxes shifted a little within their cells,
text in a large DejaVu font. At the default 128 pixels a side a cell is 64x32 pixels and the smallest text
(a note) is 10 pixels tall, about the smallest a 16-pixel-patch ViT reads reliably; 96 pixels would shrink
notes below 8 pixels.

The HTML is canonical and short, so a small model can learn to write it: a <main> holding one tag per element
in reading order, each placed by `grid-area:row/col/row-end/col-end`. The look and the actions live in HEAD,
shared by every page: a button only names its action (data-action="joke") and HEAD's script performs it. The
jitter is the sketch's, not the layout's: an element's ground-truth box is its grid area, as Chromium lays it out
in a VIEWPORT-pixel square page.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from kosmo.data.world.fonts import font
from kosmo.data.world.scenes import item_rng, pick

ROWS, COLS = 4, 2
VIEWPORT, PAD, GAP = 512, 16, 16  # the page in CSS pixels; the grid's padding and gap, shared by HEAD and box()
PROMPT = "Turn this mockup into HTML."

TITLES = ("Shop", "News", "Login", "Notes", "Photos", "Music", "Recipes", "Weather", "Games", "Travel", "Books",
          "Sports")
LABELS = ("OK", "Go", "Send", "Save", "Buy", "Next", "Back", "Help", "Start", "Stop", "Play", "Add")
PLACEHOLDERS = ("name", "email", "search", "city", "note", "code", "phone", "title")
ITEMS = ("milk", "eggs", "tea", "rice", "jam", "bread", "fish", "cake", "soup", "salt", "corn", "figs")
# action -> what the note in the picture says, and what the action does (for the spec and the docs)
ACTIONS = {"joke": "shows a joke", "count": "counts clicks", "clear": "clears the input", "hide": "hides the image"}
_NEEDS = {"clear": "input", "hide": "image"}  # what an action acts on, where it is not the button itself
TYPES = {"header": "h1", "button": "button", "input": "input", "image": "img", "list": "ul"}
JOKES = ("I would tell a UDP joke, but you might not get it.", "There are 10 kinds of people.",
         "A SQL query walks into a bar and joins two tables.")

HEAD = f"""<meta charset="utf-8"><style>
body{{margin:0;font:28px sans-serif}}
main{{display:grid;grid-template:repeat({ROWS},1fr)/repeat({COLS},1fr);gap:{GAP}px;padding:{PAD}px;
width:{VIEWPORT}px;height:{VIEWPORT}px;box-sizing:border-box}}
main>*{{margin:0;min-width:0;min-height:0;width:100%;height:100%;box-sizing:border-box;overflow:hidden}}
h1{{font-size:40px;text-align:center}} button,input{{font:inherit}} ul{{padding-left:40px}}
img{{border:2px solid #333;background:linear-gradient(to top right,#fff 49%,#333 50%,#fff 51%),
linear-gradient(to bottom right,#fff 49%,#333 50%,#fff 51%);background-blend-mode:darken}}
output{{position:fixed;left:0;bottom:0}}
</style><script>
addEventListener("click", (e) => {{
  const b = e.target.closest("[data-action]"); if (!b) return;
  const out = document.querySelector("output") || document.body.appendChild(document.createElement("output"));
  const act = b.dataset.action;
  if (act === "joke") out.textContent = {json.dumps(list(JOKES))}[Math.floor(Math.random() * {len(JOKES)})];
  if (act === "count") out.textContent = String(Number(out.textContent || 0) + 1);
  if (act === "clear") document.querySelectorAll("input").forEach((i) => {{ i.value = ""; }});
  if (act === "hide") document.querySelectorAll("img").forEach((i) => {{ i.style.visibility = "hidden"; }});
}});
</script>"""


@dataclass(frozen=True)
class Element:
    """One element: its type (a key of TYPES), its text (title, label, placeholder, list items joined by ', ', or
    '' for an image), its grid cell (row and col from 1) and how many columns it spans, and a button's action."""
    type: str
    text: str
    row: int
    col: int
    span: int = 1
    action: str | None = None

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the element's grid area as a share of the page's width and height."""
        cw, rh = (VIEWPORT - 2 * PAD - (COLS - 1) * GAP) / COLS, (VIEWPORT - 2 * PAD - (ROWS - 1) * GAP) / ROWS
        x0, y0 = PAD + (self.col - 1) * (cw + GAP), PAD + (self.row - 1) * (rh + GAP)
        x1, y1 = x0 + self.span * cw + (self.span - 1) * GAP, y0 + rh
        return tuple(round(v / VIEWPORT, 4) for v in (x0, y0, x1, y1))

    def html(self) -> str:
        """The element's tag in the canonical page."""
        tag = TYPES[self.type]
        attrs = f' style="grid-area:{self.row}/{self.col}/{self.row + 1}/{self.col + self.span}"'
        if self.type == "input":
            return f'<input{attrs} placeholder="{self.text}">'
        if self.type == "image":
            return f"<img{attrs}>"
        if self.action:
            attrs += f' data-action="{self.action}"'
        inner = "".join(f"<li>{t}</li>" for t in self.text.split(", ")) if self.type == "list" else self.text
        return f"<{tag}{attrs}>{inner}</{tag}>"


@dataclass(frozen=True)
class Mockup:
    """A page to sketch: its elements in reading order (row, then column), and where it comes from."""
    elements: tuple[Element, ...]
    seed: int
    split: str
    index: int

    @property
    def id(self) -> str:
        """Content hash; names the picture."""
        key = repr((self.seed, self.split, self.index, self.elements))
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    def html(self) -> str:
        """The canonical page the mockup asks for: <main> and its elements, which HEAD styles and animates."""
        return "<main>" + "".join(e.html() for e in self.elements) + "</main>"

    def spec(self) -> dict:
        """The ground truth an evaluator checks a page against: every element with its page box."""
        return {"elements": [{**asdict(e), "box": list(e.box)} for e in self.elements]}


def held_out(html: str) -> bool:
    """Whether a page belongs to evaluation only: a tenth of all pages, by hash, are never trained on."""
    return int(hashlib.sha1(html.encode()).hexdigest()[:8], 16) % 10 == 0


def mockup(seed: int, split: str, index: int) -> Mockup:
    """The mockup at (seed, split, index). A training mockup's page is never held_out; any other split's always is,
    so a model is judged on pages it has not seen written."""
    rng = item_rng(seed, "mockup", split, index)
    while True:
        elements = _elements(rng)
        if held_out(Mockup(elements, seed, split, index).html()) != (split == "train"):
            return Mockup(elements, seed, split, index)


def _elements(rng: np.random.Generator) -> tuple[Element, ...]:
    """A header, then 2-5 more elements in rows 2..ROWS.

    Each row below the header holds nothing, one element across it or one element in each cell (or in one of them);
    types repeat only as buttons, since an input, an image and a list are what a button's action needs to be
    unambiguous. An action that needs an input or an image is only given when the page has one.
    """
    n = int(rng.integers(2, 6))  # elements below the header
    slots = []  # (row, col, span)
    while len(slots) < n:
        slots = []
        for row in range(2, ROWS + 1):
            layout = pick(rng, ("empty", "wide", "pair", "left", "right"))
            slots += {"empty": [], "wide": [(row, 1, COLS)], "pair": [(row, c, 1) for c in range(1, COLS + 1)],
                      "left": [(row, 1, 1)], "right": [(row, COLS, 1)]}[layout]
    slots = [slots[i] for i in sorted(rng.permutation(len(slots))[:n])]
    singles = [t for t in ("input", "image", "list") if rng.random() < 0.6]
    types = [singles[i] if i < len(singles) else "button" for i in range(n)]
    types = [types[i] for i in rng.permutation(n)]
    elements = [Element("header", pick(rng, TITLES), 1, 1, COLS)]
    labels = list(rng.permutation(len(LABELS)))
    for t, (row, col, span) in zip(types, slots):
        if t == "button":
            usable = [a for a in ACTIONS if _NEEDS.get(a, "button") in types]
            action = pick(rng, usable) if rng.random() < 0.5 else None
            elements.append(Element(t, LABELS[labels.pop()], row, col, span, action))
        elif t == "input":
            elements.append(Element(t, pick(rng, PLACEHOLDERS), row, col, span))
        elif t == "image":
            elements.append(Element(t, "", row, col, span))
        else:
            items = [ITEMS[i] for i in rng.permutation(len(ITEMS))[:2]]
            elements.append(Element(t, ", ".join(items), row, col, span))
    return tuple(elements)




def _stroke(draw: ImageDraw.ImageDraw, rng: np.random.Generator, a, b, ink, wobble: float):
    """A pen stroke from a to b: a polyline whose inner points stray a little from the straight line."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    steps = max(2, int(np.hypot(*(b - a)) // 8))
    t = np.linspace(0, 1, steps + 1)[:, None]
    points = a + t * (b - a)
    points[1:-1] += rng.normal(0, wobble, (steps - 1, 2))
    draw.line([tuple(p) for p in points], fill=ink, width=1, joint="curve")


def _box(draw, rng, x0, y0, x1, y1, ink, wobble):
    """A hand-drawn rectangle: four strokes whose corners miss each other by a pixel or so."""
    c = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    for k in range(4):
        a, b = c[k], c[(k + 1) % 4]
        _stroke(draw, rng, np.add(a, rng.normal(0, wobble, 2)), np.add(b, rng.normal(0, wobble, 2)), ink, wobble)


def render_mockup(m: Mockup, size: int = 128) -> Image.Image:
    """The mockup sketched on paper as an RGB picture `size` pixels a side."""
    rng = item_rng(m.seed, "mockup_render", m.split, m.index)
    u = size / 128  # every length below is in pixels of a 128-pixel picture
    paper = tuple(int(v) for v in 246 + rng.integers(-6, 7, 3))
    ink = tuple(int(v) for v in rng.integers(20, 70, 3))
    red = (200, 30, 30)
    wobble = 0.5 * u
    img = Image.new("RGB", (size, size), paper)
    draw = ImageDraw.Draw(img)
    cw, rh = size / COLS, size / ROWS

    def text(x, y, s, px, fill=ink, bold=False, anchor="lm"):
        draw.text((x + rng.normal(0, 0.6 * u), y + rng.normal(0, 0.6 * u)), s, fill=fill,
                  font=font(max(6, round(px * u)), bold), anchor=anchor)

    for e in m.elements:
        # the cell, inset by 3 pixels, each side moved by up to 2 more: a sketch is never on the grid
        j = rng.uniform(-2, 2, 4) * u
        x0, y0 = (e.col - 1) * cw + 3 * u + j[0], (e.row - 1) * rh + 3 * u + j[1]
        x1, y1 = (e.col - 1 + e.span) * cw - 3 * u + j[2], e.row * rh - 3 * u + j[3]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if e.type == "header":
            _stroke(draw, rng, (x0, y1), (x1, y1), ink, wobble)
            text(cx, cy, e.text, 16, bold=True, anchor="mm")
        elif e.type == "button":
            if e.action:  # the button takes the top of its cell, the note the bottom
                y1 = y0 + 17 * u
                text(cx, y1 + 7 * u, "\u2191 " + e.action, 10, fill=red, anchor="mm")
            _box(draw, rng, x0 + 2 * u, y0, x1 - 2 * u, y1, ink, wobble)
            text(cx, (y0 + y1) / 2, e.text, 12, bold=True, anchor="mm")
        elif e.type == "input":
            _box(draw, rng, x0, y0 + 4 * u, x1, y1 - 4 * u, ink, wobble)
            text(x0 + 4 * u, cy, e.text, 11, fill=(130, 130, 130))
        elif e.type == "image":
            _box(draw, rng, x0, y0, x1, y1, ink, wobble)
            _stroke(draw, rng, (x0, y0), (x1, y1), ink, wobble)
            _stroke(draw, rng, (x0, y1), (x1, y0), ink, wobble)
        else:
            for k, item in enumerate(e.text.split(", ")):
                y = y0 + (7 + 13 * k) * u
                draw.ellipse((x0 + 2 * u, y - 1.5 * u, x0 + 5 * u, y + 1.5 * u), fill=ink)
                text(x0 + 9 * u, y, item, 11)
    return img
