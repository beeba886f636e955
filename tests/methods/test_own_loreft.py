"""LoReFT: the intervention by hand, R stays orthonormal, the count, and the paper's positions (the first and last
prompt tokens, pyreft's get_intervention_locations) in training, under a KV cache and with packed rows."""

import pytest
import torch
from test_own_common import base_model, batch, n_trainable, prepared, train

from tunelab.methods.loreft import LoReFTIntervention, prompt_masks, segments


def _set(iv: LoReFTIntervention, R, W, b):
    with torch.no_grad():
        iv.rotate.weight = torch.tensor(R)  # through the orthogonal parametrisation's right inverse
        iv.learned_source.weight.copy_(torch.tensor(W))
        iv.learned_source.bias.copy_(torch.tensor(b))


def test_intervention_by_hand():
    iv = LoReFTIntervention(d=3, r=1)
    _set(iv, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [2.0])
    # R h = 1, W h + b = 2 + 2 = 4, R^T (4 - 1) = [3, 0, 0]
    torch.testing.assert_close(iv(torch.tensor([[1.0, 2.0, 3.0]])), torch.tensor([[4.0, 2.0, 3.0]]))
    iv2 = LoReFTIntervention(d=3, r=2)
    _set(iv2, [[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [1.0, -1.0])
    # R h = [1.4, 1]; W h + b - R h = [-0.4, -2]; R^T [-0.4, -2] = [-0.24, -0.32, -2]
    torch.testing.assert_close(iv2(torch.tensor([[1.0, 1.0, 1.0]])), torch.tensor([[0.76, 0.68, -1.0]]))
    # default init (W = R, b = 0) is the identity
    iv3 = LoReFTIntervention(d=8, r=3)
    h = torch.randn(4, 8)
    torch.testing.assert_close(iv3(h), h, rtol=0, atol=1e-6)


def test_count_and_rotation_stays_orthonormal():
    method, model = prepared("loreft", {"r": 2, "layers": [-1], "positions": "all"})
    d = model.config.hidden_size
    assert n_trainable(model) == 2 * 2 * d + 2  # R [r, d] (its unconstrained parameter), W [r, d], b [r]
    _, every = prepared("loreft", {"r": 4})
    assert n_trainable(every) == 2 * (2 * 4 * d + 4)  # defaults: every layer, one shared intervention each
    _, two = prepared("loreft", {"r": 4, "share_weights": False})
    assert n_trainable(two) == 2 * 2 * (2 * 4 * d + 4)  # first and last positions get one each
    assert not hasattr(model.model.layers[0], "reft") and hasattr(model.model.layers[1], "reft")
    state = method.trainable_state_dict(model)
    assert any(k.endswith("parametrizations.weight.0.base") for k in state)  # R's value depends on this buffer
    R0 = model.model.layers[1].reft.rotate.weight.detach().clone()
    train(method, model, steps=4, lr=5e-2)
    R = model.model.layers[1].reft.rotate.weight.detach()
    assert not torch.allclose(R, R0)
    torch.testing.assert_close(R @ R.T, torch.eye(2), rtol=0, atol=1e-5)


def pyreft_locations(prompt_len: int, first: int, last: int) -> tuple[list[int], list[int]]:
    """pyreft's get_intervention_locations (share_weights) re-stated: first_n = min(P // 2, f), last_n = min(P // 2,
    l); positions [0, first_n) and [P - last_n, P)."""
    nf, nl = min(prompt_len // 2, first), min(prompt_len // 2, last)
    return list(range(nf)), list(range(prompt_len - nl, prompt_len))


@pytest.mark.parametrize("prompt_len", [1, 5, 10, 14, 20])
def test_prompt_masks_are_pyrefts_locations(prompt_len):
    first, last = prompt_masks([[(2, 2 + prompt_len + 3)]], [[prompt_len]], 30, 7, 7)  # 2 pads on the left
    f, l_ = pyreft_locations(prompt_len, 7, 7)
    assert first[0].nonzero().flatten().tolist() == [2 + i for i in f]
    assert last[0].nonzero().flatten().tolist() == [2 + i for i in l_]
    assert not (first & last).any()


def test_segments_of_padded_and_packed_rows():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert segments(mask, None, mask.shape) == [[(2, 5)], [(0, 3)]]
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])  # three packed documents
    assert segments(None, pos, pos.shape) == [[(0, 3), (3, 5), (5, 8)]]


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))


def _by_hand(method, model, ids, positions: dict[str, list[list[int]]]):
    """Logits with the method's hooks off and each layer's interventions applied by hand at `positions`
    ({"reft": [[row 0 positions], ...], "reft_last": ...})."""
    for h in method._handles:
        h.remove()
    handles = []

    def hook_for(layer):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            new = h.clone()
            for attr, rows in positions.items():
                for i, pos in enumerate(rows):
                    if pos:
                        new[i, pos] = getattr(layer, attr)(h[i, pos])
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    for layer in method._decoder_layers(model):
        handles.append(layer.register_forward_hook(hook_for(layer)))
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()


