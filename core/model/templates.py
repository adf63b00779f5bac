"""Conversation templates: how one user turn and the start of the answer render, per LLM family.

    template = resolve_template(config, llm.config, tokenizer)   # config.template, or detected
    before, after = template.split(user_message(question))       # cut at MEDIA_MARKER
    ids = ([tokenizer.bos_token_id] if template.add_bos else []) + ids(before)

A template is small and explicit (no Jinja): the system prompt, how the system prompt and a user
turn render, the strings that end an answer (the first one closes every training answer) and
whether the tokenizer's BOS token goes once in front of the prompt. The media embeddings go where
MEDIA_MARKER is, which is where LLaMA-VID puts "<image>": the user message is "<image>\\n" + the
question (core/model/prompt.py user_message).

    vicuna_v1   LLaMA-VID's conv_vicuna_v1: "<s>" + system + " USER: {msg} ASSISTANT:", answers end "</s>"
    llava_v1    the same layout with LLaVA's system prompt (LLaMA-VID's serve/cli.py uses it)
    llama3      Llama 3 Instruct's header/eot layout, answers end <|eot_id|>
    chatml      <|im_start|>/<|im_end|> with SmolLM2-Instruct's default system prompt
    qwen2       ChatML with Qwen2's "You are a helpful assistant."
    qwen2_5     ChatML with Qwen2.5's default system prompt
    tiny        the tiny test fixture's layout (core/model/build.py)

A checkpoint names its template in config.json (`template`); a checkpoint without one gets it
detected from its LLM (detect_template), and when nothing matches loading fails with a clear
error: a wrong template is a silently worse model, never a fallback.
"""
from __future__ import annotations

from dataclasses import dataclass

from core.errors import ModelLoadError

MEDIA_MARKER = "<media>"   # where the media embeddings go (core/model/prompt.py re-exports it)


class TemplateError(ModelLoadError):
    """An unknown template name, or an LLM whose template cannot be told."""


@dataclass(frozen=True)
class ConversationTemplate:
    name: str
    system: str = ""                # the system prompt; "" renders no system turn at all
    system_turn: str = "{system}"   # how the system prompt renders
    user_turn: str = "{message}"    # one user turn followed by the start of the assistant's answer
    stop: tuple[str, ...] = ()      # strings that end an answer; stop[0] closes training answers
    add_bos: bool = False           # the tokenizer's BOS id goes once in front of the prompt

    @property
    def end(self) -> str:
        """The token that closes an answer (appended to every training answer)."""
        return self.stop[0]

    def render(self, message: str) -> str:
        """The prompt text for one user message, up to where the answer starts (BOS not included:
        it is an id, added by the caller when `add_bos`)."""
        system = self.system_turn.replace("{system}", self.system) if self.system else ""
        return system + self.user_turn.replace("{message}", message)

    def split(self, message: str, marker: str = MEDIA_MARKER) -> tuple[str, str]:
        """(text before the media, text after it up to the answer start)."""
        rendered = self.render(message)
        if rendered.count(marker) != 1:
            raise ValueError(f"the {self.name} prompt must hold {marker!r} exactly once "
                             f"(found {rendered.count(marker)})")
        before, after = rendered.split(marker, 1)
        return before, after


_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
# LLaMA-VID's SeparatorStyle.TWO with sep " " and sep2 "</s>": system + sep + "USER: " + msg + sep
# + "ASSISTANT:" (the answer follows as " answer</s>"; a SentencePiece tokenizer's "▁" is that space).
_VICUNA_LAYOUT = dict(system_turn="{system} ", user_turn="USER: {message} ASSISTANT:", stop=("</s>",),
                      add_bos=True)
_CHATML_LAYOUT = dict(system_turn="<|im_start|>system\n{system}<|im_end|>\n",
                      user_turn="<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n",
                      stop=("<|im_end|>",), add_bos=False)

TEMPLATES: dict[str, ConversationTemplate] = {t.name: t for t in (
    ConversationTemplate("vicuna_v1", system=_VICUNA_SYSTEM, **_VICUNA_LAYOUT),
    ConversationTemplate("llava_v1", system=_LLAVA_SYSTEM, **_VICUNA_LAYOUT),
    # Llama 3 Instruct: bos_token (<|begin_of_text|>) + header turns; no system prompt by default.
    ConversationTemplate(
        "llama3", system_turn="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        user_turn=("<|start_header_id|>user<|end_header_id|>\n\n{message}<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        stop=("<|eot_id|>", "<|end_of_text|>"), add_bos=True),
    # SmolLM2-Instruct's chat template adds this system prompt when the messages have none.
    ConversationTemplate("chatml", system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
                         **_CHATML_LAYOUT),
    ConversationTemplate("qwen2", system="You are a helpful assistant.", **_CHATML_LAYOUT),
    ConversationTemplate("qwen2_5", system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                         **_CHATML_LAYOUT),
    # What build_tiny's TINY_CHAT_TEMPLATE renders for one user message; answers end with EOS "</s>".
    ConversationTemplate("tiny", user_turn="<|user|>\n{message}\n<|assistant|>\n", stop=("</s>",)),
)}


