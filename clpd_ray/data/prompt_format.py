"""How an example's prompt and target become the text a model reads and writes.

Two formats, one per run (``data.chat_template``):

- plain (default): the text is ``prompt + target``; the prompt is used as given (the loaders
  write ``"Question: ...\\nAnswer:"`` and start the target with a space, so the split falls on
  a token boundary of byte-level BPE tokenizers). The embedded task uses this format unchanged.
- chat: the tokenizer's chat template, with an optional system turn, the prompt as the user turn
  and the target as the assistant turn (``enable_thinking=False`` is passed, so Qwen3's template
  writes its empty ``<think>`` block into the generation prompt, where training sees it too).

``prompt_text`` is the exact text generation starts after, and ``full_text`` always begins with
it, so the prompt tokens of training rows are the tokens generation starts from. In chat format
the full text ends with the template's end-of-turn marker (e.g. ``<|im_end|>``), which is scored
like the eos and stops generation; in plain format the batch encoder appends the eos token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from clpd_ray.errors import ConfigError

if TYPE_CHECKING:
    from clpd_ray.config import Config

__all__ = ["PromptFormat"]

_SENTINEL = "\u2063CLPD-TARGET\u2063"  # a target no template rewrites (invisible separators)
_TEMPLATE_KW: dict[str, Any] = {"enable_thinking": False}


@dataclass(frozen=True)
class PromptFormat:
    chat_template: bool = False
    system_prompt: str | None = None

    @classmethod
    def from_config(cls, config: Config) -> PromptFormat:
        return cls(chat_template=config.data.chat_template, system_prompt=config.data.system_prompt)

    def check(self, tokenizer: PreTrainedTokenizerBase, source: str = "the tokenizer") -> None:
        """ConfigError if the chat format is asked for and ``tokenizer`` has no chat template."""
        if self.chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"data.chat_template is true but {source} has no chat template (its "
                "tokenizer_config.json sets no 'chat_template'); set data.chat_template: false "
                "for the plain 'Question: ...\\nAnswer:' format, or use an instruct model's tokenizer"
            )

    def messages(self, prompt: str, target: str | None = None) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        msgs.append({"role": "user", "content": prompt})
        if target is not None:
            msgs.append({"role": "assistant", "content": target})
        return msgs

    def prompt_text(self, tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
        """The exact text generation starts after."""
        if not self.chat_template:
            return prompt
        return self._render(tokenizer, self.messages(prompt), add_generation_prompt=True)

    def end_text(self, tokenizer: PreTrainedTokenizerBase) -> str:
        """What closes the target: the chat template's end-of-turn marker; plain: "" (eos is an id)."""
        if not self.chat_template:
            return ""
        rendered = self._render(tokenizer, self.messages("q", _SENTINEL))
        at = rendered.rfind(_SENTINEL)
        after = rendered[at + len(_SENTINEL) :].rstrip() if at >= 0 else ""
        return after or str(tokenizer.eos_token or "")

    def full_text(self, tokenizer: PreTrainedTokenizerBase, prompt: str, target: str) -> str:
        """``prompt_text`` + target (+ the end-of-turn marker in chat format)."""
        return self.prompt_text(tokenizer, prompt) + target + self.end_text(tokenizer)

    def _render(
        self,
        tokenizer: PreTrainedTokenizerBase,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = False,
    ) -> str:
        self.check(tokenizer)
        try:
            return str(
                tokenizer.apply_chat_template(
                    messages,
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                    **_TEMPLATE_KW,
                )
            )
        except Exception as err:  # jinja raises TemplateError (or anything a template raises)
            hint = (
                "; this template may not accept a system turn: drop data.system_prompt"
                if self.system_prompt
                else ""
            )
            raise ConfigError(
                f"data.chat_template: the tokenizer's chat template cannot render a "
                f"{'system + ' if self.system_prompt else ''}user + assistant conversation "
                f"({type(err).__name__}: {err}){hint}, or set data.chat_template: false"
            ) from None

    def stop_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """Token ids that end a generation: the end-of-turn marker's first token, and the eos."""
        ids: list[int] = []
        end = self.end_text(tokenizer)
        if end:
            first = tokenizer(end, add_special_tokens=False)["input_ids"]
            if first:
                ids.append(int(first[0]))
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
            ids.append(int(tokenizer.eos_token_id))
        return ids
