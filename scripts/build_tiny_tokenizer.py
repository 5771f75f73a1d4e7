"""Regenerate the tiny chat tokenizer shipped in ``kvaware_scorer/data/tiny-chat/``.

The tokenizer is a byte-level BPE (about 8k ids, Qwen2-style pre-tokenizer regex, NFC
normalizer) trained with ``tokenizers`` on the ``*.py`` files of the running Python's
standard library, plus three special tokens appended after the learned vocabulary
(``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``) and a ChatML chat template that
handles system/user/assistant/tool messages, assistant tool calls, ``tools`` (rendered
in a system block), ``add_generation_prompt`` and ``enable_thinking``.

Training is deterministic for a given corpus, so two runs on the same Python produce
byte-identical files. The corpus is the interpreter's stdlib, however, and the stdlib
changes between Python versions: **the output depends on the Python version**, which is
why the generated files are committed and this script is never run in CI or by the
tests. Run it by hand only to change the tokenizer, then commit the result together with
the updated ``README.md`` it writes (which records the Python version and checksums)::

    .venv/bin/pip install tokenizers
    .venv/bin/python scripts/build_tiny_tokenizer.py [--out DIR] [--vocab-size 8192]

The files load offline with ``transformers.AutoTokenizer.from_pretrained(DIR)``.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import platform
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

# The Qwen2/Qwen3 pre-tokenizer pattern (GPT-4-like, single digits).
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML. A system message, when first, opens the conversation; with ``tools`` the tool
# definitions (one JSON object per line) are appended to that system block, or form one.
# Assistant tool calls render as <tool_call> blocks; tool results as a ``tool`` turn.
# ``enable_thinking=false`` pre-fills an empty think block after the generation prompt,
# as Qwen3's template does. Non-string content renders as an empty string.
CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- '# Tools\\n\\nYou may call one or more of these functions:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' + content }}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {%- if content or not loop.first %}
                    {{- '\\n' }}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": None,
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "unk_token": None,
    "add_bos_token": False,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "split_special_tokens": False,
    "model_max_length": 32768,
    "chat_template": CHAT_TEMPLATE,
}


def stdlib_files() -> list[str]:
    """The training corpus: the top-level ``*.py`` files of this Python's stdlib, sorted."""
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


def build(out: Path, vocab_size: int) -> None:
    """Train the tokenizer and write ``tokenizer.json``, ``tokenizer_config.json``, README."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    files = stdlib_files()
    if not files:
        sys.exit("build_tiny_tokenizer: no stdlib .py files found")

    def corpus() -> Iterator[str]:
        for path in files:
            with open(path, encoding="utf-8", errors="replace") as handle:
                yield handle.read()

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)

    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as handle:
        json.dump(TOKENIZER_CONFIG, handle, indent=2, ensure_ascii=False)
        handle.write("\n")

    sums = {
        name: hashlib.sha256((out / name).read_bytes()).hexdigest()
        for name in ("tokenizer.json", "tokenizer_config.json")
    }
    readme = f"""# tiny-chat tokenizer (model name `kvaware/tiny-chat`)

A small deterministic byte-level BPE tokenizer with a ChatML chat template, used by the
demo and the tests so that nothing is fetched from a model hub. Generated by
`scripts/build_tiny_tokenizer.py`; do not edit by hand.

- Corpus: the {len(files)} top-level `*.py` files of the Python
  {platform.python_version()} standard library (the output depends on the Python
  version, which is why these files are committed; never regenerate them in CI).
- Vocabulary: {tok.get_vocab_size()} ids: {vocab_size} learned (bytes + merges), then
  `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (ids {vocab_size}..{vocab_size + 2}).
- Normalizer NFC; pre-tokenizer: Qwen2's split regex, then byte-level.
- Chat template: ChatML with system/user/assistant/tool messages, assistant tool
  calls, `tools` (JSON lines in a system block), `add_generation_prompt` and
  `enable_thinking`.
- tokenizers {_tokenizers_version()}.

sha256:

- tokenizer.json: `{sums["tokenizer.json"]}`
- tokenizer_config.json: `{sums["tokenizer_config.json"]}`
"""
    (out / "README.md").write_text(readme, encoding="utf-8")
    size = sum((out / n).stat().st_size for n in sums)
    print(f"build_tiny_tokenizer: wrote {out} ({tok.get_vocab_size()} ids, {size} bytes)")


def _tokenizers_version() -> str:
    import tokenizers

    return str(tokenizers.__version__)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "kvaware_scorer" / "data" / "tiny-chat",
        help="output directory (default: the package's data/tiny-chat)",
    )
    parser.add_argument("--vocab-size", type=int, default=8192, help="learned vocabulary size")
    args = parser.parse_args(argv)
    build(args.out, args.vocab_size)


if __name__ == "__main__":
    main()