def test_default_intervenes_on_the_first_and_last_prompt_tokens_only():
    """Defaults (f7+l7, every layer, shared weights): a training forward with a 20-token prompt and 6 response
    tokens edits positions 0-6 and 13-19 only; the old default (every position) fails this."""
    method, model = prepared("loreft", {})
    _perturb(model)
    ids = batch(shape=(1, 26))
    labels = ids.clone()
    labels[:, :20] = -100
    with torch.no_grad():
        got = model(input_ids=ids, labels=labels).logits  # labels given to the forward
    f, l_ = pyreft_locations(20, 7, 7)
    want = _by_hand(method, model, ids, {"reft": [f + l_]})
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_separate_first_and_last_interventions_and_the_training_rows():
    """share_weights false: the first positions use `reft`, the last `reft_last`. The prompt boundary comes from
    the encoded training examples read before prepare (calibrate_from_examples), right-padded rows included."""
    ids = batch(shape=(2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # row 1: 9 real tokens
    examples = [{"input_ids": ids[0].tolist(), "labels": [-100] * 8 + ids[0, 8:].tolist()},  # prompt 8 tokens
                {"input_ids": ids[1, :9].tolist(), "labels": [-100] * 5 + ids[1, 5:9].tolist()}]  # prompt 5
    method, model = prepared("loreft", {"positions": "f3+l2", "share_weights": False}, examples=examples)
    _perturb(model)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    firsts = [pyreft_locations(8, 3, 2)[0], pyreft_locations(5, 3, 2)[0]]
    lasts = [pyreft_locations(8, 3, 2)[1], pyreft_locations(5, 3, 2)[1]]
    # the hand computation runs without the mask: compare the real tokens (causal, right padding)
    want = _by_hand(method, model, ids, {"reft": firsts, "reft_last": lasts})
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1, :9], want[1, :9], rtol=0, atol=1e-5)


def test_training_forward_and_cached_generation_agree():
    """The prompt's edits are the same whether the prompt is followed by its response (training, labels known)
    or generated from (a prefill, then decoding steps that are never intervened on)."""
    method, model = prepared("loreft", {})
    _perturb(model)
    ids = batch(shape=(1, 24))
    labels = ids.clone()
    labels[:, :18] = -100
    with torch.no_grad():
        full = model(input_ids=ids, labels=labels).logits  # [1, 24, V]
        out = model(input_ids=ids[:, :18], use_cache=True)  # prefill = the prompt
        past, steps = out.past_key_values, [out.logits[:, -1]]
        for k in range(18, 23):
            o = model(input_ids=ids[:, k: k + 1], past_key_values=past, use_cache=True)
            past = o.past_key_values
            steps.append(o.logits[:, -1])
        base = base_model()(input_ids=ids).logits
    torch.testing.assert_close(out.logits[0], full[0, :18], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.stack(steps, 1)[0], full[0, 17:23], rtol=0, atol=1e-5)
    assert not torch.allclose(full[0, 20], base[0, 20], atol=1e-3)  # the response sees the edited prompt
    with torch.no_grad():  # HF generate (its `cache` argument): the same greedy tokens as the forward above
        gen = model.generate(input_ids=ids[:, :18], max_new_tokens=6, do_sample=False)[0, 18:]
        tokens, seq = [], ids[:, :18]
        for _ in range(6):  # greedy by hand, with labels marking the first 18 tokens as the prompt
            lab = seq.clone()
            lab[:, :18] = -100
            nxt = model(input_ids=seq, labels=lab).logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(nxt))
            seq = torch.cat([seq, nxt], 1)
    assert gen.tolist() == tokens
    method.remove(model)  # hooks and interventions gone: the base model again
    assert not any(".reft" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=0)


def test_repadded_rows_find_their_prompt_by_their_tokens():
    """A preference objective concatenates and re-pads a pair's rows: a row is matched by its real tokens; a row
    whose response tokens were replaced (Masked Thought) by its length and prompt."""
    ids = batch(shape=(1, 10))
    examples = [{"chosen_input_ids": ids[0].tolist(), "chosen_labels": [-100] * 6 + ids[0, 6:].tolist(),
                 "rejected_input_ids": [5, 6, 7], "rejected_labels": [-100, 6, 7]}]
    method, model = prepared("loreft", {"positions": "f2+l2"}, examples=examples)
    _perturb(model)
    wide = torch.cat([ids, torch.zeros(1, 4, dtype=ids.dtype)], 1)
    mask = torch.cat([torch.ones(1, 10, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], 1)
    masked = ids.clone()
    masked[0, 7:9] = 0  # two response tokens replaced
    with torch.no_grad():
        got = model(input_ids=wide, attention_mask=mask).logits[:, :10]
        got_masked = model(input_ids=masked).logits
    f, l_ = pyreft_locations(6, 2, 2)
    both = _by_hand(method, model, torch.cat([ids, masked]), {"reft": [f + l_, f + l_]})  # hooks off from here
    torch.testing.assert_close(got, both[:1], rtol=0, atol=1e-5)
    torch.testing.assert_close(got_masked, both[1:], rtol=0, atol=1e-5)


def test_training_needs_the_rows_prompts():
    from tunelab.methods.registry import build_method

    method = build_method("loreft", {})
    model = method.prepare(base_model())
    with pytest.raises(RuntimeError, match="calibrate_from_examples"):
        method.param_groups(model, 0.0)
    everywhere = build_method("loreft", {"positions": "all"})
    assert everywhere.param_groups(everywhere.prepare(base_model()), 0.0)[0]["params"]


def test_adapter_file_holds_R_W_b(tmp_path):
    from tunelab.methods._modules import read_own_adapter

    method, model = prepared("loreft", {"r": 2})
    method.save_adapter(model, str(tmp_path))
    meta, tensors = read_own_adapter(tmp_path)
    assert meta["method"] == "loreft" and meta["rule"] == "h + R^T (W h + b - R h)"
    assert {k: tuple(v.shape) for k, v in tensors.items() if k.startswith("layers.0.")} == {
        "layers.0.R": (2, 64), "layers.0.W": (2, 64), "layers.0.b": (2,)}
