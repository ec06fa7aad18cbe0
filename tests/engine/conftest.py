"""Tokenizer folders for the engine tests: a byte-level BPE trained here, saved as a hub checkpoint would be.

Two flavours share one vocabulary: a Qwen-style folder (ChatML template with tools and reasoning in
tokenizer_config.json, no BOS, EOS list in generation_config.json) and a Mixtral-style folder (BOS
added by ``add_bos_token``, special tokens written as AddedToken dicts, a template in
``chat_template.jinja`` that rejects non-alternating roles with ``raise_exception``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TEXT = """\
Mixture-of-Experts language models route every token to a few experts chosen by a small router.
The experts that are not chosen stay idle, so most of the weights are cold at any moment; that is why
they can live in host memory and travel to the accelerator only when a token asks for them.
Le café est très chaud, et la crème brûlée aussi. Naïve façade, déjà vu, señor, Größe, smørrebrød.
日本語のテキストも少し入れておきます。東京は大きな都市です。中文文本也在这里。
Emoji travel as several bytes: 🤖 robots, 🚀 rockets, 👩‍👩‍👧‍👦 families, 🇫🇷 flags, 🧪 tests, ✨ sparkle.
def route(hidden, router):\n    return router(hidden).topk(2)\n\n  Indented lines, tabs\tand  double  spaces.
Numbers 3.14159, 2**64, 1e-6 and punctuation (brackets) [lists] {dicts} "quotes" 'single' — dashes.
"""

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]

# A ChatML template in the shape of Qwen2.5/Qwen3's: default system prompt, tools rendered with
# tojson, a namespace to find the last user turn, reasoning shown only after it, loop controls.
CHATML = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
    {{- "# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}{{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'system' %}{% continue %}{% endif %}
    {{- '<|im_start|>' + message.role + '\\n' }}
    {%- if message.role == 'assistant' and message.reasoning_content is defined and loop.index0 > ns.last_user %}
        {{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}
    {%- endif %}
    {{- message.content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
"""

# Mixtral-8x7B-Instruct's template, written out again.
MIXTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": True}


@pytest.fixture(scope="session")
def backend_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TEXT] * 3, trainer)
    return tokenizer


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=1), encoding="utf-8")


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory, backend_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("qwen_tok")
    backend_tokenizer.save(str(path / "tokenizer.json"))
    write_json(path / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": CHATML,
    })
    ids = [backend_tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
    write_json(path / "generation_config.json", {"eos_token_id": ids, "do_sample": True, "top_k": 20})
    write_json(path / "config.json", {"eos_token_id": ids[1]})
    return path


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory, backend_tokenizer) -> Path:
    """BOS comes from tokenizer.json's post-processor, as in the real Mixtral checkpoint."""
    from tokenizers import Tokenizer, processors

    path = tmp_path_factory.mktemp("mixtral_tok")
    tokenizer = Tokenizer.from_str(backend_tokenizer.to_str())
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", bos)])
    tokenizer.save(str(path / "tokenizer.json"))
    write_json(path / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": added_token("<s>"), "eos_token": added_token("</s>"),
        "unk_token": None, "add_bos_token": True, "add_eos_token": False,
    })
    (path / "chat_template.jinja").write_text(MIXTRAL, encoding="utf-8")
    write_json(path / "config.json", {"eos_token_id": backend_tokenizer.token_to_id("</s>")})
    return path


@pytest.fixture(scope="session")
def bare_bos_dir(tmp_path_factory, backend_tokenizer) -> Path:
    """tokenizer.json without a post-processor; tokenizer_config.json asks for BOS (transformers 4 style)."""
    path = tmp_path_factory.mktemp("bare_bos_tok")
    backend_tokenizer.save(str(path / "tokenizer.json"))
    write_json(path / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    return path


@pytest.fixture(scope="session")
def hf_tokenizer():
    """transformers' tokenizer for a folder: the oracle."""
    from transformers import PreTrainedTokenizerFast

    cache = {}

    def load(path: Path):
        if path not in cache:
            cache[path] = PreTrainedTokenizerFast.from_pretrained(str(path))
        return cache[path]

    return load


@pytest.fixture(scope="session")
def sentencepiece_dir(tmp_path_factory) -> Path:
    """A Llama/Mixtral-style BPE: Metaspace, byte fallback for characters outside the vocabulary
    (emoji, CJK become <0xXX> tokens), a decoder that strips the first leading space, BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  show_progress=False)
    tokenizer.train_from_iterator(["".join(c for c in TEXT if ord(c) < 0x250)] * 3, trainer)
    raw = json.loads(tokenizer.to_str())
    # Byte tokens are ordinary vocabulary entries in sentencepiece conversions, not added tokens.
    raw["added_tokens"] = [t for t in raw["added_tokens"] if not t["content"].startswith("<0x")]
    tokenizer = Tokenizer.from_str(json.dumps(raw))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)])
    path = tmp_path_factory.mktemp("sentencepiece_tok")
    tokenizer.save(str(path / "tokenizer.json"))
    write_json(path / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "chat_template": MIXTRAL,
    })
    return path
