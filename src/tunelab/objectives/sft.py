"""Supervised fine-tuning: token-level cross-entropy on the tokens the loss mask selects, and its variants.

The loss mask (completion only, all assistant turns, or the full sequence) is decided when the data
is encoded (`tunelab.data.encode`): positions that carry no loss have label -100. Every objective here
returns the SUM of per-token losses and the number of target tokens (unit: token); the loop divides by
the number of target tokens of the whole global batch.

`sft` takes options that compose (all off by default, in which case it is plain cross-entropy):

  per-token loss  l_t = w_t * d_t * CE_t + kl_coef * KL_t        (t over target tokens, labels != -100)
    w_t   data weight, batch["loss_weights"][:, t] when the batch carries it (token-weighted CE,
          weighted instruction modelling); 1 otherwise
    d_t   DFT weight sg(p(y_t | y_<t, x)) when `dft` is on; 1 otherwise
    KL_t  KL between the reference's and the policy's next-token distributions (ASFT's anchor)
  input side (training only, i.e. when `model.training`):
    masked_thought_p  response tokens of the INPUT replaced by a mask token with probability p
    neftune_alpha     uniform noise on the input embeddings (a forward hook on the embedding layer,
                      installed for this forward only)

The registered presets `dft`, `asft`, `neftune`, `masked_thought` and `weighted_sft` are `sft` with
other defaults (and their paper); any option can be combined with any preset. The per-token building
blocks are the pure functions of `tunelab.objectives.sft_variants`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from tunelab.core.constants import IGNORE_INDEX
from tunelab.core.unwrap import unwrap_model
from tunelab.objectives.base import Objective, ObjectiveOptions, ObjectiveOutput, register_objective
from tunelab.train.chunked_ce import causal_lm_loss, naive_causal_lm_loss


def shifted_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token CE of next-token prediction.

    logits [B, T, V] predict position t+1 from position t, so logits[:, :-1] pair with labels[:, 1:].
    Returns (losses [B, T-1] in fp32, zero where ignored; mask [B, T-1] bool).
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    losses = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)
    return losses, mask


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of a batch that the model's forward takes (packed batches carry position_ids and where each
    document sits, no mask: transformers passes the extra keys down to the attention function, where tunelab's
    kernel uses them and the others ignore them).

    Call the model with `use_cache=False` too: with a KV cache object present, transformers does not
    detect packed rows from the position ids and lets documents attend to each other.
    """
    keys = ("input_ids", "attention_mask", "position_ids", "document_index", "document_slot")
    return {k: batch[k] for k in keys if k in batch}


def count_target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Number of tokens that carry loss in a batch of labels [B, T] (the first position never does)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


# ----------------------------------------------------------------------------------------------
# Options and helpers of the variants
# ----------------------------------------------------------------------------------------------


class SFTOptions(ObjectiveOptions):
    """Options of `sft` and its presets. All off by default: plain token-mean cross-entropy."""

    dft: bool = False  # scale each token's CE by its own detached probability (DFT)
    kl_coef: float = Field(0.0, ge=0)  # weight of the per-token KL anchor to the reference (ASFT when dft is on)
    kl_direction: Literal["forward", "reverse"] = "forward"  # forward: KL(p_ref || p_policy), as ASFT's code
    neftune_alpha: float = Field(0.0, ge=0)  # NEFTune noise scale (the paper uses 5, 10, 15); 0 = off
    masked_thought_p: float = Field(0.0, ge=0, le=1)  # probability of masking a response token in the input
    mask_token_id: int | None = Field(None, ge=0)  # Masked Thought's mask token; None: the pad (else eos) id
    loss_weights: Literal["auto", "required", "ignore"] = "auto"  # use batch["loss_weights"] if present / must / never
    chunk_size: int = Field(256, ge=0)  # tokens per chunk of the output projection + CE (plain SFT); 0 = full logits
    # 256: faster than 1024 on CPU (the [C, V] buffers stay in cache) and 4x less logits memory (docs/engine.md)


