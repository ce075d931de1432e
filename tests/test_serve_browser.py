"""The web playground in headless Chromium: type a message, attach an image, see the answer stream in; pick an
audio file or record from a (fake) microphone, and the clip reaches the model; draw pictures of a prompt."""

import base64
import shutil

import openai
import pytest
from serve_helpers import DRAWS, Server, build_runs, data_url, png_bytes, wav_bytes

from kosmo.data.audio import SAMPLE_RATE, decode_audio_bytes

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


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")
def test_playground_sends_a_picked_file_and_a_microphone_recording(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    clip = tmp_path / "question.wav"
    clip.write_bytes(wav_bytes(1.0))
    server = Server(build_runs(tmp_path / "runs")["hearing"], "--precision", "fp32")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    try:
        with sync_playwright() as p:
            # Chromium's fake microphone plays a beep, and its fake prompt grants access
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"])
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "8")
            sent = []
            page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)

            page.set_input_files("#audio", str(clip))
            expect(page.locator("#preview audio")).to_have_count(1)
            page.fill("#message", "what is this?")
            page.click("#send")
            expect(page.locator(".msg.assistant")).to_have_count(1)
            expect(page.locator("#send")).to_be_enabled()
            picked = page.locator(".msg.assistant span").text_content()  # as sent: a random model writes odd spaces

            page.click("#reset")
            page.click("#record")
            expect(page.locator("#record")).to_have_text("Stop")
            page.wait_for_timeout(1000)
            page.click("#record")
            expect(page.locator("#preview audio")).to_have_count(1)
            page.click("#send")  # the recording alone, no text
            expect(page.locator(".msg.assistant")).to_have_count(1)
            expect(page.locator("#send")).to_be_enabled()
            recorded = page.locator(".msg.assistant span").text_content()
            expect(page.locator(".msg.user audio")).to_have_count(1)
            assert page.locator(".error").count() == 0
            browser.close()

        # the picked file went byte for byte, and its answer is the API's own
        first = sent[0]["messages"][0]["content"]
        assert first[0] == {"type": "text", "text": "what is this?"}
        assert first[1]["type"] == "input_audio"
        assert base64.b64decode(first[1]["input_audio"]["data"]) == clip.read_bytes()
        # the recording is a WAV the server reads, about a second of the fake microphone's beeps
        spoken = sent[1]["messages"][0]["content"]
        assert [part["type"] for part in spoken] == ["input_audio"]
        samples = decode_audio_bytes(base64.b64decode(spoken[0]["input_audio"]["data"]))
        assert 0.5 < len(samples) / SAMPLE_RATE < 2.5 and samples.abs().max() > 0.05
        for messages, answer in ((sent[0]["messages"], picked), (sent[1]["messages"], recorded)):
            expected = client.chat.completions.create(model="hearing", max_tokens=8, temperature=0, messages=messages)
            assert answer == expected.choices[0].message.content != ""
    finally:
        server.close()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")
def test_playground_draws_the_pictures_the_api_draws_enlarged_with_square_pixels(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    server = Server(build_runs(tmp_path / "runs")["drawing"], "--precision", "fp32")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page()
            page.goto(server.url + "/")
            expect(page.locator("#image")).to_be_visible()
            page.select_option("#mode", "draw")
            expect(page.locator("#image")).to_be_hidden()  # chat's attachments make no sense here
            page.fill("#pictures", "3")
            page.fill("#guidance", "2")
            page.fill("#seed", "7")
            page.fill("#temperature", "1")
            sent = []
            page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/images/generations")
                    else None)
            page.fill("#message", "a red square")
            page.press("#message", "Enter")
            expect(page.locator(".msg.assistant img.drawn")).to_have_count(3)
            expect(page.locator("#send")).to_be_enabled()
            shown = page.locator(".msg.assistant img.drawn").evaluate_all("""(imgs) => imgs.map((img) => ({
                src: img.src, natural: img.naturalWidth, width: img.getBoundingClientRect().width,
                rendering: getComputedStyle(img).imageRendering}))""")
            assert page.locator(".error").count() == 0
            page.select_option("#mode", "chat")
            expect(page.locator("#image")).to_be_visible()
            browser.close()
        assert sent == [{"prompt": "a red square", "n": 3, "guidance_scale": 2, "temperature": 1,
                         "response_format": "b64_json", "seed": 7}]
        assert all(x["natural"] == DRAWS and x["width"] >= 8 * DRAWS and x["rendering"] == "pixelated"
                   for x in shown), shown
        expected = openai.OpenAI(base_url=server.url + "/v1", api_key="none").images.generate(
            prompt="a red square", n=3, extra_body={"guidance_scale": 2, "temperature": 1, "seed": 7})
        assert [x["src"] for x in shown] == ["data:image/png;base64," + d.b64_json for d in expected.data]
    finally:
        server.close()
