"""A trained reward model as a reward: a sequence-classification model (one logit) scores the chat of prompt +
completion; `objective: reward` trains and exports such models (docs/rl.md)."""

from __future__ import annotations

import torch
from pydantic import Field

from tunelab.rewards.base import Reward, RewardOptions, register_reward


class RewardModelOptions(RewardOptions):
    path: str = Field(..., description="A directory AutoModelForSequenceClassification loads (num_labels = 1).")
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(1024, ge=8)


@register_reward("reward_model")
class RewardModel(Reward):
    """logit of a sequence-classification reward model on the rendered chat (prompt, completion)."""

    Config = RewardModelOptions
    description = "trained reward model (sequence classification)"

    def __init__(self, config=None, **context):
        super().__init__(config, **context)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.config.path)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.config.path).eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    @torch.no_grad()
    def score(self, prompts, completions, refs, **info):
        from tunelab.data.encode import render

        messages = info.get("messages") or [[{"role": "user", "content": p}] for p in prompts]
        texts = [render(self.tokenizer, list(m) + [{"role": "assistant", "content": c}])
                 for m, c in zip(messages, completions)]
        out = []
        for i in range(0, len(texts), self.config.batch_size):
            enc = self.tokenizer(texts[i: i + self.config.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.config.max_length, add_special_tokens=False)
            out += self.model(**enc).logits[:, 0].float().tolist()
        return out
