"""LoReFT: low-rank linear subspace representation fine-tuning.

Wu et al. 2024, https://arxiv.org/abs/2404.03592; reference code github.com/stanfordnlp/pyreft. Update rule (on a
decoder layer's output h [d] at the chosen positions): h <- h + R^T (W h + b - R h), with R [r, d] having
orthonormal rows (R R^T = I), W [r, d], b [r]; only R, W, b train, the model's weights stay frozen.

Positions (the paper's, pyreft's `get_intervention_locations`): LoReFT intervenes on PROMPT tokens only, the
first p and the last s of them ("f7+l7"), with p and s capped at half the prompt length P (first_n = min(P // 2,
p), last_n = min(P // 2, s)), so the two sets never overlap. Generated tokens are never intervened on: they
see the edited prompt only through the KV cache (pyreft's `intervene_on_prompt`). The prompt of a row is:
  - in training, its tokens before the first target (label != -100). The method reads the encoded training
    examples before `prepare` (`calibrate_from_examples`, capability `calibrates_from_examples`: the
    assembler passes them, and without them it refuses to train), and recognises each forward's rows by
    their tokens (whatever the padding; rows whose response tokens were replaced, as Masked Thought does,
    by their length and prompt). Labels given to the model's forward are used directly. Rows whose labels
    cover every token (a `full` loss mask) are taken whole;
  - otherwise (generation, held-out losses, training rows not seen before `prepare`, such as a continual
    stream's later stages) every real token of the forward, i.e. a prefill is its prompt; a decoding step
    (tokens already in the KV cache) is not intervened on. A held-out loss therefore intervenes on the
    first/last tokens of the whole prompt + response sequence.
Packed rows (restarting position_ids) are handled segment by segment. `positions: all` intervenes everywhere,
generated tokens included (the old default).

Defaults: the paper's commonsense/arithmetic setting (pyreft examples/loreft: `-l all -r 8 -p f7+l7
--share_weights`): every layer, r = 8, positions f7+l7, one intervention per layer shared by both position sets
(`share_weights: false` gives the first and last positions separate interventions, pyreft's default and the
paper's instruction-following setting, which also uses layers 3;9;18;24, r 4, f5+l5). Departure: W = R and b =
0 at the start, so the intervention is the identity and the model unchanged (pyreft draws W, b at random;
`start_unchanged: false` does that).

R is kept orthonormal by `torch.nn.utils.parametrizations.orthogonal` (as pyreft does). Its default map for a
non-square matrix is Householder, which we saw collapse to R = 0 at lr 0.1 on a 4x64 matrix; "cayley" (default
here) and "matrix_exp" stay orthonormal to ~1e-6. The trivialisation keeps a d x d `base` buffer, which
checkpoints carry (it is part of R's value). The intervention runs in fp32 outside autocast. No weight decay
(the neutral intervention is W = R, not W = 0). Per intervention: 2 r d + r parameters.

Not mergeable (the edit depends on h, not on a weight): merged export raises ExportUnsupported. The adapter
export writes R, W, b in tunelab's own safetensors format (PEFT cannot load it).
"""

from __future__ import annotations

import re
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from tunelab.core.constants import IGNORE_INDEX
from tunelab.methods._modules import load_named_tensors, resolve_layers, save_own_adapter
from tunelab.methods.registry import Capabilities, ExportUnsupported, Method, MethodOptions, register

NOT_MERGEABLE = ("loreft: the intervention h + R^T(W h + b - R h) edits hidden states at chosen positions; it is "
                 "not a weight edit and cannot be merged. Use the adapter export (tunelab's own format: PEFT cannot "
                 "load it; re-apply with tunelab.methods._modules.load_own_adapter)")
POSITIONS = re.compile(r"all|f([1-9]\d*)(?:\+l([1-9]\d*))?|l([1-9]\d*)")


