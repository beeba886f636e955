"""The generation engine: batched greedy or sampled decoding with a KV cache, for evaluation, RL rollouts,
iterate rounds and chat.

    out = generate(model, tokenizer, prompts, GenerateConfig(max_new_tokens=64, do_sample=True, seed=0))
    out.texts                       # one completion per prompt (x num_return_sequences), in input order
    out.completions[i].token_ids    # generated ids (the stop token included), .finish_reason, .logprobs

Per call: eval mode, torch.inference_mode, weights in the compute dtype (forward.generation_mode), all
restored on return. Prompts are sorted by length and cut into batches (batching.plan_batches); each batch
is left-padded, its prompts prefilled once into a preallocated KV cache (cache.py; with
`num_return_sequences` > 1 the prompt's cache is shared by its completions, never recomputed), then one
token per row per step until every row has stopped: on a stop token id (EOS, end of turn), after a token
that completes a stop string, or at `max_new_tokens`. Rows that stopped are fed the pad token, as in
transformers' generate, or dropped from the batch (`drop_finished`: less work, but the matmuls then see
fewer rows, which changes their rounding and so is not bit-identical to transformers).

Decoding steps of llama / mistral / qwen2 models run generate/llama.py's lean step (transformers' operators
without its per-step machinery), other models their forward. Greedy outputs equal transformers' `generate` on
the same batches token for token (same operators, inputs and shapes; tests/generate/test_generate_engine.py,
test_llama_decode.py). PEFT prompt-learning adapters (prompt / prefix / P-tuning) insert
virtual tokens inside PEFT's own generate: those models go through it (fallback.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from tunelab.core.precision import resolve_precision
from tunelab.data.turns import stop_token_ids
from tunelab.generate.batching import Prompt, encode_prompts, left_pad, plan_batches
from tunelab.generate.cache import make_cache
from tunelab.generate.config import GenerateConfig
from tunelab.generate.fallback import generate_with_peft
from tunelab.generate.forward import DTYPES, ModelStep, generation_mode, grad_off, is_prompt_learning
from tunelab.generate.outputs import Completion, GenerationOutput, GenerationStats
from tunelab.generate.sampling import next_tokens, sequence_uniforms, token_logprobs
from tunelab.generate.stops import StopStrings


def generate(model: torch.nn.Module, tokenizer, prompts: Sequence[Prompt], config: GenerateConfig | None = None,
             *, progress: bool = False) -> GenerationOutput:
    """Generate for every prompt (chat messages, text or token ids); see the module docstring."""
    cfg = config or GenerateConfig()
    if cfg.precision == "auto":  # the dtype this device computes natively (bf16, else fp32; fp16 on old GPUs)
        cfg = replace(cfg, precision=resolve_precision("auto", next(model.parameters()).device))
    encoded = encode_prompts(tokenizer, prompts)
    stop_ids = (cfg.stop_token_ids if cfg.stop_token_ids is not None
                else tuple(stop_token_ids(tokenizer, getattr(model, "generation_config", None))))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
    seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
    stats = GenerationStats(prompt_tokens=sum(len(e) for e in encoded))
    t0 = time.perf_counter()
    run = generate_with_peft if is_prompt_learning(model) else _generate_batches
    completions = run(model, tokenizer, encoded, cfg, stop_ids, pad_id, seed, stats, progress)
    stats.seconds = time.perf_counter() - t0
    stats.new_tokens = sum(len(c.token_ids) for c in completions)
    return GenerationOutput(completions, stats)


def _generate_batches(model, tokenizer, encoded: list[list[int]], cfg: GenerateConfig, stop_ids: tuple[int, ...],
                      pad_id: int, seed: int, stats: GenerationStats, progress: bool) -> list[Completion]:
    n = cfg.num_return_sequences
    completions: list = [None] * (len(encoded) * n)
    stops = StopStrings(tokenizer, cfg.stop_strings, cfg.skip_special_tokens)
    batches = plan_batches([len(e) for e in encoded], max(1, cfg.batch_size // n))
    with generation_mode(model, DTYPES[cfg.precision]) as mixed, grad_off(model):
        step = ModelStep(model, autocast_dtype=DTYPES[cfg.precision] if mixed else None)
        for idx in tqdm(batches, desc="generate", unit="batch", disable=not progress, leave=False):
            for c in _generate_batch(step, tokenizer, [encoded[i] for i in idx], idx, cfg, stop_ids, pad_id, stops,
                                     seed, stats):
                completions[c.prompt_index * n + c.sample] = c.completion
    return completions


@dataclass
class _Row:
    completion: Completion
    sample: int

    @property
    def prompt_index(self) -> int:
        return self.completion.prompt_index


def _generate_batch(step: ModelStep, tokenizer, prompt_ids: list[list[int]], prompt_index: list[int],
                    cfg: GenerateConfig, stop_ids: tuple[int, ...], pad_id: int, stops: StopStrings, seed: int,
                    stats: GenerationStats) -> list[_Row]:
    """Prefill one batch of prompts, then decode until every row has stopped."""
    t_start = time.perf_counter()
    n, max_new = cfg.num_return_sequences, cfg.max_new_tokens
    ids, mask, positions = left_pad(prompt_ids, pad_id)
    width = ids.shape[1]
    # transformers drops an all-ones mask (no padding): attention then takes its causal path; so do we
    padded = not bool(mask.all())
    cache = make_cache(step.config, width + max_new)
    logits = step.prefill(ids, mask if padded else None, positions, cache)  # [P, V] fp32
    rows = len(prompt_ids) * n
    if n > 1:  # one prefill per prompt; its cache rows repeated for its n completions
        cache.batch_repeat_interleave(n)
        logits, mask, positions = (t.repeat_interleave(n, dim=0) for t in (logits, mask, positions))
    # global sequence ids: the RNG streams
    seq_index = [cfg.first_sequence + p * n + j for p in prompt_index for j in range(n)]
    uniforms = sequence_uniforms(seed, seq_index, max_new) if cfg.do_sample else None
    full_mask = torch.ones(rows, width + max_new, dtype=torch.long)
    full_mask[:, :width] = mask
    decoder = step.decoder(cache, full_mask if padded else None, width + max_new)
    last_pos = positions[:, -1].clone()  # [rows] position of each row's last token
    stop_t = torch.tensor(stop_ids, dtype=torch.long, device=logits.device)
    tokens = torch.full((rows, max_new), pad_id, dtype=torch.long)
    lps = torch.zeros(rows, max_new) if cfg.return_logprobs else None
    ends = [max_new] * rows  # tokens kept per row
    reasons = ["length"] * rows
    live = torch.arange(rows)  # batch row -> its original row (changes when finished rows are dropped)
    done = torch.zeros(rows, dtype=torch.bool)  # finished rows still in the batch
    history: list[list[int]] | None = [[] for _ in range(rows)] if stops else None
    for t in range(max_new):
        nxt = next_tokens(logits, cfg, uniforms[live, t] if uniforms is not None else None)
        nxt = torch.where(done.to(nxt.device), torch.full_like(nxt, pad_id), nxt)
        nxt_cpu = nxt.cpu()
        tokens[live, t] = nxt_cpu
        if lps is not None:
            lps[live, t] = token_logprobs(logits, nxt, cfg.temperature if cfg.do_sample else 1.0).cpu()
        if t == 0:
            stats.first_token_seconds.append(time.perf_counter() - t_start)
        hit = torch.isin(nxt, stop_t).cpu() & ~done
        if history is not None:
            for r, (tok, finished) in enumerate(zip(nxt_cpu.tolist(), done.tolist())):
                if not finished:
                    history[r].append(tok)
                    if not hit[r] and stops.hit(history[r]):
                        hit[r] = True
        for r in hit.nonzero().flatten().tolist():
            ends[int(live[r])], reasons[int(live[r])] = t + 1, "stop"
        done |= hit
        if bool(done.all()) or t == max_new - 1:
            break
        if cfg.drop_finished and int(done.sum()) * 8 >= len(done):  # compact when >= 1/8 of the rows are done
            keep = (~done).nonzero().flatten()
            cache.batch_select_indices(keep.to(logits.device))
            decoder.select_rows(keep)
            live, done, nxt, last_pos = live[keep], done[keep], nxt[keep], last_pos[keep]
            if history is not None:
                history = [history[int(k)] for k in keep]
        last_pos = last_pos + 1
        logits = decoder.step(nxt.view(-1, 1), last_pos.view(-1, 1))
    stats.batches += 1
    out = []
    kept = [tokens[r, : ends[r]].tolist() for r in range(rows)]
    texts = tokenizer.batch_decode(kept, skip_special_tokens=cfg.skip_special_tokens)
    for r in range(rows):
        text, cut = stops.cut(texts[r]) if stops else (texts[r], False)
        comp = Completion(prompt_index[r // n], kept[r], text, "stop" if cut else reasons[r],
                          lps[r, : ends[r]].tolist() if lps is not None else None)
        out.append(_Row(comp, r % n))
    return out
