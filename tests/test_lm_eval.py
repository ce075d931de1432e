"""lm-evaluation-harness against `kosmo serve`: its `local-completions` model with the remote tokenizer scores the
shapes_qa task to the accuracy and log-likelihoods kosmo's own scorer gives in process; and the endpoints it uses,
token-id prompts with echo and logprobs, max_tokens 0 and 1, /tokenize and /detokenize, and their errors."""

import json

import pytest
import torch
from fastapi.testclient import TestClient
from serve_helpers import Server, build_runs

from kosmo.cli import main
from kosmo.data.world import World
from kosmo.eval.choice import choice_accuracy, choice_loglikelihoods, read_items, write_lm_eval_task
from kosmo.model.load import load_run
from kosmo.serve.api import create_app
from kosmo.serve.engine import Engine
from kosmo.tokenizer import BOS, EOS, IMAGE_PAD

N_ITEMS = 24


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return build_runs(tmp_path_factory.mktemp("lm-eval-runs"))["lm"]


@pytest.fixture(scope="module")
def loaded(run):
    model, tok, _ = load_run(run, torch.device("cpu"), "fp32")
    return model.eval(), tok


@pytest.fixture(scope="module")
def client(loaded):
    model, tok = loaded
    engine = Engine(model, tok, max_batch=4, precision="fp32").start()
    yield TestClient(create_app(engine, tok, "lm"))
    engine.stop()


