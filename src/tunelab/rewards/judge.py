"""An LLM judge: a local model reads a rubric prompt with the question, the completion (and the reference) and
answers with a score; the reward is that score divided by `scale` (so in [0, 1]).

The judge runs greedily through the generation engine. `model: policy` judges with the model being trained
(its current weights: self-rewarding); any other value is loaded like `model.name_or_path` (a hub id, a local
HF directory, a .gguf file or a built-in alias). The score is the number after "Score:" when the reply has one,
else its first number; a reply without a number scores 0 and is counted as an error (`PartialScores`: the
scorer logs how many of the batch's replies were unusable and counts them in `reward_errors` /
`rewards/judge/errors`, without judging the batch again).

A judgment takes seconds on a CPU (the self-rewarding rubric: ~3-6 s each), so the judge shows a progress bar over
its replies (tqdm, like the rest of the CLI) when stderr is a terminal, unless the caller's own bar is on screen:
the rollout source passes `progress=False` in the rewards' context (the training loop's bar is shown).

`rubric: self_rewarding` is the LLM-as-a-judge prompt of Self-Rewarding Language Models (Yuan et al. 2024,
https://arxiv.org/abs/2401.10020, fig. 2): an additive 5-point rubric ending in "Score: <total points>"; use it
with `scale: 5` (`tunelab iterate` with `strategy: self_rewarding`, docs/iterate.md).
"""

from __future__ import annotations

import re
import sys

from pydantic import Field
from tqdm.auto import tqdm

from tunelab.rewards.base import PartialScores, Reward, RewardOptions, register_reward

DEFAULT_RUBRIC = (
    "Rate the response to the question on a scale from 0 to {scale}, where {scale} means fully correct, helpful and "
    "concise, and 0 means wrong or unhelpful.\n\nQuestion: {prompt}\n\nReference answer (may be empty): {answer}\n\n"
    "Response: {completion}\n\nReply with the number only.")
SELF_REWARDING_RUBRIC = (
    "Review the user's question and the corresponding response using the additive 5-point scoring system described "
    "below. Points are accumulated based on the satisfaction of each criterion:\n"
    "- Add 1 point if the response is relevant and provides some information related to the user's inquiry, even if "
    "it is incomplete or contains some irrelevant content.\n"
    "- Add another point if the response addresses a substantial portion of the user's question, but does not "
    "completely resolve the query or provide a direct answer.\n"
    "- Award a third point if the response answers the basic elements of the user's question in a useful way, "
    "regardless of whether it seems to have been written by an AI Assistant or if it has elements typically found in "
    "blogs or search results.\n"
    "- Grant a fourth point if the response is clearly written from an AI Assistant's perspective, addressing the "
    "user's question directly and comprehensively, and is well-organized and helpful, even if there is slight room "
    "for improvement in clarity, conciseness or focus.\n"
    "- Bestow a fifth point for a response that is impeccably tailored to the user's question by an AI Assistant, "
    "without extraneous information, reflecting expert knowledge, and demonstrating a high-quality, engaging, and "
    "insightful answer.\n\n"
    "User: {prompt}\n<response>{completion}</response>\n\n"
    "After examining the user's instruction and the response:\n"
    "- Briefly justify your total score, up to 100 words.\n"
    "- Conclude with the score using the format: \"Score: <total points>\"\n\n"
    "Remember to assess from the AI Assistant perspective, utilizing web search knowledge as necessary. To evaluate "
    "the response in alignment with this additive scoring model, we'll systematically attribute points based on the "
    "outlined criteria.")
RUBRICS = {"default": DEFAULT_RUBRIC, "self_rewarding": SELF_REWARDING_RUBRIC}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_SCORE_LINE = re.compile(r"score\s*:\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


class JudgeOptions(RewardOptions):
    model: str = Field("policy", description="`policy` (the model being trained) or a model to load.")
    rubric: str = Field(DEFAULT_RUBRIC, description="Prompt template: {prompt}, {completion}, {answer}, {scale}; or "
                        "a named rubric: `default`, `self_rewarding` (Yuan et al. 2024's additive 5 points).")
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
        rubric = RUBRICS.get(self.config.rubric, self.config.rubric)
        asks = [[{"role": "user", "content": rubric.format(
            prompt=p, completion=c, answer=a or "", scale=f"{self.config.scale:g}")}]
            for p, c, a in zip(prompts, completions, refs)]
        cfg = GenerateConfig(max_new_tokens=self.config.max_new_tokens, batch_size=self.config.batch_size,
                             precision=self.context.get("precision", "bf16"))
        texts: list[str] = []
        step = self.config.batch_size  # one generation batch per call, so the bar moves as replies come
        with tqdm(total=len(asks), desc="judge", unit="reply", leave=False, disable=not self._progress()) as bar:
            for start in range(0, len(asks), step):
                texts.extend(generate(model, tok, asks[start:start + step], cfg).texts)
                bar.update(min(step, len(asks) - start))
        scores, unusable, first = [], [], None
        for i, text in enumerate(texts):
            try:
                scores.append(min(max(parse_score(text) / self.config.scale, 0.0), 1.0))
            except ValueError as e:  # no number in the reply: 0, counted
                scores.append(0.0)
                unusable.append(i)
                first = first or e
        if unusable:
            raise PartialScores(f"{len(unusable)} of {len(texts)} judge replies had no score (scored 0); the first: "
                                f"{first}", scores, unusable)
        return scores

    def _progress(self) -> bool:
        """A bar only on a terminal, and not when the caller shows its own (context `progress=False`)."""
        return bool(self.context.get("progress", True)) and sys.stderr.isatty()


def parse_score(text: str) -> float:
    """The judge's score in its reply: the number after "Score:" if there is one, else the first number."""
    m = _SCORE_LINE.search(text)
    if m is not None:
        return float(m.group(1))
    m = _NUMBER.search(text)
    if m is None:
        raise ValueError(f"the judge's reply has no score: {text!r}")
    return float(m.group())
