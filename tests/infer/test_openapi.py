"""The served OpenAPI schema and the answers agree, on fixed requests (test_fuzz.py explores the rest): the
statuses each operation documents, 405 with Allow, strict bodies, /tokenize's one-of, and bodies, errors and
streamed events that conform to the schema (checked by schemathesis's own response validation)."""

import httpx
import pytest
import schemathesis

from tests.conftest import tiny_model
from tests.infer.conftest import HI, NAME, live_server

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def url(tokenizer):
    with live_server(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer, max_len=128, api_key=KEY) as (url, _):
        yield url


@pytest.fixture(scope="module")
def schema(url):
    return schemathesis.openapi.from_url(f"{url}/openapi.json")


def test_documented_statuses(url, tokenizer):
    raw = httpx.get(f"{url}/openapi.json").json()
    statuses = {(m.upper(), p): set(op["responses"]) for p, item in raw["paths"].items() for m, op in item.items()}
    generating = {"200", "400", "401", "404", "408", "413", "429", "503"}
    assert statuses == {("GET", "/health"): {"200", "503"}, ("GET", "/v1/models"): {"200", "401"},
                        ("POST", "/v1/chat/completions"): generating, ("POST", "/v1/completions"): generating,
                        ("POST", "/tokenize"): {"200", "400", "401", "413"},
                        ("POST", "/detokenize"): {"200", "400", "401", "413"},
                        ("GET", "/tokenizer_info"): {"200", "401"}}
    assert raw["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "HTTPValidationError" not in raw["components"]["schemas"]
    tokens = raw["components"]["schemas"]["DetokenizeBody"]["properties"]["tokens"]["items"]
    assert tokens == {"type": "integer", "minimum": 0, "maximum": tokenizer.vocab_size - 1}
    with live_server(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer) as (keyless, _):
        raw = httpx.get(f"{keyless}/openapi.json").json()
    assert "401" not in raw["paths"]["/v1/models"]["get"]["responses"] and "securitySchemes" not in raw["components"]


@pytest.mark.parametrize("method,path,allow", [("PUT", "/v1/chat/completions", "POST"), ("DELETE", "/health", "GET"),
                                               ("OPTIONS", "/tokenize", "POST")])
def test_undeclared_method_gets_405_with_allow(url, method, path, allow):
    r = httpx.request(method, f"{url}{path}", headers=AUTH)
    assert r.status_code == 405 and allow in r.headers["allow"] and "error" in r.json()


@pytest.mark.parametrize("extra,status", [({"n": 2.0, "max_tokens": 2.0}, 200), ({"n": "2"}, 400), ({"n": True}, 400),
                                          ({"stream": 0}, 400), ({"temperature": "0"}, 400), ({"n": 1.5}, 400)])
def test_bodies_are_strict_json_schema_types(url, extra, status):
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": NAME, "messages": HI, "max_tokens": 2, **extra},
                   headers=AUTH)
    assert r.status_code == status, r.text


@pytest.mark.parametrize("body", [{"model": NAME}, {"prompt": "a", "messages": HI}, {"prompt": None},
                                  {"prompt": None, "messages": HI}])
def test_tokenize_takes_exactly_one_of_prompt_and_messages(url, body):
    r = httpx.post(f"{url}/tokenize", json=body, headers=AUTH)
    assert r.status_code == 400, r.text


CALLS = [("POST", "/v1/chat/completions", {"model": NAME, "messages": HI, "max_tokens": 4, "logprobs": True,
                                           "top_logprobs": 2}),
         ("POST", "/v1/chat/completions", {"model": NAME, "messages": HI, "max_tokens": 4, "stream": True,
                                           "logprobs": True, "stream_options": {"include_usage": True}}),
         ("POST", "/v1/completions", {"model": NAME, "prompt": "The", "max_tokens": 4, "echo": True, "logprobs": 2}),
         ("POST", "/v1/completions", {"model": NAME, "prompt": [[1, 2], [3]], "max_tokens": 4, "stream": True,
                                      "logprobs": 1}),
         ("POST", "/v1/chat/completions", {"model": "other", "messages": HI}),  # 404
         ("POST", "/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": 500}),  # 400
         ("POST", "/tokenize", {"messages": HI}), ("POST", "/detokenize", {"tokens": [1, 2]}),
         ("GET", "/v1/models", None), ("GET", "/tokenizer_info", None), ("GET", "/health", None)]


@pytest.mark.parametrize("method,path,body", CALLS)
def test_answers_conform_to_the_schema(schema, method, path, body):
    case = schema[path][method].Case(headers=AUTH, **{} if body is None else {"body": body})
    response = case.call()
    assert response.status_code in (200, 400, 404)
    case.validate_response(response)  # raises what does not conform: status, content type, body, each event
