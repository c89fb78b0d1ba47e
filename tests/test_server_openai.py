"""The OpenAI fields clients rely on, through the `openai` client against a real server on the embedded
model: logprobs (against transformers, and against our own teacher-forced core model), penalties and
logit_bias (against a hand-run greedy loop with OpenAI's formula), and response_format (the output
parses and matches the schema, alone and in a shared batch)."""

import concurrent.futures
import json

import pytest
import torch
from oracle import hf_from_checkpoint, hf_logits, our_logits
from test_server import client, llm, running, wait_idle  # noqa: F401 (llm: the shared fixture)

from coreinfer.engine.generate import GenerationConfig
from coreinfer.engine.policy import CoreConfig
from coreinfer.engine.session import make_policy
from coreinfer.io.loading import load_checkpoint
from coreinfer.serving.app import create_app
from coreinfer.serving.server import Settings

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "city": {"type": "string", "enum": ["Paris", "London", "Rome"]}},
          "required": ["name", "age", "city"], "additionalProperties": False}


@pytest.fixture(scope="module")
def hf(llm):
    return hf_from_checkpoint(load_checkpoint(None, progress=False))


@pytest.fixture(scope="module")
def url(llm):
    with running(create_app(llm, Settings(queue_size=64, core=None))) as base:  # dense unless asked
        yield base


def alone(llm, messages, n: int, core: CoreConfig | None) -> list[int]:
    """The greedy token ids of the engine's own generate, for the reference forward."""
    gen = GenerationConfig(max_new_tokens=n)
    return llm.generate(messages, gen, core, chat=True)[0].token_ids


@pytest.mark.parametrize("core", [None, CoreConfig(beta=0.5)], ids=["dense", "core"])
def test_chat_logprobs_are_those_of_the_model_that_wrote_the_text(llm, hf, url, core):
    extra = {"dense": True} if core is None else {"beta": core.beta}
    out = client(url).chat.completions.create(model="coreinfer", messages=CHAT, temperature=0, max_tokens=8,
                                              logprobs=True, top_logprobs=3, extra_body=extra)
    content = out.choices[0].logprobs.content
    prompt, ids = llm.encode(CHAT, chat=True), alone(llm, CHAT, 8, core)
    n = len(ids)  # the end-of-turn token, if any, is not among them (nor among the logprobs)
    assert "".join(t.token for t in content) == out.choices[0].message.content and len(content) == n > 3
    if core is None:  # the dense model: transformers over the whole sequence
        ref = hf_logits(hf, prompt + ids)[len(prompt) - 1:-1].log_softmax(-1)
    else:  # the sparse model: our session teacher-forced on its core neurons
        policy = make_policy(llm.resolve(core), llm.model, llm.load_clusters)
        ref = our_logits(llm.model, [prompt], [ids], policy)[0][0][len(prompt) - 1:-1].float().log_softmax(-1)
    got = torch.tensor([t.logprob for t in content])
    want = ref[torch.arange(n), torch.tensor(ids)]
    print("max |logprob - reference|", float((got - want).abs().max()))
    assert torch.allclose(got, want, atol=2e-3)
    for t, row in zip(content, ref):
        top = row.topk(3)
        assert [a.token for a in t.top_logprobs] == [llm.tokenizer.hf.decode([i]) for i in top.indices.tolist()]
        assert torch.allclose(torch.tensor([a.logprob for a in t.top_logprobs]), top.values, atol=2e-3)
        assert t.bytes == list(t.token.encode()) and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-6)
    if core is not None:  # not the dense model's numbers
        dense = hf_logits(hf, prompt + ids)[len(prompt) - 1:-1].log_softmax(-1)[torch.arange(n), torch.tensor(ids)]
        assert float((got - dense).abs().max()) > 1e-2


