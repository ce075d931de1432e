"""`kosmo demo`: the seed's story on the shapes world, end to end, with a report.

The orchestrator writes the world and trains the tokenizer that every section shares, then runs the
sections in order; each section trains its models with `kosmo train` stages, evaluates them and adds
its part of OUT/report.json and OUT/report.md. A section module has `BUDGETS` (the knobs of each of
BUDGET_NAMES), `run(demo, b) -> dict` and `render(section_report) -> list[str]` (markdown lines).

A section may also have `prepare(demo, b) -> dict`: its stages that need no other section's model (the
CTC encoder, the image tokenizer, the copying LM), which `run` takes from `demo.ahead`. On a CPU with
two or more threads they train in a second process beside the vision section, each process with half
the threads: a second thread speeds these small models up by well under twice (docs/performance.md), so
the two lanes finish sooner than the same stages one after another with every thread.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kosmo import checkpoint, hardware
from kosmo.data.world import World, write_world
from kosmo.errors import KosmoError

SECTIONS = ("vision", "audio", "draw", "flamingo", "align")

# "default" is the shortest budget measured to bring every section's headline clearly above its baseline
# (14 to 15 minutes on 2 CPU cores, docs/performance.md); "full" is the longer recipe whose figures the docs
# give; "quick" is the tests' smoke run.
BUDGET_NAMES = ("default", "full", "quick")

# Knobs every section shares.
BUDGETS = {
    "default": dict(n=2000, image_size=36, vocab=2048, eval_n=200),
    "full": dict(n=2000, image_size=36, vocab=2048, eval_n=200),
    "quick": dict(n=200, image_size=36, vocab=1024, eval_n=20),
}


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Demo:
    """What sections share: the output folder, the world's files, the run folders and the report."""
    out: Path
    world: World
    data: dict[str, Path] = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    prepared: dict[str, dict] = field(default_factory=dict)  # section -> what its `prepare` returned

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    def ahead(self, name: str, b: dict) -> dict:
        """What section `name`'s `prepare` returned: trained beside the vision section, or now."""
        if name not in self.prepared:
            self.prepared[name] = section(name).prepare(self, b)
        return self.prepared[name]

    def timed(self, name: str, fn):
        t0 = time.time()
        result = fn()
        self.report["timings_s"][name] = round(time.time() - t0, 1)
        return result

    # Training picks its precision by the hardware (train.precision=auto); the evaluations, which
    # run on the CPU, take the CPU's choice: models loaded by `load`, run under `evaluating()`.
    @staticmethod
    def evaluating():
        return hardware.autocast(torch.device("cpu"), "auto")

    def load(self, name: str):
        """runs/NAME to evaluate: (model, tokenizer), with bf16 weights where the CPU evaluates in bf16."""
        from kosmo.model.load import load_run
        model, tok, _ = load_run(self.runs / name, precision="auto")
        return model, tok

    def train(self, stage: str, name: str, data: list, overrides: list[str], init: str | None = None) -> dict:
        """`kosmo train STAGE` into runs/NAME with the shared tokenizer; the first override sets max_steps."""
        from kosmo.train.run import run_stage
        log(f"\n== {name}: kosmo train {stage} ==")
        common = ["train.tensorboard=false", f"train.eval_every={max(10, int(overrides[0].split('=')[1]) // 4)}"]
        return self.timed(name, lambda: run_stage(stage, data, self.runs / name,
                                                  init=self.runs / init if init else None,
                                                  tokenizer=self.data_dir / "tokenizer.json",
                                                  overrides=overrides + common))


def section(name: str):
    return importlib.import_module(f"kosmo.demo.{name}")


def run_demo(out: str | Path, budget: str = "default", recipe: dict | None = None,
             sections: tuple[str, ...] = SECTIONS) -> dict:
    """Runs `sections` in order by one of BUDGET_NAMES; `recipe` overrides any knob, shared or a section's."""
    from kosmo.data.jsonl import iter_texts
    from kosmo.tokenizer import Tokenizer
    b = dict(BUDGETS[budget])
    for name in sections:
        b.update(section(name).BUDGETS[budget])
    b.update(checked_recipe(recipe or {}, b))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    where = {**hardware.describe(hardware.pick_device("auto"), "auto"),
             "eval_precision": hardware.resolve_precision("auto", torch.device("cpu"))}
    demo = Demo(out, World(image_size=b["image_size"]),
                report={"budget": budget, "recipe": b, "sections": list(sections), "hardware": where,
                        "timings_s": {}})
    log(f"== {where['device']} ({where['device_name']}, {where['cpu_capability']}): "
        f"training in {where['precision']}, evaluating in {where['eval_precision']} ==")
    log("== shapes world ==")
    demo.data = demo.timed("world", lambda: write_world(demo.data_dir, b["n"], image_size=b["image_size"]))
    for name in sections:
        demo.data.update(section(name).write_data(demo, b) if hasattr(section(name), "write_data") else {})
    log("== tokenizer ==")
    texts = [demo.data[k] for k in ("text", "captions", "chat", "vqa_all") if k in demo.data]
    demo.timed("tokenizer", lambda: Tokenizer.train(iter_texts(texts), b["vocab"]).save(demo.data_dir))
    ahead = [name for name in sections if hasattr(section(name), "prepare")]
    if "vision" in sections and ahead and where["device"] == "cpu" and torch.get_num_threads() > 1:
        demo.report["vision"] = beside_vision(demo, b, ahead)
    for name in sections:
        if name not in demo.report:
            demo.report[name] = section(name).run(demo, b)
    demo.report["timings_s"]["total"] = round(time.time() - t_start, 1)
    checkpoint.write_json(out / "report.json", demo.report)
    (out / "report.md").write_text(render_markdown(demo.report))
    print((out / "report.md").read_text())
    return demo.report


