"""Prompts to token ids: text through the tokenizer, chat messages through the chat template.

Large prompts are tokenized off the event loop (``OFFLOAD_CHARS``), so one huge prompt does
not stall every other stream; small ones stay on it (a thread hop costs more than they do).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from sae_runtime.errors import InvalidRequestError, NoChatTemplateError
from server.core.types import Prompt

OFFLOAD_CHARS = 4096
"""Prompts with more characters than this (text, or all messages together) are tokenized in
a worker thread."""


def render_chat(tokenizer, messages: tuple[tuple[str, str], ...], template: str | None,
                model: str, field: str = "prompt") -> list[int]:
    """Token ids of ``messages`` under the chat template, generation prompt added.

    ``template`` (the server's --chat-template) overrides the tokenizer's own. Without
    either, NoChatTemplateError (FAILED_PRECONDITION) names the model. The template decides
    the special tokens (BOS included), as in Hugging Face's ``apply_chat_template``.
    """
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplateError(
            f"{field}.messages", f"model {model} has no chat template; send text or token "
            "ids, or start steerd with --chat-template FILE")
    from jinja2 import TemplateError

    try:
        out = tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages], chat_template=template,
            add_generation_prompt=True, tokenize=True)
    except TemplateError as e:  # the template's raise_exception, or a render error
        raise InvalidRequestError(f"{field}.messages",
                                  f"the chat template rejected the messages: {e}") from None
    ids = out["input_ids"] if isinstance(out, Mapping) else out  # transformers 5: BatchEncoding
    return [int(t) for t in ids]


def prompt_chars(prompt: Prompt) -> int:
    if prompt.text is not None:
        return len(prompt.text)
    if prompt.messages is not None:
        return sum(len(r) + len(c) for r, c in prompt.messages)
    return 0


def tokens_now(tokenizer, prompt: Prompt, template: str | None, model: str,
               field: str) -> list[int]:
    """The prompt's token ids: as given, tokenized text, or rendered chat messages."""
    if prompt.messages is not None:
        out = render_chat(tokenizer, prompt.messages, template, model, field)
    elif prompt.ids is not None:
        out = list(prompt.ids)
    else:
        out = list(tokenizer.encode(prompt.text))
    if not out:
        raise InvalidRequestError(f"{field}.{'messages' if prompt.messages is not None else 'text'}",
                                  "tokenizes to zero tokens")
    return out


async def tokens(tokenizer, prompt: Prompt, template: str | None, model: str,
                 field: str) -> list[int]:
    """``tokens_now``, in a worker thread for a prompt over ``OFFLOAD_CHARS``."""
    if prompt_chars(prompt) > OFFLOAD_CHARS:
        return await asyncio.to_thread(tokens_now, tokenizer, prompt, template, model, field)
    return tokens_now(tokenizer, prompt, template, model, field)
