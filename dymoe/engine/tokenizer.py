"""The checkpoint's tokenizer: ``tokenizer.json`` through the ``tokenizers`` library, plus what
transformers reads beside it (special tokens, ``add_bos_token``, the chat template, EOS ids).

The aim is the token ids and prompt strings transformers' ``PreTrainedTokenizerFast`` gives for the
same folder, without importing transformers at run time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as BackendTokenizer

from dymoe.engine.chat_template import ChatTemplate
from dymoe.errors import CheckpointError

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``, {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read it as JSON ({e}); re-download or repair the file") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}; re-download the file")
    return raw


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _eos_ids(value: Any) -> tuple[int, ...]:
    if isinstance(value, bool):
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(v for v in value if isinstance(v, int) and not isinstance(v, bool))
    return ()


def _load_backend(model_dir: Path) -> BackendTokenizer:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: dymoe reads the fast tokenizer file; download tokenizer.json with the checkpoint, "
            "or write one with transformers' AutoTokenizer.from_pretrained(...).save_pretrained(folder)"
        )
    try:
        return BackendTokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception for every parse error
        raise CheckpointError(f"{path}: cannot parse it as a tokenizer ({e}); re-download the file") from None


def _chat_templates(model_dir: Path, config: dict) -> dict[str, str]:
    """Named chat templates; ``chat_template.jinja`` and ``additional_chat_templates/`` win over the config."""
    files = {}
    if (model_dir / CHAT_TEMPLATE_FILE).is_file():
        files["default"] = (model_dir / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (model_dir / CHAT_TEMPLATE_DIR).is_dir():
        for path in sorted((model_dir / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            files[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if files:
        return files
    value = config.get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t and "template" in t}
    return {}


class Tokenizer:
    """Text <-> token ids, chat prompts and EOS ids of one checkpoint folder."""

    def __init__(self, backend: BackendTokenizer, config: dict, eos_token_ids: tuple[int, ...],
                 chat_templates: dict[str, str], source: Path):
        self.backend = backend
        self.config = config
        self.source = source
        self.special_tokens = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        self._add_missing_special_tokens()
        self._apply_bos_eos_flags()
        eos = self.token_id(self.special_tokens["eos_token"])
        self.eos_token_ids: tuple[int, ...] = eos_token_ids or ((eos,) if eos is not None else ())
        self.chat_templates = chat_templates
        self._compiled: dict[str, ChatTemplate] = {}
        # transformers skips this clean-up for BPE models because it deletes real spaces before punctuation.
        self._clean_up_spaces = bool(config.get("clean_up_tokenization_spaces")) and (
            type(backend.model).__name__ != "BPE"
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        """Load ``tokenizer.json``, ``tokenizer_config.json`` and the EOS ids of a checkpoint folder.

        EOS ids come from ``generation_config.json`` (what ``generate`` stops on), else ``config.json``,
        else the tokenizer's ``eos_token``; ``eos_token_id`` may be one id or a list.
        """
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise CheckpointError(f"{model_dir} is not a folder: give the checkpoint folder that holds tokenizer.json")
        backend = _load_backend(model_dir)
        config = _read_json(model_dir / "tokenizer_config.json")
        eos = _eos_ids(_read_json(model_dir / "generation_config.json").get("eos_token_id"))
        eos = eos or _eos_ids(_read_json(model_dir / "config.json").get("eos_token_id"))
        return cls(backend, config, eos, _chat_templates(model_dir, config), model_dir)

    # ---- special tokens -----------------------------------------------------------------------

    def _add_missing_special_tokens(self) -> None:
        """Named special tokens absent from tokenizer.json are added as special, as transformers does."""
        missing = [t for t in self.special_tokens.values() if t is not None and self.backend.token_to_id(t) is None]
        if missing:
            self.backend.add_special_tokens([AddedToken(t, special=True) for t in dict.fromkeys(missing)])

    def _apply_bos_eos_flags(self) -> None:
        """``add_bos_token`` / ``add_eos_token`` decide BOS/EOS only when tokenizer.json has no post-processor.

        A tokenizer.json post-processor is authoritative, as in transformers 5 (which drops the flags
        whenever tokenizer.json exists). Without one, transformers 5 adds nothing while transformers 4's
        Llama-style classes obeyed the flags; a checkpoint that sets ``add_bos_token`` was trained with
        BOS, so the flags win here.
        """
        if self.backend.post_processor is not None:
            return
        bos, eos = self.special_tokens["bos_token"], self.special_tokens["eos_token"]
        add_bos = bool(self.config.get("add_bos_token")) and bos is not None
        add_eos = bool(self.config.get("add_eos_token")) and eos is not None
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        ends = [(t, self.backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=ends)

    def token_id(self, token: str | None) -> int | None:
        """The id of a token's text, None when it is not in the vocabulary."""
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id(self.special_tokens["bos_token"])

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ---- text <-> ids ---------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds BOS/EOS as the checkpoint asks."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens (EOS, chat markers) are dropped unless asked for."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # a tensor of ids works too
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self._clean_up_spaces else text

    # ---- chat -----------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_templates)

    def chat_template(self, name: str | None = None, tools: list[dict] | None = None) -> ChatTemplate:
        """The compiled template called ``name``; by default "default" (or "tool_use" when tools are given)."""
        if not self.chat_templates:
            raise CheckpointError(
                f"{self.source}: the model has no chat template (no chat_template in tokenizer_config.json and no "
                f"{CHAT_TEMPLATE_FILE}); use plain generation without chat, or add a {CHAT_TEMPLATE_FILE} file"
            )
        if name is None:
            name = "tool_use" if tools is not None and "tool_use" in self.chat_templates else "default"
        if name not in self.chat_templates:
            raise CheckpointError(
                f"{self.source}: no chat template named {name!r}; the checkpoint has {sorted(self.chat_templates)}"
            )
        if name not in self._compiled:
            where = CHAT_TEMPLATE_FILE if name == "default" else f"chat template {name!r}"
            self._compiled[name] = ChatTemplate(self.chat_templates[name], f"{self.source / where}")
        return self._compiled[name]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, template: str | None = None, **kwargs: Any) -> str:
        """The prompt string for a conversation, rendered with the checkpoint's chat template.

        Encode the result with ``add_special_tokens=False``: templates write BOS themselves.
        Extra keyword arguments reach the template as variables (e.g. ``enable_thinking=False``).
        """
        compiled = self.chat_template(template, tools)
        return compiled.render(messages, add_generation_prompt, self.special_tokens, tools=tools, **kwargs)


def _clean_up_spaces(text: str) -> str:
    """The WordPiece-era space clean-up transformers applies when ``clean_up_tokenization_spaces`` is set."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


class StreamDecoder:
    """Incremental detokenisation: push token ids, get only text that is final.

    Byte-level BPE can split one character over several tokens, and sentencepiece-style decoders
    drop a leading space only at the start of a text; so a token's text is found by decoding a short
    window (from the last emitted point's predecessor, the "prefix offset") with and without the new
    tokens and taking the difference, and text ending in U+FFFD (an incomplete UTF-8 sequence) is
    held back until the character completes. Concatenated output equals ``decode(all ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decode window
        self.read_offset = 0  # ids before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token id; return the text that became final (often "", never half a character)."""
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Text still held back at the end of generation (e.g. an unfinished character, as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :]
