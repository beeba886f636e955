"""mergekit's own configs through `tunelab merge`, compared tensor by tensor with mergekit's output.

The configs are mergekit's documented examples (examples/*.yml of arcee-ai/mergekit) with the model names
replaced by tiny random Llamas of 4 layers, plus variants for each piece of syntax: per-layer gradients,
filter-conditioned parameters, normalize / int8_mask / rescale / lambda, slices with layer_range, tokenizer_source.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from merge_helpers import _perturbed, _save_tokenizer, tiny_config
from safetensors.torch import load_file

mergekit = pytest.importorskip("mergekit")

LAYERS = 4


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """base + three fine-tunes (base + small noise), 4 layers, float32, with a tokenizer."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("mergekit_zoo")
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config(num_hidden_layers=LAYERS))
    sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    paths = {}
    for i, name in enumerate(["base", "m1", "m2", "m3"]):
        m = LlamaForCausalLM(tiny_config(num_hidden_layers=LAYERS))
        m.load_state_dict(sd if name == "base" else _perturbed(sd, seed=200 + i))
        paths[name] = root / name
        m.save_pretrained(paths[name])
        _save_tokenizer(paths[name])
    return paths


def _config(text: str, zoo: dict[str, Path], **changes) -> dict:
    for name, path in zoo.items():
        text = text.replace(f"<{name}>", str(path))
    return {**yaml.safe_load(text), **changes}


def _mergekit(config: dict, out: Path) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False, random_seed=0))
    return out