class LoReFTIntervention(torch.nn.Module):
    def __init__(self, d: int, r: int, orthogonal_map: str = "cayley", start_unchanged: bool = True):
        super().__init__()
        from torch.nn.utils.parametrizations import orthogonal

        # R = rotate.weight [r, d], rows orthonormal; W = learned_source.weight [r, d], b = learned_source.bias [r]
        self.rotate = orthogonal(torch.nn.Linear(d, r, bias=False), orthogonal_map=orthogonal_map)
        self.learned_source = torch.nn.Linear(d, r)
        if start_unchanged:  # W = R, b = 0: W h + b - R h = 0, the intervention starts as the identity
            with torch.no_grad():
                self.learned_source.weight.copy_(self.rotate.weight)
                self.learned_source.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=h.device.type, enabled=False):
            hf = h.float()  # [..., d]
            R = self.rotate.weight.float()  # [r, d]
            # in fp32 whatever the weights' storage (generation casts them to the compute dtype for its call)
            W, b = self.learned_source.weight.float(), self.learned_source.bias.float()
            delta = (F.linear(hf, W, b) - hf @ R.T) @ R  # [..., r] @ [r, d] -> [..., d]
            return (hf + delta).to(h.dtype)


class LoReFTOptions(MethodOptions):
    r: int = Field(8, ge=1, description="Rank of the intervened subspace (the paper's reasoning runs: 8).")
    layers: list[int] | None = Field(None, description="Decoder layers whose output is intervened on "
                                                       "(negative = from the top); None = all.")
    positions: str = Field("f7+l7", description="'f<p>+l<s>': the first p and last s prompt tokens (capped at half "
                                                "the prompt each), 'f<p>', 'l<s>', or 'all' (every position).")
    share_weights: bool = Field(True, description="One intervention per layer for the first and the last "
                                                  "positions (the paper's reasoning runs); False = one each.")
    orthogonal_map: Literal["cayley", "matrix_exp", "householder"] = Field(
        "cayley", description="How torch keeps R orthonormal.")
    start_unchanged: bool = Field(True, description="Init W = R, b = 0 (identity at step 0); False = pyreft's "
                                                    "random W, b.")

    @field_validator("positions")
    @classmethod
    def _positions(cls, v: str) -> str:
        if not POSITIONS.fullmatch(v):
            raise ValueError("positions must be 'all', 'f<p>', 'l<s>' or 'f<p>+l<s>' (prompt tokens), e.g. 'f7+l7'")
        return v


def parse_positions(spec: str) -> tuple[int, int] | None:
    """'f7+l7' -> (7, 7); 'f3' -> (3, 0); 'l2' -> (0, 2); 'all' -> None."""
    m = POSITIONS.fullmatch(spec)
    if m is None or spec == "all":
        return None
    return int(m.group(1) or 0), int(m.group(2) or m.group(3) or 0)


