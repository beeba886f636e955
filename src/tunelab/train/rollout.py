"""The rollout batch source: on-line RL's data, sampled with the current policy between optimizer steps.

Per generation (every `rollout.num_iterations` optimizer steps), inside the loop's `generation_mode`:
  1. this process's share of `prompts_per_step` prompts (StepSampler order: a pure function of (seed, epoch));
  2. `num_generations` completions of each, sampled with the policy by `sampler` (tunelab.rollouts wires the
     generation engine: KV cache, eval mode, no compiled regions); the sampling seed is a pure function of
     (train.seed, prompt window), and each completion draws from the random stream of its row in the global
     generation batch, so N processes sample exactly the completions one process would (tested);
  3. rewards: `score(items, completions)` (the runner's RewardSet: each reward function's scores, weighted sum,
     verifier accuracy, counted failures);
  4. `prepare(model, batch, gather)`: the objective's advantages, old and reference log-probs (once per generation,
     under the training autocast);
  5. split into micro-batches of `train.batch_size` completions, each trimmed to its own widths, with the step's
     global counts (`step_sequences`, `step_tokens`) that token-level losses normalise by.
The generation batch is kept for the next `num_iterations - 1` steps, and goes into the checkpoint with the
position, so a resumed run trains on exactly the batches the uninterrupted one would have (tested).

The batch keys are listed in `tunelab.objectives.rl_base`. `metrics()` gives the last step's rollout metrics
(rewards, accuracy, lengths, truncation, time), which the loop adds to metrics.jsonl; every
`log_completions_every` steps the prompts, completions and rewards go to `rollouts.jsonl`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from tunelab.data.batching import StepSampler
from tunelab.data.encode import encode_prompt
from tunelab.data.prompts import PromptItem
from tunelab.recipe import RolloutConfig
from tunelab.train.backends import Backend

log = logging.getLogger(__name__)

Batch = dict[str, Any]


class Gather(Protocol):
    """Process-spanning views of a per-process tensor whose rows are this process's completions."""

    def cat(self, t: torch.Tensor) -> torch.Tensor: ...  # [B_local, ...] -> [B_global, ...] (process order)

    def local(self, t: torch.Tensor) -> torch.Tensor: ...  # [B_global, ...] -> this process's rows


