"""Chat prompts equal transformers' apply_chat_template on the same folders; template errors are clear."""

from __future__ import annotations

import json
import shutil
from datetime import datetime

import pytest

from dymoe.engine.chat_template import ChatTemplate
from dymoe.engine.tokenizer import Tokenizer
from dymoe.errors import CheckpointError, InputError
from tests.engine.conftest import CHATML, MIXTRAL

TOOLS = [{
    "type": "function",
    "function": {"name": "get_weather", "description": "Wetter für eine Stadt — 🌦",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
}]

CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "Hello! 🤖"}],
    "system": [{"role": "system", "content": "Be brief. Réponds en français."},
               {"role": "user", "content": "Qu'est-ce qu'un expert ?"}],
    "multi turn": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                   {"role": "user", "content": "日本語で"}],
    "reasoning": [{"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4", "reasoning_content": "two and two"}],
    "none content": [{"role": "user", "content": "x", "name": None}],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chatml_matches_transformers(qwen_dir, hf_tokenizer, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    ours = Tokenizer.from_dir(qwen_dir).apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tokenizer(qwen_dir).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.startswith("<|im_start|>system\n")
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_chatml_with_tools_and_kwargs_matches_transformers(qwen_dir, hf_tokenizer):
    messages = CONVERSATIONS["system"]
    ours = Tokenizer.from_dir(qwen_dir).apply_chat_template(messages, tools=TOOLS, enable_thinking=False)
    theirs = hf_tokenizer(qwen_dir).apply_chat_template(
        messages, tools=TOOLS, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert ours == theirs
    assert json.dumps(TOOLS[0], ensure_ascii=False) in ours  # tojson keeps non-ASCII, no HTML escaping
    assert ours.endswith("<think>\n\n</think>\n\n")


def test_chat_template_ids_match_transformers(qwen_dir, hf_tokenizer):
    tokenizer = Tokenizer.from_dir(qwen_dir)
    messages = CONVERSATIONS["multi turn"]
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    assert ids == hf_tokenizer(qwen_dir).apply_chat_template(messages, add_generation_prompt=True, return_dict=False)


def test_mixtral_template_from_jinja_file_matches_transformers(mixtral_dir, hf_tokenizer):
    messages = CONVERSATIONS["multi turn"]
    ours = Tokenizer.from_dir(mixtral_dir).apply_chat_template(messages)
    assert ours == hf_tokenizer(mixtral_dir).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == "<s>[INST] hi [/INST]hello</s>[INST] 日本語で [/INST]"


def test_mixtral_template_rejects_non_alternating_roles(mixtral_dir, hf_tokenizer):
    import jinja2

    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(InputError, match="Conversation roles must alternate"):
        Tokenizer.from_dir(mixtral_dir).apply_chat_template(messages)
    with pytest.raises(jinja2.exceptions.TemplateError, match="Conversation roles must alternate"):
        hf_tokenizer(mixtral_dir).apply_chat_template(messages, tokenize=False)
    with pytest.raises(InputError, match="Only user and assistant roles"):
        Tokenizer.from_dir(mixtral_dir).apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])


def test_jinja_file_wins_over_tokenizer_config(tmp_path, mixtral_dir):
    shutil.copytree(mixtral_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "IGNORED"}))
    prompt = Tokenizer.from_dir(tmp_path / "m").apply_chat_template([{"role": "user", "content": "x"}])
    assert prompt == "<s>[INST] x [/INST]"


def test_named_templates_match_transformers(tmp_path, qwen_dir, hf_tokenizer):
    shutil.copytree(qwen_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    tool_use = "TOOLS{% for t in tools %}|{{ t.function.name }}{% endfor %}|{{ messages[0].content }}"
    config["chat_template"] = [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": tool_use}]
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(config))
    ours, theirs = Tokenizer.from_dir(tmp_path / "m"), hf_tokenizer(tmp_path / "m")
    messages = CONVERSATIONS["one turn"]
    for tools in (None, TOOLS):
        expected = theirs.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(messages, tools=tools) == expected
    assert ours.apply_chat_template(messages, tools=TOOLS) == "TOOLS|get_weather|Hello! 🤖"


def test_named_templates_without_default(tmp_path, qwen_dir):
    shutil.copytree(qwen_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "rag", "template": "R"}]
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_dir(tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"no chat template named 'default'.*\['rag'\]"):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}])
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}], template="rag") == "R"


# ---- the environment itself -----------------------------------------------------------------


def render(source: str, **kwargs) -> str:
    return ChatTemplate(source).render(kwargs.pop("messages", []), special_tokens=kwargs.pop("special", None), **kwargs)


def test_trim_and_lstrip_blocks():
    source = "  {% for m in messages %}\n[{{ m.content }}]\n  {% endfor %}\nend"
    assert render(source, messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == \
        "[a]\n[b]\nend"


def test_tojson_filter_options():
    value = {"b": "é<&>", "a": [1, 2]}
    assert render("{{ v | tojson }}", v=value) == json.dumps(value, ensure_ascii=False)
    assert render("{{ v | tojson(indent=2) }}", v=value) == json.dumps(value, ensure_ascii=False, indent=2)
    assert render("{{ v | tojson(sort_keys=true) }}", v=value) == '{"a": [1, 2], "b": "é<&>"}'


def test_loop_controls_and_namespace():
    source = ("{% set ns = namespace(n=0) %}{% for m in messages %}"
              "{% if m.content == 'skip' %}{% continue %}{% endif %}{% if m.content == 'stop' %}{% break %}{% endif %}"
              "{% set ns.n = ns.n + 1 %}{{ m.content }}{% endfor %}={{ ns.n }}")
    contents = ["a", "skip", "b", "stop", "c"]
    assert render(source, messages=[{"role": "user", "content": c} for c in contents]) == "ab=2"


def test_strftime_now():
    assert render("{{ strftime_now('%Y') }}") == datetime.now().strftime("%Y")


def test_special_tokens_none_render_empty():
    assert render("[{{ bos_token }}|{{ eos_token }}]", special={"bos_token": None, "eos_token": "</s>"}) == "[|</s>]"


def test_default_variables():
    assert render("{{ add_generation_prompt }} {{ tools }} {{ messages | length }}",
                  messages=[{"role": "user", "content": "x"}]) == "True None 1"


def test_messages_are_not_modified():
    messages = [{"role": "assistant", "content": "x", "reasoning_content": "r", "name": None}]
    render("{{ messages[0].thinking }}", messages=messages)
    assert messages == [{"role": "assistant", "content": "x", "reasoning_content": "r", "name": None}]
    assert render("{{ messages[0].thinking }}|{{ messages[0].name is defined }}", messages=messages) == "r|False"


def test_sandbox_blocks_python_internals():
    with pytest.raises(CheckpointError, match="unsafe"):
        render("{{ ''.__class__.__mro__ }}")
    with pytest.raises(CheckpointError, match="unsafe"):
        render("{% set ns = namespace(_x=1) %}")
    with pytest.raises(CheckpointError, match="unsafe"):
        render("{% set x = [] %}{{ x.append(1) }}")  # immutable sandbox: no mutation of values


def test_syntax_error_names_the_source():
    with pytest.raises(CheckpointError, match=r"model/chat_template\.jinja.*not valid jinja.*line 1"):
        ChatTemplate("{% for x in %}", "model/chat_template.jinja")


def test_mixtral_template_text_renders_directly():
    template = ChatTemplate(MIXTRAL)
    out = template.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                          special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
    assert out == "<s>[INST] q [/INST]a</s>"
