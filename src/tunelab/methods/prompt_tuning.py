"""Prompt tuning: learned soft-prompt embeddings prepended to the input, through HF PEFT (`PromptTuningConfig`).

Lester et al. 2021, https://arxiv.org/abs/2104.08691. Update rule: input embeddings [B, T, h] ->
[P ; E(x)] [B, n + T, h] with P [n, h] the only trainable tensor; the model itself is frozen.

Defaults: n=20 virtual tokens (in the paper, gains beyond 20 are marginal), P initialised from the
embeddings of randomly sampled vocabulary tokens (the paper: better than uniform random init, most of
all for smaller models); `init_text` starts from the embedding of a text instead (needs the tokenizer path).
The virtual positions are dropped from the logits, so objectives see [B, T, V]. Cannot merge
(`ExportUnsupported`); the adapter is PEFT's own format.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from tunelab.methods._peft_common import PromptLearningMethod
from tunelab.methods.registry import MethodOptions, register


class PromptTuningOptions(MethodOptions):
    num_virtual_tokens: int = Field(20, ge=1, description="Length n of the soft prompt.")
    init_text: str | None = Field(None, description="Initialise P from this text's token embeddings.")
    tokenizer: str | None = Field(None, description="Tokenizer path for init_text (usually the model's).")

    @model_validator(mode="after")
    def _text_needs_tokenizer(self):
        if self.init_text is not None and self.tokenizer is None:
            raise ValueError("init_text needs `tokenizer` (a tokenizer path or hub id)")
        return self


@register("prompt_tuning", paper="https://arxiv.org/abs/2104.08691")
class PromptTuning(PromptLearningMethod):
    """A learned soft prompt [n, hidden] prepended to every input."""
    trains = "a soft prompt (virtual token embeddings)"

    Config = PromptTuningOptions

    def peft_config(self):
        from peft import PromptTuningConfig, PromptTuningInit

        c = self.config
        if c.init_text is not None:
            return PromptTuningConfig(num_virtual_tokens=c.num_virtual_tokens, prompt_tuning_init=PromptTuningInit.TEXT,
                                      prompt_tuning_init_text=c.init_text, tokenizer_name_or_path=c.tokenizer,
                                      task_type="CAUSAL_LM")
        return PromptTuningConfig(num_virtual_tokens=c.num_virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB, task_type="CAUSAL_LM")