class SingleProcess:
    def cat(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def local(self, t: torch.Tensor) -> torch.Tensor:
        return t


class ProcessGather:
    """Gather through the backend's all-reduce (float64, exact for our values): each process writes its rows into
    a zero vector at its offset; every process has the same number of rows."""

    def __init__(self, backend: Backend):
        self.backend = backend

    def cat(self, t: torch.Tensor) -> torch.Tensor:
        world, rank = self.backend.num_processes, self.backend.process_index
        if world == 1:
            return t
        flat = torch.zeros(world * t.numel(), dtype=torch.float64)
        flat[rank * t.numel(): (rank + 1) * t.numel()] = t.detach().double().cpu().flatten()
        out = torch.tensor(self.backend.reduce_sum(flat.tolist()), dtype=torch.float64)
        return out.view(world * t.size(0), *t.shape[1:]).to(device=t.device, dtype=t.dtype)

    def local(self, t: torch.Tensor) -> torch.Tensor:
        world, rank = self.backend.num_processes, self.backend.process_index
        if world == 1:
            return t
        n = t.size(0) // world
        return t[rank * n: (rank + 1) * n]


@dataclass
class Completion:
    """One sampled completion (the generation engine's Completion): ids up to and including the stop token."""

    prompt_index: int
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"


@dataclass
class RewardScores:
    """What scoring a generation batch gives (the runner's RewardSet builds it; layer 5)."""

    per_func: torch.Tensor  # [N, K] each reward's score (NaN: that reward did not score the completion)
    total: torch.Tensor  # [N] weighted sum (NaN: unscorable)
    names: list[str]
    correct: torch.Tensor | None = None  # [N] bool: a verifier accepted the completion (None: no verifier)
    errors: dict[str, int] = field(default_factory=dict)  # reward name -> completions it failed on this batch


# (model, prompt ids, rollout config, seed, first_sequence: the global row of this call's first completion)
Sampler = Callable[[torch.nn.Module, list[list[int]], RolloutConfig, int, int], list[Completion]]
Scorer = Callable[[list[PromptItem], list[Completion]], RewardScores]
Preparer = Callable[[torch.nn.Module, Batch, Gather], Batch]


def _pad(rows: list[list[int]], value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            sl = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
    return ids, mask


def _trim(batch: Batch, rows: slice) -> Batch:
    """Rows `rows` of a generation batch, cut to their own longest prompt and completion."""
    pm, cm = batch["prompt_mask"][rows], batch["completion_attention"][rows]
    p_all, c_all = batch["prompt_ids"].size(1), batch["completion_ids"].size(1)
    p, c = max(1, int(pm.sum(1).max())), max(1, int(cm.sum(1).max()))
    out: Batch = {}
    for k, v in batch.items():
        if not torch.is_tensor(v) or v.dim() == 0:
            out[k] = v
        elif k in ("input_ids", "attention_mask"):
            out[k] = v[rows, p_all - p: p_all + c]
        elif k.startswith("prompt_"):
            out[k] = v[rows, p_all - p:]
        elif v.dim() == 2 and v.size(1) == c_all and k != "rewards_per_func":
            out[k] = v[rows, :c]
        else:
            out[k] = v[rows]
    return out


class RolloutSource:
    """A BatchSource that generates (see the module docstring)."""

    generates = True

    def __init__(self, prompts: list[PromptItem], tokenizer, rollout: RolloutConfig, *, score: Scorer,
                 prepare: Preparer, sampler: Sampler, backend: Backend, batch_size: int, seed: int,
                 steps: int | None = None, epochs: float = 1.0, log_path: Path | None = None,
                 autocast: Callable[[], Any] | None = None):
        world = backend.num_processes
        if rollout.prompts_per_step % world:
            raise ValueError(f"rollout.prompts_per_step ({rollout.prompts_per_step}) must be a multiple of the "
                             f"number of processes ({world})")
        self.prompts, self.tokenizer, self.rollout = prompts, tokenizer, rollout
        self.score, self.prepare, self.backend = score, prepare, backend
        self.batch_size, self.seed, self.log_path = batch_size, seed, log_path
        self.sampler = sampler
        self.autocast = autocast
        self.gather = ProcessGather(backend)
        self.prompt_order = StepSampler(len(prompts), rollout.prompts_per_step // world, 1, world,
                                        backend.process_index, seed)
        gens = self.prompt_order.steps_for_epochs(epochs)
        self.steps = steps if steps is not None else gens * rollout.num_iterations
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._encoded: dict[int, list[int]] = {}
        self.position = 0  # the next step to serve
        self.prompt_cursor = 0  # prompt windows consumed (dynamic sampling takes extra ones)
        self.buffer: list[Batch] | None = None  # the current generation's micro-batches
        self.buffer_generation = -1
        self._metrics: dict[str, float] = {}
        self.counters: dict[str, int] = {}

    # -- the BatchSource protocol ------------------------------------------------------------------------------

    def micro_batches(self, step: int, model: torch.nn.Module) -> list[Batch]:
        gen = step // self.rollout.num_iterations
        if self.buffer is None or self.buffer_generation != gen:
            self.buffer = self._generate(model, gen, step)
            self.buffer_generation = gen
        else:
            self._metrics = {}
        self.position = step + 1
        return list(self.buffer)

    def metrics(self) -> dict[str, float]:
        """Rollout metrics of the last step (global: every process's completions)."""
        return dict(self._metrics)

    def state_dict(self) -> dict[str, Any]:
        reuse = self.buffer is not None and self.position % self.rollout.num_iterations != 0
        return {"kind": "rollout", "position": self.position, "prompt_cursor": self.prompt_cursor,
                "seed": self.seed, "n_prompts": len(self.prompts), "counters": dict(self.counters),
                "buffer_generation": self.buffer_generation if reuse else -1,
                "buffer": [_encode_batch(b) for b in self.buffer] if reuse and self.buffer else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, now in (("n_prompts", len(self.prompts)), ("seed", self.seed)):
            if key in state and state[key] != now:
                log.warning("resuming with %s %s (the checkpoint had %s): the rollouts differ from the interrupted "
                            "run's", key, now, state[key])
        self.position = int(state.get("position", 0))
        self.prompt_cursor = int(state.get("prompt_cursor", self.position // self.rollout.num_iterations))
        self.counters = dict(state.get("counters", {}))
        if state.get("buffer"):
            self.buffer = [_decode_batch(b, self.backend.device) for b in state["buffer"]]
            self.buffer_generation = int(state["buffer_generation"])

    # -- one generation ----------------------------------------------------------------------------------------

    def _prompt_ids(self, i: int) -> list[int]:
        if i not in self._encoded:
            self._encoded[i] = encode_prompt(self.tokenizer, list(self.prompts[i].messages))
        return self._encoded[i]

    def _sample_window(self, model: torch.nn.Module, gen: int, window: int) -> tuple[list[PromptItem], Batch]:
        """Sample and score one window of prompts: the generation batch before `prepare`."""
        ro = self.rollout
        idx = self.prompt_order.micro_batches(window)[0]
        items = [self.prompts[i] for i in idx]
        # one seed per window for every process; this process's completions are rows rank * local_rows.. of the
        # global generation batch (StepSampler gives rank r window[r * local : (r + 1) * local])
        seed = (self.seed * 1_000_003 + window * 7919) % (2**62)
        first = self.backend.process_index * len(idx) * ro.num_generations
        comps = self.sampler(model, [self._prompt_ids(i) for i in idx], ro, seed, first)
        rep_items = [it for it in items for _ in range(ro.num_generations)]
        scores = self.score(rep_items, comps)
        for name, n in scores.errors.items():
            self.counters[f"reward_errors/{name}"] = self.counters.get(f"reward_errors/{name}", 0) + n
        device = self.backend.device
        prompt_ids, prompt_mask = _pad([self._prompt_ids(i) for i in idx for _ in range(ro.num_generations)],
                                       self.pad_id, left=True)
        comp_ids, comp_mask = _pad([c.token_ids for c in comps], self.pad_id, left=False)
        batch: Batch = {
            "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": comp_ids, "completion_mask": comp_mask.clone(), "completion_attention": comp_mask,
            "input_ids": torch.cat([prompt_ids, comp_ids], 1), "attention_mask": torch.cat([prompt_mask, comp_mask], 1),
            "rewards": scores.total.float(), "rewards_per_func": scores.per_func.float(),
            "is_truncated": torch.tensor([c.finish_reason == "length" for c in comps]),
            "correct": (scores.correct if scores.correct is not None else torch.full((len(comps),), float("nan"))),
            "temperature": torch.tensor(float(ro.temperature)),
            "max_completion_length": torch.tensor(ro.max_completion_length),
        }
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        batch["_texts"] = [c.text for c in comps]
        batch["_names"] = scores.names
        return rep_items, batch

    def _generate(self, model: torch.nn.Module, gen: int, step: int) -> list[Batch]:
        ro = self.rollout
        self._metrics = {}
        items, batch = self._sample_window(model, gen, self.prompt_cursor)
        self.prompt_cursor += 1
        if ro.dynamic_sampling:
            items, batch = self._dynamic_sampling(model, gen, items, batch)
        with self.autocast() if self.autocast is not None else _null():
            batch = self.prepare(model, batch, self.gather)
        self._log_metrics(batch, gen)
        if self.log_path is not None and ro.log_completions_every and step % ro.log_completions_every == 0:
            self._write_rollouts(step, items, batch)
        return self._split(batch)

    def _dynamic_sampling(self, model, gen: int, items: list[PromptItem], batch: Batch):
        """DAPO's dynamic sampling (Yu et al. 2025): keep only groups whose rewards differ; fill the batch with
        groups of further prompt windows, at most `max_resample` extra rounds; if still short, the remaining
        places keep the first zero-signal groups (counted in `dynamic_sampling/short`)."""
        g = self.rollout.num_generations
        want = len(items) // g
        def informative(b: Batch) -> list[int]:
            r = b["rewards"].view(-1, g)
            spread = torch.nan_to_num(r.max(1).values - r.min(1).values, nan=0.0)
            return [i for i in range(r.size(0)) if float(spread[i]) > 0]

        pool = [(items, batch)]
        keep = [(0, i) for i in informative(batch)]
        rounds = 0
        while len(keep) < want and rounds < self.rollout.max_resample:
            more_items, more = self._sample_window(model, gen, self.prompt_cursor)
            self.prompt_cursor += 1
            rounds += 1
            pool.append((more_items, more))
            keep += [(len(pool) - 1, i) for i in informative(more)]
        if len(keep) < want:
            self.counters["dynamic_sampling/short"] = self.counters.get("dynamic_sampling/short", 0) + want - len(keep)
            used = set(keep)
            keep += [(0, i) for i in range(want) if (0, i) not in used][: want - len(keep)]
        keep = sorted(keep[:want])
        self._metrics["dynamic_sampling/rounds"] = float(rounds)
        rows = [(p, i * g + j) for p, i in keep for j in range(g)]
        return _select(pool, rows, self.pad_id)

    def _split(self, batch: Batch) -> list[Batch]:
        n = batch["completion_ids"].size(0)
        if n % self.batch_size:
            raise ValueError(f"{n} completions per process do not split into micro-batches of train.batch_size "
                             f"= {self.batch_size}")
        step_seq, step_tok = self.backend.reduce_sum([float(n), float(batch["completion_mask"].sum())])
        out = []
        for s in range(0, n, self.batch_size):
            mb = _trim({k: v for k, v in batch.items() if not k.startswith("_")}, slice(s, s + self.batch_size))
            mb["step_sequences"] = torch.tensor(step_seq)
            mb["step_tokens"] = torch.tensor(step_tok)
            out.append(mb)
        return out

    def _log_metrics(self, batch: Batch, gen: int) -> None:
        g = self.gather
        rewards, per_func = g.cat(batch["rewards"]), g.cat(batch["rewards_per_func"])
        lengths = g.cat(batch["completion_attention"].sum(1).float())
        trunc = g.cat(batch["is_truncated"].float())
        m: dict[str, float] = {"reward": _nanmean(rewards), "reward_std": _nanstd(rewards),
                               "completions/mean_length": float(lengths.mean()),
                               "completions/max_length": float(lengths.max()),
                               "completions/min_length": float(lengths.min()),
                               "completions/clipped_ratio": float(trunc.mean()),
                               "generation": float(gen)}
        for k, name in enumerate(batch["_names"]):
            m[f"rewards/{name}/mean"] = _nanmean(per_func[:, k])
            m[f"rewards/{name}/std"] = _nanstd(per_func[:, k])
        correct = g.cat(batch["correct"].float())
        if not torch.isnan(correct).all():
            m["accuracy"] = _nanmean(correct)
        if "reward_zero_std" in batch:
            m["frac_reward_zero_std"] = float(g.cat(batch["reward_zero_std"].float()).mean())
        for name, count in self.counters.items():
            m[name] = float(count)
        self._metrics.update(m)

    def _write_rollouts(self, step: int, items: list[PromptItem], batch: Batch) -> None:
        if not self.backend.is_main_process or self.log_path is None:
            return
        adv = batch.get("advantages")
        with open(self.log_path, "a", encoding="utf-8") as f:
            for i, (it, text) in enumerate(zip(items, batch["_texts"])):
                rec = {"step": step + 1, "prompt": it.text, "answer": it.answer, "completion": text,
                       "reward": _num(batch["rewards"][i]),
                       "rewards": {n: _num(batch["rewards_per_func"][i, k]) for k, n in enumerate(batch["_names"])},
                       "advantage": _num(adv[i].mean() if adv is not None and adv.dim() > 1 else
                                         adv[i] if adv is not None else float("nan")),
                       "truncated": bool(batch["is_truncated"][i])}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _select(pool: list[tuple[list[PromptItem], Batch]], rows: list[tuple[int, int]], pad_id: int):
    """Rows (pool index, row) of several generation batches as one batch (re-padded to common widths)."""
    items = [pool[p][0][r] for p, r in rows]
    first = pool[0][1]
    prompts = [pool[p][1]["prompt_ids"][r][pool[p][1]["prompt_mask"][r].bool()].tolist() for p, r in rows]
    comps = [pool[p][1]["completion_ids"][r][pool[p][1]["completion_attention"][r].bool()].tolist() for p, r in rows]
    device = first["prompt_ids"].device
    p_ids, p_mask = _pad(prompts, pad_id, left=True)
    c_ids, c_mask = _pad(comps, pad_id, left=False)
    out: Batch = {"prompt_ids": p_ids.to(device), "prompt_mask": p_mask.to(device), "completion_ids": c_ids.to(device),
                  "completion_mask": c_mask.clone().to(device), "completion_attention": c_mask.to(device)}
    out["input_ids"] = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    out["attention_mask"] = torch.cat([out["prompt_mask"], out["completion_attention"]], 1)
    for k in ("rewards", "rewards_per_func", "is_truncated", "correct"):
        out[k] = torch.stack([pool[p][1][k][r] for p, r in rows])
    for k in ("temperature", "max_completion_length", "_names"):
        out[k] = first[k]
    out["_texts"] = [pool[p][1]["_texts"][r] for p, r in rows]
    return items, out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _num(x) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v


def _nanmean(x: torch.Tensor) -> float:
    v = float(torch.nanmean(x.float())) if x.numel() else float("nan")
    return v


def _nanstd(x: torch.Tensor) -> float:
    x = x.float()[~torch.isnan(x.float())]
    return float(x.std()) if x.numel() > 1 else 0.0


def _encode_batch(batch: Batch) -> dict[str, Any]:
    """A micro-batch as JSON (checkpoints' state.json): dtype, shape and the values (float32 round-trips exactly
    through Python floats)."""
    return {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape),
                "data": v.detach().cpu().flatten().tolist()} for k, v in batch.items() if torch.is_tensor(v)}


def _decode_batch(data: dict[str, Any], device: torch.device) -> Batch:
    return {k: torch.tensor(v["data"], dtype=getattr(torch, v["dtype"])).view(v["shape"]).to(device)
            for k, v in data.items()}
