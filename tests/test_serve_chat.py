"""`kosmo chat` in a subprocess: answers stream to stdout, the commands work, bad input is one line on stderr."""

import subprocess
import sys

from serve_helpers import IMAGE_SIZE, build_runs, png_bytes

from kosmo.data.chat import render
from kosmo.data.images import load_image
from kosmo.generate import Sampling, generate
from kosmo.model.load import load_run


def reference(run, messages, images=None, max_tokens=10) -> str:
    """The same conversation through `generate`, the batch decode loop."""
    model, tok, _ = load_run(run)
    ids = render(messages, tok, model.cfg.tokens_per_image, add_generation_prompt=True).ids
    return generate(model, tok, [ids], Sampling(max_new_tokens=max_tokens), images=images)[0].text


def test_chat_session_with_image_system_prompt_and_reset(tmp_path):
    run = build_runs(tmp_path / "runs")["mllm"]
    picture = tmp_path / "red.png"
    picture.write_bytes(png_bytes())
    script = f"/system You answer briefly.\n/image {picture}\nwhat colour?\n/reset\n/image {tmp_path}/nope.png\nhello\n"
    proc = subprocess.run([sys.executable, "-m", "kosmo", "chat", "--model", str(run), "--max-tokens", "10",
                           "--device", "cpu"], input=script, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    system = [{"role": "system", "content": "You answer briefly."}]
    first = reference(run, system + [{"role": "user", "content": [
        {"type": "text", "text": "what colour?"}, {"type": "image", "image": str(picture)}]}],
        images=load_image(picture, IMAGE_SIZE)[None])
    # /reset keeps the system prompt and forgets the turns and the attached image
    second = reference(run, system + [{"role": "user", "content": "hello"}])
    assert proc.stdout == f"{first}\n{second}\n"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {tmp_path}/nope.png: image file not found"]
    assert "Traceback" not in proc.stderr