def get_template(name: str) -> ConversationTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise TemplateError(f"unknown conversation template {name!r}; use one of "
                            f"{', '.join(TEMPLATES)}") from None


def _chat_template_text(tokenizer) -> str:
    chat = getattr(tokenizer, "chat_template", None) or ""
    return " ".join(str(v) for v in chat.values()) if isinstance(chat, dict) else str(chat)


def _rendered_by_tokenizer(tokenizer, message: str) -> str | None:
    """What the tokenizer's own chat template renders for one user message, or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # templates that need tools, dates, a system turn, ...
        return None


def detect_template(llm_config, tokenizer, llm_name: str = "", is_tiny: bool = False) -> str:
    """The template name of an LLM: the one whose rendering equals the tokenizer's own chat
    template's, else told from the chat template's markers ("<|im_start|>" ChatML,
    "<|start_header_id|>" Llama 3), else from the model type and name (a LLaMA named Vicuna);
    raises TemplateError when nothing matches."""
    probe = MEDIA_MARKER + "\nWhat is the facial expression?"
    rendered = _rendered_by_tokenizer(tokenizer, probe)
    if rendered is not None:
        bos = getattr(tokenizer, "bos_token", None) or ""
        for template in TEMPLATES.values():
            if template.name == "tiny" and not is_tiny:
                continue
            if rendered == (bos if template.add_bos else "") + template.render(probe):
                return template.name
    chat = _chat_template_text(tokenizer)
    model_type = str(getattr(llm_config, "model_type", "") or "").lower()
    if "<|im_start|>" in chat:
        return "qwen2" if model_type.startswith("qwen") else "chatml"
    if "<|start_header_id|>" in chat:
        return "llama3"
    where = " ".join(str(x or "") for x in (llm_name, getattr(llm_config, "_name_or_path", ""),
                                           getattr(tokenizer, "name_or_path", ""))).lower()
    if model_type == "llama" and "vicuna" in where:
        return "vicuna_v1"
    if model_type == "llama" and ("llama-vid" in where or "llamavid" in where or "llava" in where):
        return "llava_v1"
    label = llm_name or getattr(llm_config, "_name_or_path", "") or model_type or "?"
    raise TemplateError(f"cannot tell the conversation template of LLM {label}; set `template` in "
                        f"config.json to one of {', '.join(TEMPLATES)}")


def resolve_template(config, llm_config, tokenizer) -> ConversationTemplate:
    """`config.template` when set, else the template detected from the LLM."""
    if config.template:
        return get_template(config.template)
    return get_template(detect_template(llm_config, tokenizer, config.llm, config.is_tiny))


def model_template(model) -> ConversationTemplate:
    """The template an EmoLlama prompts with (its config's, or detected from its LLM)."""
    if model.config.template:
        return get_template(model.config.template)
    llm = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    return resolve_template(model.config, getattr(llm, "config", None), model.tokenizer)


def end_token_id(template: ConversationTemplate, tokenizer) -> int:
    """The id of the template's end token (one token of the vocabulary, or a clear error)."""
    if template.end == tokenizer.eos_token and tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    token_id = tokenizer.convert_tokens_to_ids(template.end)
    if token_id is None or (token_id == tokenizer.unk_token_id and template.end != tokenizer.unk_token):
        raise TemplateError(f"template {template.name}: its end token {template.end!r} is not a token of "
                            "this tokenizer; set `template` in config.json to the LLM's own")
    return token_id


def stop_ids(template: ConversationTemplate, tokenizer) -> set[int]:
    """Ids of the template's stop strings that are single tokens of this tokenizer."""
    ids = set()
    for token in template.stop:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and (token_id != tokenizer.unk_token_id or token == tokenizer.unk_token):
            ids.add(token_id)
    return ids


def bos_ids(template: ConversationTemplate, tokenizer) -> list[int]:
    """[BOS id] when the template starts with BOS, else []."""
    if not template.add_bos:
        return []
    if tokenizer.bos_token_id is None:
        raise TemplateError(f"template {template.name} starts with BOS but this tokenizer has no BOS "
                            "token; set `template` in config.json to the LLM's own")
    return [tokenizer.bos_token_id]