@contextmanager
def neftune_hook(model: torch.nn.Module, alpha: float, mask: torch.Tensor | None):
    """Add NEFTune noise to the input-embedding output while the context is open; the hook is removed after.

    The noise is drawn only when the embedding module is in training mode, so a reference or
    evaluation pass run inside the context (eval mode) sees clean embeddings. mask: [B, T] real tokens.
    """
    from tunelab.objectives.sft_variants import neftune_noise

    emb = unwrap_model(model).get_input_embeddings()

    def hook(module, args, output):  # output: [B, T, d]
        return neftune_noise(output, alpha, mask, training=module.training)

    handle = emb.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def mask_token_for(model: torch.nn.Module, configured: int | None) -> int:
    """Masked Thought's mask id: the option, else the model's pad id, else its eos id (the authors use [pad])."""
    if configured is not None:
        return configured
    cfg = getattr(unwrap_model(model), "config", None)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(cfg, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    raise ValueError("masked_thought_p > 0 needs objective.mask_token_id: the model config has no pad or eos id")


def reference_logits(model: torch.nn.Module, ref, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [B, T, V] of the reference model, without gradient and with dropout off.

    `ref` is a `Reference` of `tunelab.objectives.preference` (or anything with a `.model`); None means
    the policy's own base with its PEFT adapter disabled (no second copy of the weights).
    """
    from tunelab.objectives.references import AdapterDisabledReference, default_reference, eval_mode

    reference = default_reference(model, ref)
    ref_model = getattr(reference, "model", None)
    if ref_model is None:
        raise ValueError("the KL anchor needs a reference with a `.model` "
                         "(AdapterDisabledReference, FrozenCopyReference)")
    with torch.no_grad(), eval_mode(ref_model):
        if isinstance(reference, AdapterDisabledReference):
            with ref_model.disable_adapter():
                return ref_model(**inputs, use_cache=False).logits
        return ref_model(**inputs, use_cache=False).logits


# ----------------------------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------------------------


@register_objective("sft")
class SFT(Objective):
    """Next-token cross-entropy on the masked-in tokens, with the composable variants above. Unit: token.

    With every option off and no `loss_weights` in the batch this is plain cross-entropy, computed
    chunk by chunk (`chunk_size`, `tunelab.train.chunked_ce`) so the full logits are never materialised;
    the variants need full logits [B, T, V]. Logged per token (variants only): `ce` (the
    unweighted cross-entropy, comparable across variants), `dft_weight` (mean p of the targets), `kl`.
    """

    Config = SFTOptions
    config: SFTOptions  # the validated options, typed
    unit = "token"

    def reference_use(self) -> str:
        return "live" if self.config.kl_coef > 0 else "none"

    def _data_weights(self, batch) -> torch.Tensor | None:
        mode = self.config.loss_weights
        if mode == "ignore":
            return None
        w = batch.get("loss_weights")
        if w is None:
            if mode == "required":
                raise ValueError(f"objective {self.name!r} needs per-token `loss_weights` in the batch; the data "
                                 "has none (see docs/objectives.md, token-weighted CE)")
            return None
        if w.shape != batch["labels"].shape:
            raise ValueError(f"loss_weights {tuple(w.shape)} and labels {tuple(batch['labels'].shape)} differ")
        return w

    def compute(self, model, batch, ref=None) -> ObjectiveOutput:
        cfg = self.config
        weights = self._data_weights(batch)
        plain = not (cfg.dft or cfg.kl_coef > 0 or cfg.neftune_alpha > 0 or cfg.masked_thought_p > 0)
        if plain and weights is None:
            # chunked output projection + CE: full [tokens, vocab] logits are never materialised
            inputs: dict[str, Any] = model_inputs(batch)
            loss_fn = causal_lm_loss if cfg.chunk_size else naive_causal_lm_loss
            loss_sum, n_tokens = loss_fn(model, inputs.pop("input_ids"), inputs.pop("attention_mask", None),
                                         batch["labels"], chunk_size=cfg.chunk_size or 1024, **inputs)
            return ObjectiveOutput(loss_sum=loss_sum, n_units=n_tokens, metrics={})
        return self._compute_variant(model, batch, ref, weights)

    def _compute_variant(self, model, batch, ref, weights) -> ObjectiveOutput:
        from tunelab.objectives.distill import token_kl
        from tunelab.objectives.sft_variants import masked_thought

        cfg = self.config
        labels = batch["labels"]  # [B, T]
        inputs = model_inputs(batch)
        if cfg.masked_thought_p > 0 and model.training:  # corrupt the input only; targets stay the labels
            inputs["input_ids"] = masked_thought(inputs["input_ids"], labels, cfg.masked_thought_p,
                                                 mask_token_for(model, cfg.mask_token_id))
        ref_logits = reference_logits(model, ref, inputs) if cfg.kl_coef > 0 else None  # [B, T, V], clean embeds
        if cfg.neftune_alpha > 0:
            real = batch.get("attention_mask", batch.get("real_token_mask"))
            with neftune_hook(model, cfg.neftune_alpha, real):
                logits = model(**inputs, use_cache=False).logits  # [B, T, V]
        else:
            logits = model(**inputs, use_cache=False).logits
        losses, mask = shifted_token_losses(logits, labels)  # [B, T-1] fp32, zero where ignored
        token_loss = losses
        metrics = {"ce": losses.detach().sum()}
        if cfg.dft:
            p = torch.exp(-losses.detach()) * mask  # [B, T-1] = sg(p(y_t)), 0 off-target
            token_loss = token_loss * p
            metrics["dft_weight"] = p.sum()
        if weights is not None:
            token_loss = token_loss * weights[:, 1:].to(token_loss.dtype)
        loss_sum = token_loss.sum()
        if ref_logits is not None:
            v = min(logits.size(-1), ref_logits.size(-1))
            kl = token_kl(logits[:, :-1, :v], ref_logits[:, :-1, :v].to(logits.device), mask,
                          direction=cfg.kl_direction)  # [N target tokens]
            loss_sum = loss_sum + cfg.kl_coef * kl.sum()
            metrics["kl"] = kl.detach().sum()
        return ObjectiveOutput(loss_sum=loss_sum, n_units=mask.sum(), metrics=metrics)


class DFTOptions(SFTOptions):
    dft: bool = True


@register_objective("dft", paper="https://arxiv.org/abs/2508.05629")
class DFT(SFT):
    """Dynamic Fine-Tuning: l_t = sg(p(y_t)) * CE_t, the token mean over targets. `sft` with dft=true."""

    Config = DFTOptions
    config: DFTOptions  # the validated options, typed


class ASFTOptions(SFTOptions):
    dft: bool = True
    kl_coef: float = Field(0.1, ge=0)  # LLaMA-Factory's default asft_alpha (ASFT merged there by its authors)


@register_objective("asft", paper="https://arxiv.org/abs/2509.23753")
class ASFT(SFT):
    """Anchored SFT: DFT + kl_coef * KL(p_ref || p_policy) per target token. Reference: the adapter-disabled
    base (PEFT) or the `ref` passed to the loop."""

    Config = ASFTOptions
    config: ASFTOptions  # the validated options, typed


class NEFTuneOptions(SFTOptions):
    neftune_alpha: float = Field(5.0, ge=0)  # the paper's smallest setting, the usual default


@register_objective("neftune", paper="https://arxiv.org/abs/2310.05914")
class NEFTune(SFT):
    """SFT with noisy input embeddings: + alpha/sqrt(L d) * U(-1, 1) during training only."""

    Config = NEFTuneOptions
    config: NEFTuneOptions  # the validated options, typed


class MaskedThoughtOptions(SFTOptions):
    masked_thought_p: float = Field(0.4, ge=0, le=1)  # the authors' GSM8K max_mask_rate (no warm-up here)


@register_objective("masked_thought", paper="https://arxiv.org/abs/2403.02178")
class MaskedThought(SFT):
    """SFT with a fraction p of the response tokens replaced by a mask token in the input (targets unchanged)."""

    Config = MaskedThoughtOptions
    config: MaskedThoughtOptions  # the validated options, typed


class WeightedSFTOptions(SFTOptions):
    loss_weights: Literal["auto", "required", "ignore"] = "required"


@register_objective("weighted_sft")
class WeightedSFT(SFT):
    """Token-weighted CE: l_t = loss_weights[t] * CE_t (per-token weights from the data), token mean."""

    Config = WeightedSFTOptions
    config: WeightedSFTOptions  # the validated options, typed
