"""Judging pages written from mockups (kosmo.data.world.mockups) in headless Chromium.

A page is what the model writes, a <main> fragment; it is loaded inside the shared HEAD at the mockup world's
fixed viewport, with every network request refused. It is then checked against the mockup's spec:

    parses       Python's HTML parser finds it well formed (one <main>, every tag closed in order) and
                 Chromium's DOM has the <main>
    present      each spec element has a child of <main> of its type and text (tag h1/button/input/img/ul; a
                 title or label, an input's placeholder, a list's items joined by ', ')
    iou          the overlap of each element's box in the page with its spec box, both as shares of the page,
                 a missing element counting 0; a page's iou is the mean over its elements
    buttons      a button the mockup annotates with an action does it when clicked (the DOM effect in _EFFECTS)

A page is `ok` when it parses with every element present. Several elements of one type and text are matched
to the page's in the order that gives each its best overlap in turn. Elements beyond the spec's are counted
(`extra`), not penalised.
"""
from __future__ import annotations

import io
import shutil
from html.parser import HTMLParser
from pathlib import Path

import torch
from PIL import Image

from kosmo.data import chat
from kosmo.data.images import open_image
from kosmo.data.world.mockups import ACTIONS, HEAD, JOKES, TYPES, VIEWPORT
from kosmo.errors import KosmoError
from kosmo.eval.vision import complete, records, resolve

SHOTS = 8  # pictures of mockup beside page that --screenshots writes
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
_TAG_TYPES = {tag: kind for kind, tag in TYPES.items()}
# Every child of <main> as the evaluator sees it: type (by tag), text, box as shares of the page of `size` pixels.
_READ = """(size) => Array.from(document.querySelectorAll("main > *"), (e) => {
  const r = e.getBoundingClientRect(), tag = e.tagName.toLowerCase();
  const text = tag === "input" ? e.placeholder : tag === "img" ? ""
    : tag === "ul" ? Array.from(e.children, (li) => li.textContent.trim()).join(", ") : e.textContent.trim();
  return {tag, text, box: [r.left, r.top, r.right, r.bottom].map((v) => v / size)};
})"""
# The check of each action after the click (two clicks for count), given the jokes; `clear` first types into
# every input.
_EFFECTS = {
    "joke": "(jokes) => jokes.includes(document.querySelector('output')?.textContent)",
    "count": "() => document.querySelector('output')?.textContent === '2'",
    "clear": "() => { const i = document.querySelectorAll('input'); "
             "return i.length > 0 && Array.from(i).every((x) => x.value === ''); }",
    "hide": "() => { const i = document.querySelectorAll('img'); return i.length > 0 && Array.from(i).every("
            "(x) => getComputedStyle(x).visibility === 'hidden' || x.getClientRects().length === 0); }",
}
assert set(_EFFECTS) == set(ACTIONS)


