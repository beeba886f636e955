"""PEFT prompt-learning adapters (prompt tuning, prefix tuning, P-tuning) through PEFT's own `generate`.

Their virtual tokens (prepended embeddings, or per-layer prefix keys and values) are inserted by
`PeftModelForCausalLM.generate` / `prepare_inputs_for_generation`, not by the forward pass the engine calls, so
these models keep transformers' decoding loop: same batches, stop ids, precision and outputs as the engine
(stop strings through transformers' `stop_strings`; sampling seeded per batch, reproducible but not the
engine's per-sequence streams; no cache sharing between a prompt's completions).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from tunelab.generate.batching import left_pad, plan_batches
from tunelab.generate.config import GenerateConfig
from tunelab.generate.forward import DTYPES, generation_mode, grad_off
from tunelab.generate.outputs import Completion, GenerationStats
from tunelab.generate.sampling import mix_seed, token_logprobs
from tunelab.generate.stops import StopStrings


def generate_with_peft(model, tokenizer, encoded: list[list[int]], cfg: GenerateConfig, stop_ids, pad_id: int,
                       seed: int, stats: GenerationStats, progress: bool) -> list[Completion]:
    n = cfg.num_return_sequences
    stops = StopStrings(tokenizer, cfg.stop_strings, cfg.skip_special_tokens)
    completions: list = [None] * (len(encoded) * n)
    device = next(model.parameters()).device
    kwargs = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, num_return_sequences=n,
                  eos_token_id=list(stop_ids), pad_token_id=pad_id, return_dict_in_generate=True,
                  output_logits=cfg.return_logprobs)
    if cfg.do_sample:
        kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)  # 0 = off, as here
    if cfg.stop_strings:
        kwargs.update(stop_strings=list(cfg.stop_strings), tokenizer=tokenizer)
    batches = plan_batches([len(e) for e in encoded], max(1, cfg.batch_size // n))
    with generation_mode(model, DTYPES[cfg.precision]) as mixed, grad_off(model):
        for b, idx in enumerate(tqdm(batches, desc="generate", unit="batch", disable=not progress, leave=False)):
            ids, mask, _ = left_pad([encoded[i] for i in idx], pad_id)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                    torch.autocast(device.type, dtype=DTYPES[cfg.precision], enabled=mixed):
                # processes sampling slices of one batch draw differently (this path is batch-dependent anyway)
                torch.manual_seed(mix_seed(mix_seed(seed, cfg.first_sequence) if cfg.first_sequence else seed, b))
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            new = out.sequences[:, ids.shape[1]:].cpu()
            stats.batches += 1
            for r in range(new.shape[0]):
                row = new[r].tolist()
                end = next((k + 1 for k, tok in enumerate(row) if tok in stop_ids), len(row))
                text = tokenizer.decode(row[:end], skip_special_tokens=cfg.skip_special_tokens)
                text, cut = stops.cut(text) if stops else (text, False)
                lps = None
                if cfg.return_logprobs:
                    temp = cfg.temperature if cfg.do_sample else 1.0
                    lps = [float(token_logprobs(out.logits[k][r: r + 1].float(), new[r, k: k + 1].to(device), temp))
                           for k in range(end)]
                reason = "stop" if cut or end < len(row) or (row and row[-1] in stop_ids) else "length"
                completions[idx[r // n] * n + r % n] = Completion(idx[r // n], row[:end], text, reason, lps)
    return completions