def segments(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
             shape) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) token ranges of its sequences: the real tokens of a padded row, or each packed
    document (position_ids restarting at 0) of a packed row."""
    b, t = shape
    out = []
    for i in range(b):
        if attention_mask is None and position_ids is not None and position_ids.dim() == 2:
            starts = (position_ids[i] == 0).nonzero().flatten().tolist() or [0]
            out.append(list(zip(starts, starts[1:] + [t])))
        elif attention_mask is not None and attention_mask.dim() == 2:
            real = attention_mask[i, -t:].nonzero().flatten()
            out.append([(int(real[0]), int(real[-1]) + 1)] if len(real) else [])
        else:
            out.append([(0, t)])
    return out


def prompt_masks(segs: list[list[tuple[int, int]]], prompt_lens: list[list[int]], t: int, first: int,
                 last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first [B, T], last [B, T]) bool masks of the intervened positions: in each sequence starting at s with a
    prompt of P tokens, [s, s + min(P // 2, first)) and [s + P - min(P // 2, last), s + P) (pyreft's rule)."""
    fm = torch.zeros(len(segs), t, dtype=torch.bool)
    lm = torch.zeros(len(segs), t, dtype=torch.bool)
    for i, (row, lens) in enumerate(zip(segs, prompt_lens)):
        for (s, _), p in zip(row, lens):
            nf, nl = min(p // 2, first), min(p // 2, last)
            fm[i, s: s + nf] = True
            lm[i, s + p - nl: s + p] = True
    return fm, lm


def prompt_length(labels_row: torch.Tensor, start: int, end: int) -> int:
    """Tokens of [start, end) before the first target; the whole range if it starts with a target (full mask)."""
    tgt = (labels_row[start:end] != IGNORE_INDEX).nonzero()
    return int(tgt[0]) if len(tgt) and int(tgt[0]) > 0 else end - start


@register("loreft", paper="https://arxiv.org/abs/2404.03592")
class LoReFT(Method):
    trains = "low-rank interventions R, W, b on the first and last prompt positions of every layer"
    mergeable = False
    adapter_format = "tunelab"
    # the training rows' prompt boundaries; sharding (first/last prompt positions): tests/train/test_sharded_methods.py
    capabilities = Capabilities(calibrates_from_examples=True, supports_sharding=True)
    Config = LoReFTOptions

    def __init__(self, config=None):
        super().__init__(config)
        self._ctx: dict = {}
        self._handles: list = []
        self._rows: dict[tuple[int, ...], int] = {}  # real tokens of a training row -> its prompt length
        self._by_length: dict[int, list[tuple[tuple[int, ...], int]]] = {}  # the same rows by their length
        self.calibrated = False

    def _decoder_layers(self, model) -> torch.nn.ModuleList:
        inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        return inner.layers

    def prepare(self, model):
        c = self.config
        model.requires_grad_(False)
        wanted = resolve_layers(model, c.layers)
        d = int(model.config.hidden_size)
        spec = parse_positions(c.positions)
        two = spec is not None and spec[0] > 0 and spec[1] > 0 and not c.share_weights
        device = next(model.parameters()).device
        self._handles = [model.register_forward_pre_hook(self._capture, with_kwargs=True)]
        for i, layer in enumerate(self._decoder_layers(model)):
            if wanted is not None and i not in wanted:
                continue
            # fp32 whatever the model dtype
            layer.reft = LoReFTIntervention(d, c.r, c.orthogonal_map, c.start_unchanged).to(device)
            if two:  # the last positions get an intervention of their own
                layer.reft_last = LoReFTIntervention(d, c.r, c.orthogonal_map, c.start_unchanged).to(device)
            self._handles.append(layer.register_forward_hook(self._make_hook(layer)))
        return model

    # -- which positions: the training rows' prompts, then each top-level forward's masks ----------------
    def calibrate_from_examples(self, model, examples: list[dict], objective=None, *, pad_id: int = 0,
                                batch_size: int = 1) -> int:
        """Remember every encoded training row's tokens and prompt length (tokens before its first target);
        preference examples give their chosen and rejected rows. Returns the number of rows."""
        for ex in examples:
            for prefix in ("", "chosen_", "rejected_"):
                ids, lab = ex.get(f"{prefix}input_ids"), ex.get(f"{prefix}labels")
                if ids is not None and lab is not None:
                    self.remember(list(ids), list(lab))
        self.calibrated = True
        return len(self._rows)

    def remember(self, ids: list[int], labels: list[int]) -> None:
        key = tuple(int(t) for t in ids)
        p = prompt_length(torch.tensor(labels), 0, len(labels))
        self._rows[key] = p
        self._by_length.setdefault(len(key), []).append((key, p))

    def _prompt_of(self, row: tuple[int, ...]) -> int:
        """A training row's prompt length, found by its tokens; else by its length and prompt (a row whose
        response tokens were replaced); else the whole row (a prefill)."""
        if row in self._rows:
            return self._rows[row]
        for key, p in self._by_length.get(len(row), ()):
            if key[:p] == row[:p]:
                return p
        return len(row)

    def _capture(self, module, args, kwargs):
        """From the top-level forward: the [B, T] masks of the positions to intervene on (None = all)."""
        self._ctx = {"first": None, "last": None, "skip": False}
        spec = parse_positions(self.config.positions)
        if spec is None:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"][..., 0]
        att = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        cache_pos = kwargs.get("cache_position")
        past = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5: `cache` (generate passes it)
        cached = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
        if cached > 0 or (cache_pos is not None and cache_pos.numel() and int(cache_pos.flatten()[0]) > 0):
            self._ctx["skip"] = True  # a decoding step: generated tokens are never intervened on
            return
        t = ids.shape[-1]
        segs = segments(att if att is not None and att.dim() == 2 else None, kwargs.get("position_ids"), ids.shape)
        labels = kwargs.get("labels")
        lens = []
        for i, row in enumerate(segs):
            if labels is not None:
                lens.append([prompt_length(labels[i], s, e) for s, e in row])
            else:  # a training row (whatever its padding), else a prefill: every real token is prompt
                lens.append([self._prompt_of(tuple(ids[i, s:e].tolist())) if self._rows else e - s
                             for s, e in row])
        first, last = prompt_masks(segs, lens, t, *spec)
        self._ctx["first"], self._ctx["last"] = first.to(ids.device), last.to(ids.device)

    def _make_hook(self, layer):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output  # [B, T, d]
            ctx = self._ctx
            if ctx.get("skip"):
                return output
            if ctx.get("first") is None:  # positions: all
                new = layer.reft(h)
            elif hasattr(layer, "reft_last"):  # separate interventions for the first and the last positions
                new = torch.where(ctx["first"][..., None], layer.reft(h), h)
                new = torch.where(ctx["last"][..., None], layer.reft_last(h), new)
            else:
                new = torch.where((ctx["first"] | ctx["last"])[..., None], layer.reft(h), h)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    # -- training, state, export ------------------------------------------------------------------------
    def param_groups(self, model, weight_decay):
        if not self.calibrated and parse_positions(self.config.positions) is not None:
            raise RuntimeError("method loreft: positions are relative to each training row's prompt; call "
                               "method.calibrate_from_examples(model, train_examples, objective) before training "
                               "(the runner does), or use positions: all")
        # no weight decay: the neutral intervention is W = R, b = 0, not W = 0; R's parameter is unconstrained
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.0}]

    def trainable_state_dict(self, model):
        # parameters AND the orthogonal parametrisation's `base` buffer: R = f(original, base)
        return {n: t.detach() for n, t in model.state_dict(keep_vars=True).items() if ".reft" in n}

    def load_trainable_state_dict(self, model, state):
        load_named_tensors(model, state)

    def merged_model(self, model):
        raise ExportUnsupported(NOT_MERGEABLE)

    def _interventions(self, model):
        for i, layer in enumerate(self._decoder_layers(model)):
            for attr, key in (("reft", f"layers.{i}"), ("reft_last", f"layers.{i}.last")):
                if hasattr(layer, attr):
                    yield key, getattr(layer, attr)

    def save_adapter(self, model, directory: str) -> None:
        tensors = {}
        for key, iv in self._interventions(model):
            tensors[f"{key}.R"] = iv.rotate.weight.detach()  # [r, d]
            tensors[f"{key}.W"] = iv.learned_source.weight.detach()  # [r, d]
            tensors[f"{key}.b"] = iv.learned_source.bias.detach()  # [r]
        save_own_adapter(directory, self, model, tensors, {"rule": "h + R^T (W h + b - R h)"})

    @torch.no_grad()
    def load_adapter_tensors(self, model, tensors):
        for key, iv in self._interventions(model):
            iv.rotate.weight = tensors[f"{key}.R"].to(iv.learned_source.weight)
            iv.learned_source.weight.copy_(tensors[f"{key}.W"])
            iv.learned_source.bias.copy_(tensors[f"{key}.b"])

    def remove(self, model) -> None:
        """Detach the hooks and interventions (the model becomes the plain base model again)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for layer in self._decoder_layers(model):
            for attr in ("reft", "reft_last"):
                if hasattr(layer, attr):
                    delattr(layer, attr)