def beside_vision(demo: Demo, b: dict, names: list[str]) -> dict:
    """The vision section here and the `prepare` stages of `names` in a second process, the threads split
    between the two; returns the vision section's report. The second process logs to OUT/beside.log."""
    threads = torch.get_num_threads()
    side = threads // 2
    log(f"== beside the vision section, {side} of {threads} threads: {', '.join(names)}'s first stages "
        f"(log: {demo.out / 'beside.log'}) ==")
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no fork of this one's thread pools
    receive, send = spawn.Pipe(duplex=False)
    lane = spawn.Process(target=_prepare, args=(send, demo.out, b, demo.data, demo.report["sections"], names, side),
                         daemon=True)
    lane.start()
    send.close()
    torch.set_num_threads(threads - side)
    try:
        report = section("vision").run(demo, b)
        try:
            outcome = receive.recv()
        except EOFError:
            raise KosmoError(f"the stages beside the vision section stopped; see {demo.out / 'beside.log'}") from None
    finally:
        torch.set_num_threads(threads)
        lane.terminate()  # an error here does not wait for the other lane to finish
        lane.join()
    if isinstance(outcome, KosmoError):
        raise outcome
    demo.prepared, timings = outcome
    demo.report["timings_s"].update(timings)
    return report


def _prepare(send, out: Path, b: dict, data: dict, sections: list[str], names: list[str], threads: int):
    """The second process of `beside_vision`: sends (section -> what its `prepare` returned, their stages'
    times), or the KosmoError that stopped them."""
    torch.set_num_threads(threads)
    # the log takes the process's stderr itself, so that native libraries' messages go there too
    os.dup2(os.open(out / "beside.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), sys.stderr.fileno())
    demo = Demo(out, World(image_size=b["image_size"]), data=data, report={"sections": sections, "timings_s": {}})
    try:
        send.send(({name: section(name).prepare(demo, b) for name in names}, demo.report["timings_s"]))
    except KosmoError as e:
        log(f"kosmo: error: {e}")
        send.send(e)


def checked_recipe(recipe: dict, knobs: dict) -> dict:
    """`recipe` (knob -> value, as `kosmo demo KNOB=VALUE` parses them) checked against the budget's knobs:
    each must exist in the sections being run and keep its kind."""
    out = {}
    for key, value in recipe.items():
        if key not in knobs:
            raise KosmoError(f"demo knob {key!r} is not one of the sections' knobs ({', '.join(sorted(knobs))})")
        default = knobs[key]
        if isinstance(default, tuple) and isinstance(value, list | tuple):
            value = tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            kind = {int: "a whole number", float: "a number", bool: "true or false", tuple: "a list"}.get(
                type(default), "a word")
            raise KosmoError(f"demo knob {key}={value!r}: expected {kind}, like {default!r}")
        out[key] = value
    return out


def _where(h: dict) -> str:
    features = ", ".join(h["cpu_bf16"]) or "no native bf16"
    return (f"Measured on {h['device']} ({h['device_name']}; CPU kernels {h['cpu_capability']}, {features}): "
            f"training in {h['precision']}, evaluation in {h['eval_precision']}.")


def render_markdown(r: dict) -> str:
    lines = ["# kosmo demo report", "",
             f"Budget `{r['budget']}`, {r['timings_s']['total']} s in all. Every number was measured by this run of "
             "`kosmo demo`; `report.json` holds them all.", "", _where(r["hardware"]), ""]
    for name in r["sections"]:
        lines += section(name).render(r[name]) + [""]
    lines += ["## Time per stage (s)", "", " · ".join(f"{k} {v}" for k, v in r["timings_s"].items())]
    return "\n".join(lines) + "\n"