def _tunelab(config: dict, out: Path) -> Path:
    from tunelab.merging import run_merge

    return run_merge(config, out)


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    files = sorted(out.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def _compare(config: dict, tmp_path: Path, atol: float = 1e-6, ties_allowed: float = 0.0) -> dict[str, torch.Tensor]:
    """Every tensor equal within `atol`, except at most max(4, `ties_allowed` * size) entries of each."""
    theirs = _tensors(_mergekit(config, tmp_path / "mergekit"))
    ours = _tensors(_tunelab(config, tmp_path / "tunelab"))
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype, k
        if ties_allowed == 0.0:
            torch.testing.assert_close(ours[k].float(), theirs[k].float(), rtol=0, atol=atol, msg=k)
        else:
            off = int(((ours[k].float() - theirs[k].float()).abs() > atol).sum())
            assert off <= max(4, ties_allowed * theirs[k].numel()), (k, off)
    n_theirs = json.loads((tmp_path / "mergekit" / "config.json").read_text())["num_hidden_layers"]
    assert json.loads((tmp_path / "tunelab" / "config.json").read_text())["num_hidden_layers"] == n_theirs
    return ours


# ---- mergekit's documented examples, unchanged but for the model names ----------------------------------------

TIES_YML = """
models:
  - model: <m1>
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: <m2>
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: <m3>
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: <base>
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""

BIO_MERGE_YML = """
models:
  - model: <m1>
    parameters:
      density: 0.5
      weight: 0.5
  - model: <m2>
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: <base>
parameters:
  normalize: false
  int8_mask: true
dtype: float16
"""

LINEAR_YML = """
models:
  - model: <m1>
    parameters:
      weight: 1.0
  - model: <m2>
    parameters:
      weight: 0.3
  - model: <m3>
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
"""

PASSTHROUGH_YML = """
slices:
  - sources:
    - model: <m1>
      layer_range: [0, 3]
  - sources:
    - model: <m2>
      layer_range: [1, 4]
merge_method: passthrough
dtype: float16
"""

GRADIENT_SLERP_YML = """
slices:
  - sources:
      - model: <m1>
        layer_range: [0, 4]
      - model: <m2>
        layer_range: [0, 4]
merge_method: slerp
base_model: <m1>
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float16
"""

EXAMPLES = {"ties": TIES_YML, "bio-merge": BIO_MERGE_YML, "linear": LINEAR_YML,
            "orcamini-platy-44layer": PASSTHROUGH_YML, "gradient-slerp": GRADIENT_SLERP_YML}


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_mergekit_examples_equal_mergekit(example, zoo, tmp_path):
    """float16 as the examples say. Both read the inputs in float16; mergekit also computes in it, tunelab in
    float32 (rounding once at the end), so TIES' magnitude trim can keep a different entry where float16 task
    vectors tie or round across the threshold: measured 1-4 entries of 32-4096 per tensor; all others agree."""
    _compare(_config(EXAMPLES[example], zoo), tmp_path, atol=2e-3, ties_allowed=0.005)


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_mergekit_examples_in_float32_exactly(example, zoo, tmp_path):
    _compare(_config(EXAMPLES[example], zoo, dtype="float32"), tmp_path)


def test_passthrough_stacks_layers(zoo, tmp_path):
    ours = _compare(_config(PASSTHROUGH_YML, zoo, dtype="float32"), tmp_path)
    m1, m2 = _tensors(zoo["m1"]), _tensors(zoo["m2"])
    assert json.loads((tmp_path / "tunelab" / "config.json").read_text())["num_hidden_layers"] == 6
    k = "model.layers.{}.mlp.up_proj.weight"
    assert torch.equal(ours[k.format(2)], m1[k.format(2)]) and torch.equal(ours[k.format(3)], m2[k.format(1)])
    assert torch.equal(ours["model.embed_tokens.weight"], m1["model.embed_tokens.weight"])
    assert torch.equal(ours["model.norm.weight"], m2["model.norm.weight"])  # from the last slice
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "tunelab").config.num_hidden_layers == 6


# ---- each piece of syntax, float32 ----------------------------------------------------------------------------

VARIANTS = {
    "ties normalize false, rescale, lambda": """
models:
  - model: <m1>
    parameters: {density: [0.9, 0.2], weight: 0.7}
  - model: <m2>
    parameters: {density: 0.4, weight: [{filter: self_attn, value: [0.2, 1.4]}, {value: 0.6}]}
merge_method: ties
base_model: <base>
parameters: {normalize: false, rescale: true, lambda: 0.8, int8_mask: false}
dtype: float32
""",
    "task_arithmetic with filters, normalize and a listed base": """
models:
  - model: <base>
  - model: <m1>
    parameters: {weight: [{filter: mlp, value: 2.0}, {filter: "*", value: [0.5, 1.5]}]}
  - model: <m3>
    parameters: {weight: 0.5}
merge_method: task_arithmetic
base_model: <base>
parameters: {normalize: true, lambda: [1.0, 0.5]}
dtype: float32
""",
    "dare_ties without dropping (density 1), weighted sum": """
models:
  - model: <m1>
    parameters: {weight: 0.6}
  - model: <m2>
    parameters: {weight: [1.0, 0.2]}
merge_method: dare_ties
base_model: <base>
parameters: {density: 1.0}
dtype: float32
""",
    "slices with per-source and slice parameters": """
slices:
  - sources:
      - model: <base>
        layer_range: [0, 2]
      - model: <m1>
        layer_range: [0, 2]
        parameters: {weight: 0.3, density: 0.5}
      - model: <m2>
        layer_range: [2, 4]
        parameters: {density: 0.7}
    parameters: {weight: 2.0}
  - sources:
      - model: <base>
        layer_range: [2, 4]
      - model: <m1>
        layer_range: [2, 4]
        parameters: {density: [1.0, 0.1]}
      - model: <m2>
        layer_range: [0, 2]
        parameters: {weight: 0.5}
merge_method: ties
base_model: <base>
parameters: {weight: 1.0, density: 0.6}
dtype: float32
""",
    "tokenizer_source base": """
models:
  - model: <m1>
    parameters: {weight: 1.0}
  - model: <m2>
    parameters: {weight: [0.2, 1.0]}
merge_method: linear
tokenizer_source: base
base_model: <m1>
dtype: float32
""",
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_syntax_variants_equal_mergekit(name, zoo, tmp_path):
    _compare(_config(VARIANTS[name], zoo), tmp_path)


def test_tokenizer_source_copies_that_tokenizer(zoo, tmp_path):
    src = tmp_path / "tok_src"
    shutil.copytree(zoo["m3"], src)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 77}))
    config = _config(VARIANTS["tokenizer_source base"], zoo, tokenizer_source=str(src))
    out = _tunelab(config, tmp_path / "out")
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 77


def test_gradient_and_filter_values_by_hand():
    from tunelab.merging.recipe import evaluate_setting, load_recipe

    r = load_recipe(_config(TIES_YML, {}))
    # weight [0, 0.3, 0.7, 1] at layer 2 of 4 (t = 2/3): 0.3 + (0.7 - 0.3) * 0 = 0.7 (on the grid)
    assert r.weights("model.layers.2.mlp.up_proj.weight", 2 / 3)[1] == pytest.approx(0.7)
    assert r.weights("model.layers.1.self_attn.q_proj.weight", 1 / 3) == pytest.approx([1.0, 0.3, 0.0])
    assert r.weights("model.layers.1.mlp.up_proj.weight", 1 / 3)[2] == 0.5
    assert r.densities("x", 0.5)[0] == pytest.approx(0.7) and r.densities("x", 0.75)[0] == pytest.approx(0.4)
    assert evaluate_setting([True, False, False], "", 0.6) is False  # booleans are picked, not interpolated
    assert r.param("normalize", None) is True and r.param("rescale", None) is False  # ties defaults


@pytest.mark.parametrize("patch, field", [
    ({"modules": {}}, "modules"),
    ({"tokenizer": {"source": "base"}}, "tokenizer"),
    ({"chat_template": "auto"}, "chat_template"),
    ({"merge_method": "della"}, "merge_method"),
])
def test_unsupported_mergekit_keys_are_named(zoo, patch, field):
    from pydantic import ValidationError

    from tunelab.merging.recipe import load_recipe

    with pytest.raises(ValidationError) as err:
        load_recipe({**_config(BIO_MERGE_YML, zoo), **patch})
    assert field in str(err.value)


def test_pattern_key_is_refused_not_ignored(zoo):
    """Old examples spell the filter `pattern:`; mergekit ignores the key (every entry then matches). tunelab
    names it instead of silently merging with the first value everywhere."""
    from pydantic import ValidationError

    from tunelab.merging.recipe import load_recipe

    with pytest.raises(ValidationError, match="pattern"):
        load_recipe(_config(GRADIENT_SLERP_YML.replace("filter:", "pattern:"), zoo))


def test_differing_vocabularies_are_refused(zoo, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(zoo["m2"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {("x" + k if v == 5 else k): v for k, v in tok["model"]["vocab"].items()}
    (other / "tokenizer.json").write_text(json.dumps(tok))
    config = _config(VARIANTS["tokenizer_source base"], zoo)
    config["models"][1]["model"] = str(other)
    with pytest.raises(ValueError, match="vocabularies differ"):
        _tunelab({**config, "tokenizer_source": "union"}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dare_rescale_matches_l1_norm(zoo, tmp_path):
    """DARE masks are random (mergekit's and ours differ): check mergekit's rescale rule on ours instead, the
    L1 norm of each task vector kept through the drop."""
    from tunelab.merging.task_vectors import task_vector_merge

    torch.manual_seed(0)
    d = torch.randn(64, 32)
    g = torch.Generator().manual_seed(1)
    out = task_vector_merge([d], [1.0], [0.3], sparsify="random", rescale=True, generator=g)
    assert 0.2 < (out != 0).float().mean() < 0.4
    assert out.abs().sum().item() == pytest.approx(d.abs().sum().item(), rel=1e-5)
    plain = task_vector_merge([d], [1.0], [0.3], sparsify="random", rescale=False,
                                  generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain != 0, out != 0) and plain.abs().sum() < out.abs().sum()