class _WellFormed(HTMLParser):
    """Records the first reason a fragment is not one well-formed <main> element."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.error: str | None = None
        self.closed = False  # the <main> is closed; nothing may follow it

    def _fail(self, why: str):
        self.error = self.error or why

    def handle_starttag(self, tag, attrs):
        if self.closed or (not self.stack and tag != "main"):
            self._fail(f"<{tag}> outside <main>")
        elif tag not in _VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        if self.closed or not self.stack:
            self._fail(f"<{tag}/> outside <main>")

    def handle_endtag(self, tag):
        if tag in _VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self._fail(f"</{tag}> before </{self.stack[-1]}>" if self.stack else f"</{tag}> closes nothing")
            return
        self.stack.pop()
        self.closed = not self.stack

    def handle_data(self, data):
        if data.strip() and not self.stack:
            self._fail("text outside <main>")


def parse_error(page: str) -> str | None:
    """Why `page` is not one well-formed <main> fragment, or None if it is."""
    p = _WellFormed()
    p.feed(page)
    p.close()
    if p.error is None and not p.closed:
        p._fail(f"<{p.stack[-1]}> is never closed" if p.stack else "no <main>")
    return p.error


def document(page: str) -> str:
    """The page inside the shared head, as the browser loads it."""
    return f"<!doctype html><html><head>{HEAD}</head><body>{page}</body></html>"


def iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(expected: list[dict], found: list[dict]) -> list[int | None]:
    """For each spec element, the index of the page element of its type and text with the best overlap among
    those not taken by an earlier one, or None."""
    taken: set[int] = set()
    out = []
    for e in expected:
        same = [i for i, f in enumerate(found) if i not in taken and _TAG_TYPES.get(f["tag"]) == e["type"]
                and f["text"] == e["text"]]
        best = max(same, key=lambda i: iou(found[i]["box"], e["box"]), default=None)
        if best is not None:
            taken.add(best)
        out.append(best)
    return out


class Browser:
    """One headless Chromium for many pages: `check` scores a page against a spec, `screenshot` pictures it."""

    def __init__(self):
        executable = shutil.which("chromium")
        if executable is None:
            raise KosmoError("eval html needs Debian's chromium: `apt-get install chromium` (make test does)")
        from playwright.sync_api import sync_playwright
        self._pw = sync_playwright().start()
        try:
            self._browser = self._pw.chromium.launch(executable_path=executable)
            self._context = self._browser.new_context(viewport={"width": VIEWPORT, "height": VIEWPORT})
            self._context.route("**/*", lambda route: route.abort())  # a page fetches nothing
            self._context.set_default_timeout(5000)
            self.page = self._context.new_page()
        except Exception:
            self._pw.stop()
            raise

    def close(self):
        self._browser.close()
        self._pw.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def load(self, page: str):
        self.page.set_content(document(page))

    def check(self, page: str, spec: dict) -> dict:
        """The page's scores against the spec (see the module docstring)."""
        from playwright.sync_api import Error
        expected = spec["elements"]
        why = parse_error(page)
        try:
            self.load(page)
            has_main = self.page.evaluate("() => document.querySelector('main') !== null")
            found = self.page.evaluate(_READ, VIEWPORT)
        except Error as e:  # a page that never finishes loading renders nothing; the next gets a fresh tab
            why = why or f"Chromium: {str(e).splitlines()[0]}"
            has_main, found = False, []
            self.page.close()
            self.page = self._context.new_page()
        matched = match(expected, found)
        ious = [iou(found[i]["box"], e["box"]) if i is not None else 0.0 for e, i in zip(expected, matched)]
        buttons = []
        for e, i in zip(expected, matched):
            if not e.get("action"):
                continue
            works = False
            if i is not None:
                try:
                    self.load(page)  # each action from a fresh page
                    if e["action"] == "clear":
                        for field in self.page.locator("input").all():
                            field.fill("typed")
                    target = self.page.locator("main > *").nth(i)
                    for _ in range(2 if e["action"] == "count" else 1):
                        target.click(timeout=1000)
                    works = bool(self.page.evaluate(_EFFECTS[e["action"]], list(JOKES)))
                except Error:  # hidden, covered or detached: the button does not work
                    works = False
            buttons.append(works)
        parses = why is None and has_main
        present = [i is not None for i in matched]
        return {"parses": parses, "parse_error": why or (None if has_main else "no <main> in the DOM"),
                "ok": parses and all(present), "present": sum(present), "elements": len(expected),
                "missing": [e["type"] + (f" {e['text']!r}" if e["text"] else "") for e, p in zip(expected, present) if not p],
                "extra": len(found) - sum(present), "iou": sum(ious) / len(ious),
                "buttons": buttons}

    def screenshot(self, page: str) -> Image.Image:
        self.load(page)
        return Image.open(io.BytesIO(self.page.screenshot())).convert("RGB")


