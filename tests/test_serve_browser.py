"""The web playground in headless Chromium: type a message, attach an image, see the answer stream in."""

import shutil

import openai
import pytest
from serve_helpers import Server, build_runs, data_url, png_bytes

CHROMIUM = shutil.which("chromium")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")
def test_playground_streams_an_answer_about_an_attached_image(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    picture = tmp_path / "red.png"
    picture.write_bytes(png_bytes())
    server = Server(build_runs(tmp_path / "runs")["mllm"])
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page()
            page.goto(server.url + "/")
            expect(page.locator("#model")).to_have_text("mllm")
            page.fill("#system", "You answer briefly.")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "12")
            page.set_input_files("#image", str(picture))
            expect(page.locator("#preview img")).to_have_count(1)
            page.fill("#message", "what colour is the square?")
            # count the changes to the answer's text: a streamed answer arrives in several pieces
            page.evaluate("""() => { window.pieces = 0; new MutationObserver((records) => {
                window.pieces += records.filter((r) => r.target.matches('.assistant span')).length;
            }).observe(document.getElementById('transcript'), {subtree: true, childList: true}); }""")
            page.click("#send")
            expect(page.locator("#send")).to_be_enabled()
            answer = page.locator(".msg.assistant span").inner_text()
            pieces = page.evaluate("window.pieces")
            browser.close()
        expected = openai.OpenAI(base_url=server.url + "/v1", api_key="none").chat.completions.create(
            model="mllm", max_tokens=12, temperature=0, messages=[
                {"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": [{"type": "text", "text": "what colour is the square?"},
                                             {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]}])
        assert answer == expected.choices[0].message.content.strip() != ""
        assert pieces > 1
    finally:
        server.close()
