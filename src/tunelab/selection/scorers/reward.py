"""`reward`: a sequence-classification reward model's score of (instruction, response).

As used to filter instruction data by preference-model reward (e.g. AlpaGasus' rating filter,
Chen et al. 2024, https://arxiv.org/abs/2307.08701, with a reward model in place of the API judge; RAFT,
Dong et al. 2023, https://arxiv.org/abs/2304.06767). `model` is any local directory or hub id of an
`AutoModelForSequenceClassification` with one output (num_labels=1); the chat is rendered with the reward
model's own chat template (ChatML if it has none).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from tunelab.core.precision import autocast_context
from tunelab.data.encode import render
from tunelab.selection.lm import _pad, batched, pad_id_of
from tunelab.selection.registry import ScoreOutput, Scorer, ScorerOptions, as_chat, register_scorer


class RewardOptions(ScorerOptions):
    model: str = Field(..., description="Reward model: a local directory or hub id (sequence classification).")
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(1024, ge=8, description="Tokens per sequence (cut from the left).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    label: int = Field(0, ge=0, description="Which output logit is the reward.")


@register_scorer("reward", paper="https://arxiv.org/abs/2304.06767")
class Reward(Scorer):
    Config = RewardOptions

    def score(self, examples, ctx) -> ScoreOutput:
        from transformers import AutoModelForSequenceClassification

        from tunelab.model import load_tokenizer

        cfg = self.config
        mcfg = ctx.model_config(cfg.model)
        tok = load_tokenizer(mcfg)
        model = AutoModelForSequenceClassification.from_pretrained(
            mcfg.name_or_path, trust_remote_code=mcfg.trust_remote_code).to(ctx.device).eval()
        if model.config.pad_token_id is None:
            model.config.pad_token_id = pad_id_of(tok)
        rows = [tok(render(tok, as_chat(ex).messages), add_special_tokens=False)["input_ids"][-cfg.max_length:]
                for ex in examples]
        out = np.zeros(len(rows))
        with torch.no_grad():
            for idx in batched([len(r) for r in rows], cfg.batch_size, "reward", ctx.progress):
                ids, mask = _pad([rows[i] for i in idx], pad_id_of(tok))
                with autocast_context(ctx.device, cfg.precision):
                    logits = model(input_ids=ids.to(ctx.device), attention_mask=mask.to(ctx.device)).logits
                out[idx] = logits[:, cfg.label].float().cpu().numpy()
        return ScoreOutput(out)

    def identity(self, ctx):
        return ctx.model_identity(self.config.model)
