"""One generation engine for evaluation, RL rollouts, iterate rounds and chat (layer 4: imports core, recipe,
data and model only). `generate(model, tokenizer, prompts, GenerateConfig(...))`; see engine.py."""

from tunelab.generate.batching import encode_prompts, plan_batches
from tunelab.generate.config import GenerateConfig
from tunelab.generate.engine import generate
from tunelab.generate.outputs import Completion, GenerationOutput, GenerationStats

__all__ = ["Completion", "GenerateConfig", "GenerationOutput", "GenerationStats", "encode_prompts", "generate",
           "plan_batches"]