@torch.no_grad()
def prompt_logprobs(model, ids):
    """log p(token t | tokens before it) for t >= 1, from the model's own forward."""
    logp = model(torch.tensor([ids])).float().log_softmax(-1)[0]
    return logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def complete(client, **body):
    r = client.post("/v1/completions", json={"model": "lm", "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_lm_eval_through_the_server_equals_kosmos_scorer(run, loaded, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    paths = write_lm_eval_task(World(), tmp_path, N_ITEMS)
    model, tok = loaded
    items = read_items(paths["lm_eval_items"])
    server = Server(run, "--precision", "fp32")
    try:
        out = simple_evaluate(model="local-completions", tasks=["shapes_qa"], log_samples=True,
                              model_args=f"base_url={server.url}/v1/completions,tokenizer_backend=remote,"
                                         f"max_length={model.context_length},batch_size=8,model=lm",
                              task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    finally:
        server.close()
    ours = choice_accuracy(model, tok, items)
    assert ours["n"] == N_ITEMS and round(100 * out["results"]["shapes_qa"]["acc,none"], 2) == ours["acc"]
    samples = sorted(out["samples"]["shapes_qa"], key=lambda s: s["doc_id"])
    theirs = [ll for s in samples for ll, _ in s["filtered_resps"]]
    assert theirs == pytest.approx([ll for lls in choice_loglikelihoods(model, tok, items) for ll in lls], abs=1e-4)


def test_the_items_are_true_of_their_scenes(tmp_path):
    world = World()
    items = read_items(write_lm_eval_task(world, tmp_path, 12)["lm_eval_items"])
    for i, item in enumerate(items):
        scene = world.scene(i, "val")
        assert item["context"].startswith(world.captions(scene)[0])
        truth = {o.colour if i % 2 == 0 else o.shape for o in scene.objects}
        assert item["choices"][item["answer"]] in truth and len(item["choices"]) == (6 if i % 2 == 0 else 4)


def test_eval_choice_on_the_command_line(run, loaded, tmp_path, capsys):
    model, tok = loaded
    assert main(["world", "--out", str(tmp_path), "--n", "0", "--lm-eval", "10"]) == 0
    data = tmp_path / "lm_eval" / "shapes_qa.jsonl"
    capsys.readouterr()
    assert main(["eval", "choice", "--model", str(run), "--data", str(data), "--device", "cpu",
                 "--precision", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == choice_accuracy(model, tok, read_items(data))
    data.write_text('{"context": "A red circle.", "choices": ["red"], "answer": 1}\n')
    assert main(["eval", "choice", "--model", str(run), "--data", str(data), "--device", "cpu"]) == 2
    assert f"{data}:1: 'answer' must be the index of the right choice (0 to 0), got 1" in capsys.readouterr().err
    assert main(["world", "--out", str(tmp_path), "--lm-eval", "-1"]) == 2


def test_echo_scores_a_token_prompt_with_the_models_forward(client, loaded):
    model, tok = loaded
    ids = [BOS] + tok.encode("A small red circle in the centre.")
    choice = complete(client, prompt=ids, echo=True, logprobs=3, max_tokens=0)["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == tok.decode(ids) and choice["finish_reason"] == "length"
    assert lp["tokens"] == [tok.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(prompt_logprobs(model, ids), abs=1e-5)
    assert all(len(top) <= 3 and max(top.values()) >= got for top, got in zip(lp["top_logprobs"][1:],
                                                                              lp["token_logprobs"][1:]))
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids))]


def test_max_tokens_1_adds_the_greedy_token_after_the_scored_prompt(client, loaded):
    model, tok = loaded
    ids = [BOS] + tok.encode("Question: What colour is the square? Answer:")
    scored = complete(client, prompt=ids, echo=True, logprobs=1, max_tokens=0)["choices"][0]["logprobs"]
    choice = complete(client, prompt=ids, echo=True, logprobs=1, max_tokens=1)["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1
    assert lp["token_logprobs"][:-1] == pytest.approx(scored["token_logprobs"], abs=1e-6)
    plain = complete(client, prompt=ids, max_tokens=1)["choices"][0]
    assert choice["text"] == tok.decode(ids) + plain["text"]
    with torch.no_grad():
        assert lp["tokens"][-1] == tok.decode([int(model(torch.tensor([ids]))[0, -1].argmax())])
    # sampled, the token comes from the same stream of the same seed as in the engine, for each of the n samples
    kw = dict(prompt=ids, max_tokens=1, temperature=1.0, seed=7, n=4)
    echoed = [c["text"] for c in complete(client, echo=True, **kw)["choices"]]
    assert echoed == [tok.decode(ids) + c["text"] for c in complete(client, **kw)["choices"]]


def test_a_batch_of_prompts_scores_each_as_alone(client):
    prompts = [[BOS, 40, 41, 42, 43, 44], [BOS, 50], [BOS, 60, 61, 62]]
    alone = [complete(client, prompt=p, echo=True, logprobs=1, max_tokens=0)["choices"][0] for p in prompts]
    together = complete(client, prompt=prompts, echo=True, logprobs=1, max_tokens=0)
    assert [c["index"] for c in together["choices"]] == [0, 1, 2]
    assert together["usage"]["prompt_tokens"] == sum(map(len, prompts))
    for a, b in zip(alone, together["choices"]):
        assert b["logprobs"]["tokens"] == a["logprobs"]["tokens"]
        assert b["logprobs"]["token_logprobs"][1:] == pytest.approx(a["logprobs"]["token_logprobs"][1:], abs=1e-5)


def test_token_and_text_prompts_generate_alike(client, loaded):
    _, tok = loaded
    text = "There is a large blue square"
    by_text = complete(client, prompt=text, max_tokens=6)
    by_ids = complete(client, prompt=[[BOS] + tok.encode(text)], max_tokens=6)
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert complete(client, prompt=text, echo=True, max_tokens=0)["choices"][0] == {
        "index": 0, "text": text, "logprobs": None, "finish_reason": "length"}


def test_a_streamed_batch_numbers_its_choices_by_prompt(client):
    prompts = [[BOS, 40, 41], [BOS, 50, 51, 52]]
    whole = complete(client, prompt=prompts, max_tokens=4, n=2)["choices"]
    with client.stream("POST", "/v1/completions", json={"prompt": prompts, "max_tokens": 4, "n": 2,
                                                         "temperature": 0, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    texts = ["", "", "", ""]
    for e in events:
        for c in e["choices"]:
            texts[c["index"]] += c["text"]
    assert texts == [c["text"] for c in whole] and [c["index"] for c in whole] == [0, 1, 2, 3]


def test_tokenizer_endpoints_follow_vllm(client, loaded):
    _, tok = loaded
    info = client.get("/tokenizer_info").json()
    assert (info["bos_token"], info["eos_token"], info["model_max_length"]) == ("<s>", "</s>", 192)
    text = "A small red circle. Ünïcödé ok"
    tokens = client.post("/tokenize", json={"prompt": text}).json()
    assert tokens["tokens"] == [BOS] + tok.encode(text) and tokens["count"] == len(tokens["tokens"])
    plain = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert client.post("/detokenize", json={"tokens": plain}).json() == {"prompt": text}
    # lm-eval finds the special ids by tokenizing their strings
    assert client.post("/tokenize", json={"prompt": "</s>", "add_special_tokens": False}).json()["tokens"] == [EOS]
    assert client.post("/tokenize", json={"prompt": "<s>red", "add_special_tokens": False}).json()["tokens"] == \
        [BOS] + tok.encode("red")


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": [BOS, 300]}, 400, "token 300 is not in this model's vocabulary of 300"),
    ({"prompt": [[BOS, 40], [-1]]}, 400, "prompt[1][0]: token -1"),
    ({"prompt": []}, 400, "prompt: must not be empty"),
    ({"prompt": [[BOS], []]}, 400, "prompt[1]: must not be empty"),
    ({"prompt": [BOS, IMAGE_PAD]}, 400, "holds the place of image or audio embeddings"),
    ({"prompt": [BOS] * 193, "echo": True, "logprobs": 1, "max_tokens": 0}, 400, "context is 192"),
    ({"prompt": [BOS] * 192, "echo": True, "logprobs": 1, "max_tokens": 1}, 400, "this model's context is 192"),
    ({"prompt": [BOS, 40], "max_tokens": 0}, 400, "max_tokens 0 is for scoring the prompt, with echo"),
    ({"prompt": [BOS, 40], "echo": True, "stream": True}, 400, "echo is not served with stream"),
    ({"prompt": [BOS, "a"]}, 422, "prompt"),
    ({"prompt": [BOS, True]}, 422, "prompt"),
    ({"prompt": [BOS], "logprobs": 6}, 422, "logprobs"),
])
def test_bad_completions_are_openai_errors(client, body, status, message):
    r = client.post("/v1/completions", json={"max_tokens": 2, **body})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]


def test_bad_tokenizer_requests_are_openai_errors(client):
    r = client.post("/detokenize", json={"tokens": [BOS, 300]})
    assert r.status_code == 400 and "tokens[1]: token 300" in r.json()["error"]["message"]
    assert client.post("/detokenize", json={"tokens": ["a"]}).status_code == 422
    assert client.post("/tokenize", json={"text": "a"}).status_code == 400
    assert client.post("/tokenize", json={"prompt": "a", "model": "other"}).status_code == 404
