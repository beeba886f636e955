"""COLA (Chain of LoRA): train a LoRA, fold it into W, start a fresh LoRA, repeat, within one run.

Xia, Qin & Hazan 2024, https://arxiv.org/abs/2401.04151. Update rule: LoRA (W0 + s B A, s = alpha/r) for
`restart_every` steps; then W <- W + s B A, A <- fresh random, B <- 0 and the optimizer state of A and B is
zeroed (the new link starts like a new LoRA); `links` links in all, so the final model is W0 + sum_k s B_k A_k,
a sum of rank-r updates that need not be rank r.

Built on PEFT's LoRA (the merge is PEFT's `get_delta_weight`); A and B of each new link are the SAME Parameter
objects re-initialised in place, so the optimizer keeps its parameter list and only its state is reset (in
`on_step_end`, which gets the optimizer). A new link's A is drawn from a generator seeded by (seed, link index),
so it is identical on every process and on resume, independent of the training RNG.

Schedule: `restart_every` steps if set; else ceil(total_steps / links) once the run length is known (through
`on_train_start(model, total_steps)`, which the training loop calls before the first step); else every 100 steps, with a
warning. At most `links - 1` restarts happen. Defaults: LoRA's (r=16, alpha=32, seven linears) and links = 3, a
short chain (the paper ablates the chain length). The learning-rate schedule runs over the whole run, not per link.

Checkpoints carry the current link AND every merged link's (A, B); loading replays the merges on a freshly
prepared model with the same operations, so the base weights come back bit for bit.
Export: merged = every link folded in (PEFT merge_and_unload on the chain-carrying base). Adapter: the final
link alone does not represent the model, so the adapter export writes the TOTAL delta as one PEFT LoRA of rank
r * (merged links + 1): A = [A_1; ...; A_n] (stacked rows), B = [s B_1, ..., s B_n] (stacked columns), alpha =
rank (scale 1). That is exact (no SVD truncation) and PeftModel.from_pretrained loads it on the original base.
Caveat: PEFT's "adapter disabled" model is the chain-carrying base, not W0, so preference objectives need an
explicit reference (FrozenCopyReference) with COLA.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import torch
from pydantic import Field

from tunelab.methods._modules import reset_optimizer_state
from tunelab.methods.asymmetric_lora import lora_layers
from tunelab.methods.lora import LoRAOptions, PeftAdapterMethod, lora_peft_config
from tunelab.methods.registry import register

log = logging.getLogger(__name__)

DEFAULT_RESTART_EVERY = 100
CHAIN_PREFIX = "cola_chain."


class COLAOptions(LoRAOptions):
    links: int = Field(3, ge=1, description="Number of LoRA links in the chain (restarts = links - 1).")
    restart_every: int | None = Field(None, ge=1, description="Steps per link; None = total_steps / links.")
    seed: int = Field(0, description="Seed of the fresh links' A (with the link index).")


@register("cola", paper="https://arxiv.org/abs/2401.04151")
class ChainOfLoRA(PeftAdapterMethod):
    trains = "a chain of LoRAs, each merged into W before the next starts"
    Config = COLAOptions

    def __init__(self, config=None):
        super().__init__(config)
        # merged links, oldest first: {PEFT module name: (A [r, in], B [out, r])}
        self.chain: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        self.total_steps: int | None = None  # set by on_train_start
        self._warned = False

    def peft_config(self):
        if self.config.modules_to_save:
            raise ValueError("method cola: modules_to_save is not supported (those modules are not part of the chain)")
        return lora_peft_config(LoRAOptions(**self.config.model_dump(exclude={"links", "restart_every", "seed"})))

    # -- the chain -------------------------------------------------------------------------------------
    def restart_interval(self) -> int:
        if self.config.restart_every is not None:
            return self.config.restart_every
        if self.total_steps:
            return max(1, math.ceil(self.total_steps / self.config.links))
        if not self._warned:
            log.warning("cola: restart_every not set and the run length is unknown; restarting every %d steps",
                        DEFAULT_RESTART_EVERY)
            self._warned = True
        return DEFAULT_RESTART_EVERY

    def on_train_start(self, model, total_steps: int) -> None:
        """The run's length, for the default schedule (restart every ceil(total_steps / links) steps)."""
        self.total_steps = total_steps

    def on_step_end(self, model, step, optimizer):
        if step % self.restart_interval() == 0 and len(self.chain) + 1 < self.config.links:
            self.restart(model, optimizer)

    @torch.no_grad()
    def _merge_current(self, layers) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """W <- W + s B A for every LoRA layer (PEFT's delta); returns copies of the (A, B) merged."""
        link = {}
        for name, layer in layers:
            base = layer.get_base_layer()
            base.weight.add_(layer.get_delta_weight("default").to(base.weight.dtype))  # [out, in]
            link[name] = (layer.lora_A["default"].weight.detach().clone(),
                          layer.lora_B["default"].weight.detach().clone())
        return link

    @torch.no_grad()
    def restart(self, model, optimizer=None) -> None:
        """Fold the current link into the base, re-initialise A (seeded) and B (zero) in place, reset their state."""
        layers = lora_layers(model)
        self.chain.append(self._merge_current(layers))
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + len(self.chain))
        params = []
        for _, layer in layers:
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            fresh = torch.empty(a.shape, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=g)  # PEFT's LoRA init of A
            a.copy_(fresh)
            b.zero_()
            params += [a, b]
        if optimizer is not None:
            reset_optimizer_state(optimizer, params)

    # -- checkpoints -----------------------------------------------------------------------------------
    def trainable_state_dict(self, model):
        state = super().trainable_state_dict(model)
        for k, link in enumerate(self.chain):
            for name, (a, b) in link.items():
                state[f"{CHAIN_PREFIX}{k}.{name}.lora_A"] = a
                state[f"{CHAIN_PREFIX}{k}.{name}.lora_B"] = b
        return state

    def load_trainable_state_dict(self, model, state):
        if self.chain:
            raise RuntimeError("cola: load a checkpoint into a freshly prepared model (this one already carries "
                               f"{len(self.chain)} merged links)")
        links: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        rest = {}
        for key, t in state.items():
            if key.startswith(CHAIN_PREFIX):
                k, _, tail = key[len(CHAIN_PREFIX):].partition(".")
                name, _, which = tail.rpartition(".")
                links.setdefault(int(k), {}).setdefault(name, {})[which] = t
            else:
                rest[key] = t
        layers = lora_layers(model)
        with torch.no_grad():
            for k in sorted(links):  # replay the merges in order, with the same operations as the run
                for name, layer in layers:
                    layer.lora_A["default"].weight.copy_(links[k][name]["lora_A"])
                    layer.lora_B["default"].weight.copy_(links[k][name]["lora_B"])
                self.chain.append(self._merge_current(layers))
        super().load_trainable_state_dict(model, rest)

    def state_dict(self):
        return {"links_merged": len(self.chain)}

    def load_state_dict(self, state):
        n = state.get("links_merged")
        if n is not None and n != len(self.chain):
            raise RuntimeError(f"cola: the checkpoint's method state says {n} merged links, its tensors "
                               f"{len(self.chain)}")

    # -- export ----------------------------------------------------------------------------------------
    def save_adapter(self, model, directory: str) -> None:
        """The total delta sum_k s B_k A_k as one exact PEFT LoRA of rank r * (links so far + current)."""
        from safetensors.torch import save_file

        layers = lora_layers(model)
        tensors = {}
        rank = None
        for name, layer in layers:
            s = layer.scaling["default"]
            links = [link[name] for link in self.chain]
            links.append((layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()))
            a_cat = torch.cat([a for a, _ in links], dim=0)  # [R, in]
            b_cat = torch.cat([b * s for _, b in links], dim=1)  # [out, R]
            rank = a_cat.shape[0]
            tensors[f"{name}.lora_A.weight"] = a_cat.to("cpu").contiguous()
            tensors[f"{name}.lora_B.weight"] = b_cat.to("cpu").contiguous()
        cfg = copy.deepcopy(model.peft_config["default"])
        cfg.r, cfg.lora_alpha, cfg.use_rslora = rank, rank, False  # scale alpha/r = 1: s is folded into B
        cfg.rank_pattern, cfg.alpha_pattern, cfg.inference_mode = {}, {}, True
        Path(directory).mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(directory)
        save_file(tensors, str(Path(directory) / "adapter_model.safetensors"), metadata={"format": "pt"})