def test_completion_logprobs_stream_and_zero(url):
    c = client(url)
    kw = dict(model="coreinfer", prompt="The capital of France is", temperature=0, max_tokens=6,
              extra_body={"ignore_eos": True})
    full = c.completions.create(logprobs=2, **kw)
    lp = full.choices[0].logprobs
    assert "".join(lp.tokens) == full.choices[0].text and len(lp.token_logprobs) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    assert all(len(d) == 2 and max(d.values()) == pytest.approx(p, abs=1e-6) for d, p in zip(lp.top_logprobs,
                                                                                            lp.token_logprobs))
    chunks = list(c.completions.create(logprobs=2, stream=True, **kw))
    streamed = [ch.choices[0].logprobs for ch in chunks if ch.choices[0].logprobs is not None]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [p for s in streamed for p in s.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset
    zero = c.completions.create(logprobs=0, **kw).choices[0].logprobs  # 0: the sampled tokens' only
    assert zero.tokens == lp.tokens and zero.top_logprobs == [{}] * 6
    assert c.completions.create(**kw).choices[0].logprobs is None


def greedy_by_hand(hf, prompt: list[int], n: int, presence: float, frequency: float, bias: dict) -> list[int]:
    """OpenAI's definition, one token at a time: mu[j] - c[j] * frequency - (c[j] > 0) * presence + bias[j]."""
    out = []
    for _ in range(n):
        mu = hf_logits(hf, prompt + out)[-1].tolist()
        scores = [m - out.count(j) * frequency - (out.count(j) > 0) * presence + bias.get(j, 0.0)
                  for j, m in enumerate(mu)]
        out.append(max(range(len(scores)), key=scores.__getitem__))
    return out


def test_logit_bias_stops_paris_and_penalties_match_the_definition(llm, hf, url):
    c = client(url)
    kw = dict(model="coreinfer", prompt="The capital of France is", temperature=0, max_tokens=6,
              extra_body={"ignore_eos": True})
    paris = llm.tokenizer.hf.encode(" Paris", add_special_tokens=False)
    assert len(paris) == 1
    assert " Paris" in c.completions.create(**kw).choices[0].text  # the model's answer without a bias
    out = c.completions.create(logit_bias={str(paris[0]): -100}, logprobs=0, **kw)
    assert " Paris" not in out.choices[0].logprobs.tokens

    prompt = llm.encode("one two one two one two", chat=False)
    bias = {llm.tokenizer.hf.encode(" three", add_special_tokens=False)[0]: 2.5}
    want = greedy_by_hand(hf, prompt, 10, presence=0.6, frequency=0.9, bias=bias)
    got = c.completions.create(model="coreinfer", prompt="one two one two one two", temperature=0, max_tokens=10,
                               presence_penalty=0.6, frequency_penalty=0.9,
                               logit_bias={str(k): v for k, v in bias.items()}, logprobs=0,
                               extra_body={"ignore_eos": True})
    assert got.choices[0].logprobs.tokens == [llm.tokenizer.hf.decode([t]) for t in want]
    plain = c.completions.create(model="coreinfer", prompt="one two one two one two", temperature=0, max_tokens=10,
                                 extra_body={"ignore_eos": True})
    assert plain.choices[0].text != got.choices[0].text  # the penalties changed the answer


def matches_person(doc: dict) -> bool:
    return (set(doc) == {"name", "age", "city"} and isinstance(doc["name"], str) and len(doc["name"]) <= 24
            and type(doc["age"]) is int and 0 <= doc["age"] <= 150 and doc["city"] in ("Paris", "London", "Rome"))


def test_response_format_json_alone_and_in_a_shared_batch(url):
    c = client(url)
    ask = [{"role": "user", "content": "Describe a person who lives in a European capital."}]

    def person(i: int) -> str:
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
        kw = {} if i % 2 else {"temperature": 0.9, "seed": i}
        out = c.chat.completions.create(model="coreinfer", messages=ask, max_tokens=80, response_format=fmt, **kw)
        assert out.choices[0].finish_reason == "stop"
        return out.choices[0].message.content

    def anything(i: int) -> str:
        out = c.chat.completions.create(model="coreinfer", messages=CHAT, max_tokens=60, temperature=0,
                                        response_format={"type": "json_object"})
        assert out.choices[0].finish_reason == "stop"
        return out.choices[0].message.content

    def plain(i: int) -> str:
        return c.chat.completions.create(model="coreinfer", messages=CHAT, max_tokens=12, temperature=0,
                                         extra_body={"beta": 0.5}).choices[0].message.content

    assert matches_person(json.loads(person(1)))
    assert isinstance(json.loads(anything(0)), dict)
    wait_idle(url)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # constrained and free rows share the batch
        results = list(pool.map(lambda f: f[0](f[1]), [(person, i) for i in range(3)] + [(plain, 0), (anything, 1),
                                                                                         (plain, 1)]))
    for text in results[:3]:
        assert matches_person(json.loads(text)), text
    assert isinstance(json.loads(results[4]), dict)
    with pytest.raises(json.JSONDecodeError):
        json.loads(results[3])  # the free rows stayed free
