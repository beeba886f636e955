"""An LLM judge: a local model reads a rubric prompt with the question, the completion (and the reference) and
answers with a score; the reward is that score divided by `scale` (so in [0, 1]).

The judge runs greedily through the generation engine. `model: policy` judges with the model being trained
(its current weights: self-rewarding); any other value is loaded like `model.name_or_path` (a hub id, a local
HF directory, a .gguf file or a built-in alias). A reply without a number scores 0 and is counted as an error.
"""

from __future__ import annotations

import re

from pydantic import Field

from tunelab.rewards.base import Reward, RewardOptions, register_reward

DEFAULT_RUBRIC = (
    "Rate the response to the question on a scale from 0 to {scale}, where {scale} means fully correct, helpful and "
    "concise, and 0 means wrong or unhelpful.\n\nQuestion: {prompt}\n\nReference answer (may be empty): {answer}\n\n"
    "Response: {completion}\n\nReply with the number only.")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class JudgeOptions(RewardOptions):
    model: str = Field("policy", description="`policy` (the model being trained) or a model to load.")
    rubric: str = Field(DEFAULT_RUBRIC, description="Prompt template: {prompt}, {completion}, {answer}, {scale}.")
    scale: float = Field(10.0, gt=0, description="The rubric's top score (the reward is score / scale, clipped).")
    max_new_tokens: int = Field(8, ge=1)
    batch_size: int = Field(16, ge=1)


@register_reward("judge")
class LLMJudge(Reward):
    """A rubric-prompted local model's score / scale."""

    Config = JudgeOptions
    description = "LLM judge with a rubric prompt"

    def __init__(self, config=None, **context):
        super().__init__(config, **context)
        self._model = self._tokenizer = None

    def _judge(self):
        if self._model is None:
            if self.config.model == "policy":
                self._model, self._tokenizer = self.context["policy"](), self.context["tokenizer"]
            else:
                from tunelab.model import load_model, load_tokenizer
                from tunelab.recipe import ModelConfig

                cfg = ModelConfig(name_or_path=self.config.model)
                self._model, self._tokenizer = load_model(cfg).eval(), load_tokenizer(cfg)
        return self._model, self._tokenizer

    def score(self, prompts, completions, refs, **info):
        from tunelab.generate import GenerateConfig, generate

        model, tok = self._judge()
        asks = [[{"role": "user", "content": self.config.rubric.format(
            prompt=p, completion=c, answer=a or "", scale=f"{self.config.scale:g}")}]
            for p, c, a in zip(prompts, completions, refs)]
        out = generate(model, tok, asks, GenerateConfig(max_new_tokens=self.config.max_new_tokens,
                                                        batch_size=self.config.batch_size,
                                                        precision=self.context.get("precision", "bf16")))
        scores = []
        for text in out.texts:
            m = _NUMBER.search(text)
            if m is None:
                raise ValueError(f"the judge's reply has no score: {text!r}")
            scores.append(min(max(float(m.group()) / self.config.scale, 0.0), 1.0))
        return scores