def side_by_side(mockup: Image.Image, page: Image.Image) -> Image.Image:
    """The mockup, scaled to the page's height, beside the page."""
    h = page.height
    left = mockup.convert("RGB").resize((h * mockup.width // mockup.height, h), Image.LANCZOS)
    out = Image.new("RGB", (left.width + 8 + page.width, h), (255, 255, 255))
    out.paste(left, (0, 0))
    out.paste(page, (left.width + 8, 0))
    return out


def _summary(results: list[dict]) -> dict:
    n = len(results)
    buttons = [b for r in results for b in r["buttons"]]
    return {"ok": round(100 * sum(r["ok"] for r in results) / n, 2),
            "parses": round(100 * sum(r["parses"] for r in results) / n, 2),
            "mean_iou": round(sum(r["iou"] for r in results) / n, 4),
            "buttons_working": round(100 * sum(buttons) / len(buttons), 2) if buttons else None,
            "buttons": len(buttons), "n": n}


def score(items: list[dict], pages: list[str], browser: Browser, shots: Path | None = None,
          base: Path | None = None) -> dict:
    """The summary of `pages` judged against their `items` (val_mockups lines), and per item its scores. With
    `shots`, the first SHOTS items' mockups (image paths relative to `base`) beside their pages go there as PNG."""
    results = []
    for k, (item, page) in enumerate(zip(items, pages)):
        results.append(browser.check(page, item["spec"]))
        if shots is not None and k < SHOTS:
            shots.mkdir(parents=True, exist_ok=True)
            side_by_side(open_image(base / item["image"]), browser.screenshot(page)).save(shots / f"page-{k}.png")
    return {**_summary(results),
            "items": [{"page": p, **{k: v for k, v in r.items() if k != "elements"}} for p, r in zip(pages, results)]}


def read_items(path: Path, limit: int | None = None) -> list[dict]:
    """val_mockups lines, each checked to hold what the evaluation needs."""
    items = []
    for where, obj in records(path)[:limit]:
        elements = obj.get("spec", {}).get("elements") if isinstance(obj.get("spec"), dict) else None
        if not isinstance(elements, list) or not elements:
            raise KosmoError(f"{where}: a mockup line needs 'spec' with a non-empty 'elements' list")
        for k, e in enumerate(elements):
            ok = (isinstance(e, dict) and e.get("type") in TYPES and isinstance(e.get("text"), str)
                  and isinstance(e.get("box"), list) and len(e["box"]) == 4 and e.get("action") in (None, *ACTIONS))
            if not ok:
                raise KosmoError(f"{where}: spec element {k} needs 'type' (one of {', '.join(TYPES)}), 'text', "
                                 f"a 4-number 'box' and an 'action' of None or one of {', '.join(ACTIONS)}")
        if not isinstance(obj.get("image"), str) or not isinstance(obj.get("messages"), list):
            raise KosmoError(f"{where}: a mockup line needs 'image' and 'messages' (the user turn)")
        items.append(obj)
    if not items:
        raise KosmoError(f"{path}: no mockups to judge")
    return items


def read_pages(path: Path, n: int) -> list[str]:
    """The 'html' of the first n lines of a JSONL file, line i the page for mockup i."""
    pages = []
    for where, obj in records(path)[:n]:
        if not isinstance(obj.get("html"), str):
            raise KosmoError(f"{where}: a page line needs 'html' as a string")
        pages.append(obj["html"])
    if len(pages) < n:
        raise KosmoError(f"{path}: {len(pages)} pages for {n} mockups")
    return pages


def evaluate_pages(data, pages, limit: int | None = None, shots: str | None = None) -> dict:
    """Judge a file of pages (lines {"html"}) against the mockups of `data`; val_mockups.jsonl itself, whose
    lines hold the canonical pages, is the oracle."""
    data = Path(data)
    items = read_items(data, limit)
    with Browser() as browser:
        return score(items, read_pages(Path(pages), len(items)), browser, Path(shots) if shots else None,
                     data.parent)


@torch.no_grad()
def evaluate_run(model, tok, data, limit: int | None = None, blind: bool = True, shots: str | None = None,
                 batch_size: int = 16, image_mode: str = "crop") -> dict:
    """Greedy pages from the model for each mockup of `data`, judged; beside them under "blind" the scores of
    its pages written without the picture. Pages may run to 1.5 times the longest canonical one, as far as the
    model's context allows."""
    data = Path(data)
    items = read_items(data, limit)
    if not model.image_size:
        raise KosmoError("eval html needs a model that sees pictures; this run is text-only")
    prompts, images = [], []
    for item, (where, _) in zip(items, records(data)):
        r = chat.render(item["messages"], tok, model.tokens_per_image, add_generation_prompt=True, where=where)
        prompts.append(r.ids)
        images.append([resolve(data, i, where) for i in r.images])
    longest = max((len(tok.encode(item["html"])) for item in items if isinstance(item.get("html"), str)),
                  default=256)
    budget = min(int(1.5 * longest) + 8, model.context_length - max(len(p) for p in prompts))
    if budget < 1:
        raise KosmoError(f"{data}: the prompts fill the model's context of {model.context_length} tokens")
    with Browser() as browser:
        pages = complete(model, tok, prompts, images, False, budget, batch_size, image_mode)
        result = score(items, pages, browser, Path(shots) if shots else None, data.parent)
        if blind:
            blind_pages = complete(model, tok, prompts, images, True, budget, batch_size, image_mode)
            result["blind"] = {k: v for k, v in score(items, blind_pages, browser).items() if k not in ("items", "n")}
    return result
