"""Each strategy's extra loss (or rule) on a tiny hand case, and how terms reach the training loop."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from tunelab.continual.strategies import StrategyObjective, build_strategy
from tunelab.continual.strategies.base import Strategy, StreamContext
from tunelab.objectives.base import Objective, ObjectiveOutput


class Scalar(torch.nn.Module):
    """A 'model' with named parameters a [2] and b [1]."""

    def __init__(self, a=(1.0, 2.0), b=(3.0,)):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.b = torch.nn.Parameter(torch.tensor(b))

    def get_input_embeddings(self):  # marks it as an unwrapped model
        return None


class SquareObjective(Objective):
    """loss_sum = sum_i (a0 * x_i)^2 over the batch's examples; unit: example."""

    unit = "example"

    def compute(self, model, batch, ref=None):
        x = batch["input_ids"]  # [n] example values (the loop counts examples by input_ids)
        return ObjectiveOutput(loss_sum=((model.a[0] * x) ** 2).sum(), n_units=torch.tensor(len(x)))


class ConstantTerm(Strategy):
    name = "const"

    def loss_terms(self, model, batch):
        return {"p": model.a[0] ** 2}  # a per-step penalty P = a0^2


def test_terms_added_per_unit_give_exactly_the_penalty_gradient_through_the_loop():
    """Two micro-batches of 1 and 3 examples: the step's gradient must be that of mean_i (a0 x_i)^2 + a0^2."""
    from accelerate import Accelerator

    from tunelab.train.backends import DDPBackend
    from tunelab.train.loop import forward_backward

    model = Scalar()
    micro = [{"input_ids": torch.tensor([1.0])}, {"input_ids": torch.tensor([2.0, 3.0, 4.0])}]
    obj = StrategyObjective(SquareObjective(), [ConstantTerm()])
    model.train()
    step = forward_backward(model, obj, micro, DDPBackend(Accelerator(cpu=True)), "fp32")
    metrics, units = step.metric_sums, step.global_units
    a0, xs = 1.0, [1.0, 2.0, 3.0, 4.0]
    # d/da0 [ (1/4) sum (a0 x)^2 + a0^2 ] = (1/4) sum 2 a0 x^2 + 2 a0
    assert model.a.grad[0].item() == pytest.approx(sum(2 * a0 * x * x for x in xs) / 4 + 2 * a0)
    assert units == 4 and metrics["const/p"] / units == pytest.approx(a0 ** 2)  # logged per unit: P itself
    model.eval()  # held-out losses carry no strategy term
    assert obj.compute(model, micro[0]).loss_sum.item() == pytest.approx(1.0)


def test_ewc_penalty_fisher_and_online_update_by_hand():
    from tunelab.continual.strategies.ewc import diagonal_fisher, quadratic_penalty

    model = Scalar(a=(1.0, 2.0))
    fisher = {"a": torch.tensor([0.5, 2.0])}
    anchor = {"a": torch.tensor([0.0, 0.0])}
    # sum F (theta - theta*)^2 = 0.5 * 1 + 2 * 4 = 8.5
    assert quadratic_penalty({"a": model.a}, anchor, fisher).item() == pytest.approx(8.5)
    ewc = build_strategy("ewc", {"weight": 2.0})
    ewc.params, ewc.terms = {"a": model.a}, [(fisher, anchor)]
    assert ewc.loss_terms(model, {})["penalty"].item() == pytest.approx(0.5 * 2.0 * 8.5)
    # empirical Fisher: per-example loss (a0 x)^2 has gradient 2 a0 x^2 -> x=1: 2, x=2: 8 (a0 = 1);
    # mean of squares = (4 + 64) / 2 = 34; a1 has no gradient
    f = diagonal_fisher(model, SquareObjective(),
                        [{"input_ids": torch.tensor([1.0])}, {"input_ids": torch.tensor([2.0])}],
                        {"a": model.a})
    assert f["a"].tolist() == pytest.approx([34.0, 0.0])
    assert model.a.grad is None  # no gradient left behind
    # online: F <- decay * F_old + F_new, anchor replaced; offline: one term per stage
    on = build_strategy("ewc", {"online": True, "decay": 0.5})
    on.update({"a": torch.tensor([1.0, 1.0])}, {"a": torch.tensor([0.0, 0.0])})
    on.update({"a": torch.tensor([3.0, 0.0])}, {"a": torch.tensor([1.0, 1.0])})
    assert len(on.terms) == 1 and on.terms[0][0]["a"].tolist() == [3.5, 0.5]
    assert on.terms[0][1]["a"].tolist() == [1.0, 1.0]
    off = build_strategy("ewc", {"online": False})
    off.update({"a": torch.tensor([1.0, 1.0])}, {"a": torch.tensor([0.0, 0.0])})
    off.update({"a": torch.tensor([3.0, 0.0])}, {"a": torch.tensor([1.0, 1.0])})
    off.params = {"a": model.a}  # theta = [1, 2]: 1*1 + 1*4 + 3*0 + 0*1 = 5
    assert len(off.terms) == 2 and off.loss_terms(model, {})["penalty"].item() == pytest.approx(0.5 * 1000 * 5)


def test_l2_pulls_towards_the_previous_stage():
    model = Scalar(a=(1.0, 2.0), b=(3.0,))
    l2 = build_strategy("l2", {"weight": 4.0})
    l2.before_stage(None, model, 0)
    assert l2.loss_terms(model, {}) == {}  # nothing to hold on to in the first stage
    l2.before_stage(None, model, 1)
    with torch.no_grad():
        model.a += torch.tensor([1.0, -2.0])
    assert l2.loss_terms(model, {})["penalty"].item() == pytest.approx(0.5 * 4.0 * (1 + 4))


class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, **kw):
        return SimpleNamespace(logits=self.logits)


def test_lwf_kl_by_hand():
    from tunelab.continual.strategies.lwf import lwf_kl

    # one target token (position 0 predicts position 1); V = 2
    teacher = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])
    student = torch.tensor([[[math.log(3.0), 0.0], [-5.0, 5.0]]])
    labels = torch.tensor([[-100, 1]])
    # T = 1: p_t = (1/2, 1/2), p_s = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    assert lwf_kl(student, teacher, labels, 1.0).item() == pytest.approx(0.5 * math.log(4 / 3))
    # T = 2: p_s = (sqrt3, 1) / (sqrt3 + 1); times T^2
    s = math.sqrt(3.0)
    want = 4 * (0.5 * math.log(0.5 * (s + 1) / s) + 0.5 * math.log(0.5 * (s + 1)))
    assert lwf_kl(student, teacher, labels, 2.0).item() == pytest.approx(want)
    lwf = build_strategy("lwf", {"weight": 3.0, "temperature": 1.0})
    lwf.teacher = FixedLogits(teacher)
    batch = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": labels}
    assert lwf.loss_terms(FixedLogits(student), batch)["kl"].item() == pytest.approx(1.5 * math.log(4 / 3))


def test_olora_orthogonality_by_hand_and_on_a_peft_model(tiny_model):
    from tunelab.continual.strategies.olora import orthogonality
    from tunelab.methods.registry import build_method

    old = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[-1.0, 1.0]])]
    new = torch.tensor([[1.0, 2.0]])
    # |[[1],[2]]| + |[[1]]| = 3 + 1
    assert orthogonality(old, new).item() == pytest.approx(4.0)

    method = build_method("lora", {"r": 2, "alpha": 4, "target_modules": ["q_proj"]})
    model = method.prepare(tiny_model)
    olora = build_strategy("olora", {"lambda_1": 0.5, "lambda_2": 0.1})
    ctx = SimpleNamespace(recipe=SimpleNamespace(base=SimpleNamespace(method=SimpleNamespace(name="lora"))))
    olora.check(ctx)
    model = olora.prepare_stage(ctx, model, 1)
    olora.before_stage(ctx, model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".task1." in n for n in trainable)
    assert sorted(model.base_model.active_adapters) == ["default", "task1"]
    params = dict(model.named_parameters())
    want, l2 = 0.0, 0.0
    for i in range(2):  # two decoder layers, q_proj in each
        pre = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        a0, a1 = params[f"{pre}.lora_A.default.weight"], params[f"{pre}.lora_A.task1.weight"]
        want += (a0 @ a1.T).abs().sum().item()
        l2 += a1.norm().item() + params[f"{pre}.lora_B.task1.weight"].norm().item()
    terms = olora.loss_terms(model, {})
    assert terms["orth"].item() == pytest.approx(0.5 * want, rel=1e-5)
    assert terms["l2"].item() == pytest.approx(0.1 * l2, rel=1e-5)
    terms["orth"].backward()  # the penalty moves the new A only
    assert params["base_model.model.model.layers.0.self_attn.q_proj.lora_A.task1.weight"].grad is not None
    assert params["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"].grad is None


def test_ilora_ema_and_slow_weights_at_evaluation():
    from tunelab.continual.strategies.ilora import ema_update

    slow = {}
    ema_update(slow, {"w": torch.tensor([1.0])}, 0.9)
    assert slow["w"].item() == 1.0  # starts at the fast weights
    ema_update(slow, {"w": torch.tensor([3.0])}, 0.9)
    assert slow["w"].item() == pytest.approx(0.9 * 1 + 0.1 * 3)
    ema_update(slow, {"w": torch.tensor([3.0])}, 0.9)
    assert slow["w"].item() == pytest.approx(0.9 * 1.2 + 0.1 * 3)

    model = Scalar(a=(1.0, 1.0))
    il = build_strategy("ilora", {"decay": 0.5})
    il.before_stage(None, model, 0)
    with torch.no_grad():
        model.a.fill_(3.0)
    il.on_step(model, 1)  # slow = 0.5 * 1 + 0.5 * 3 = 2
    with il.eval_weights(model):
        assert model.a.tolist() == [2.0, 2.0]
    assert model.a.tolist() == [3.0, 3.0]  # the fast weights go on training
    il.finish(None, model)
    assert model.a.tolist() == [2.0, 2.0]


def test_ilora_consistency_loss_is_the_codes_mse_against_the_elementwise_max():
    """ILORA.py: reg = where(plastic > stable, plastic, stable); l_cons = mean(MSE(plastic, reg)) over the
    concatenated hidden states of every layer; the EMA coefficient is min(1 - 1/(step + 1), ema_alpha)."""
    from tunelab.continual.strategies.ilora import consistency_loss, ema_decay

    fast = (torch.tensor([[[1.0, -2.0], [0.5, 3.0]]]), torch.tensor([[[0.0, 0.0], [1.0, 1.0]]]))
    slow = (torch.tensor([[[2.0, -3.0], [0.5, 4.0]]]), torch.tensor([[[-1.0, 2.0], [1.5, 0.0]]]))
    reg = [torch.where(p > s, p, s) for p, s in zip(fast, slow)]
    code = torch.cat([torch.nn.functional.mse_loss(p, r, reduction="none") for p, r in zip(fast, reg)]).mean()
    assert consistency_loss(fast, slow).item() == pytest.approx(code.item())
    assert code.item() == pytest.approx((1 + 0 + 0 + 1 + 0 + 4 + 0.25 + 0) / 8)
    mask = torch.tensor([[1, 0]])  # the second token is a pad: left out
    assert consistency_loss(fast, slow, mask).item() == pytest.approx((1 + 0 + 0 + 4) / 4)
    assert [ema_decay(t, 0.25) for t in (1, 2, 10)] == [0.25, 0.25, 0.25] and ema_decay(1, 0.9) == 0.5


def test_ilora_replays_with_the_consistency_loss_on_the_tiny_model(tiny_model):
    """From the second stage, each micro-batch brings a replay batch from the reservoir: the terms are the
    fast learner's CE on it and 2 w L_cons against the slow learner (twice the code's (L + L_r)/2 + w L_cons)."""
    from tunelab.continual.strategies.ilora import consistency_loss

    il = build_strategy("ilora", {"buffer_size": 6, "consistency_weight": 0.5})
    il.setup(SimpleNamespace(pad_id=0), tiny_model)
    il.before_stage(None, tiny_model, 0)
    tiny_model.train()
    g = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(5, 60, (2, 10), generator=g)
        labels = ids.clone()
        labels[:, :4] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    assert il.loss_terms(tiny_model, batch()) == {}  # first stage: the rows only enter the buffer
    for _ in range(4):
        il.loss_terms(tiny_model, batch())
    assert len(il.buffer) == 6 and il.n_seen == 10  # a reservoir of the rows seen
    il.before_stage(None, tiny_model, 1)
    terms = il.loss_terms(tiny_model, batch())
    assert set(terms) == {"replay", "consistency"} and terms["consistency"].item() == 0.0  # slow == fast
    with torch.no_grad():
        for p in tiny_model.model.layers[0].parameters():
            p.add_(0.05 * torch.randn_like(p))
    terms = il.loss_terms(tiny_model, batch())
    r = il.last_replay
    with torch.no_grad():  # by hand: the fast model and a copy holding the slow weights
        fast = tiny_model(input_ids=r["input_ids"], attention_mask=r["attention_mask"], output_hidden_states=True)
        import copy

        slow_model = copy.deepcopy(tiny_model)
        for n, p in slow_model.named_parameters():
            p.copy_(il.slow[n])
        slow = slow_model(input_ids=r["input_ids"], attention_mask=r["attention_mask"], output_hidden_states=True)
        want = consistency_loss(fast.hidden_states, slow.hidden_states, r["attention_mask"])
        ce = torch.nn.functional.cross_entropy(fast.logits[:, :-1].reshape(-1, fast.logits.size(-1)),
                                               r["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert want.item() > 0
    assert terms["consistency"].item() == pytest.approx(2 * 0.5 * want.item(), rel=1e-5)
    assert terms["replay"].item() == pytest.approx(ce.item(), rel=1e-5)
    terms["consistency"].backward()  # the gradient reaches the fast weights only
    assert tiny_model.model.layers[0].mlp.up_proj.weight.grad is not None


def test_replay_reservoir_and_mixing():
    from tunelab.continual.strategies.replay import n_replay, reservoir_add

    buf: list = []
    assert reservoir_add(buf, 0, list(range(3)), 5, random.Random(0)) == 3 and buf == [0, 1, 2]
    # every item of a stream of 5 ends in a size-2 reservoir with probability 2/5
    counts = [0] * 5
    for seed in range(4000):
        b: list = []
        n = reservoir_add(b, 0, list(range(3)), 2, random.Random(seed))
        reservoir_add(b, n, [3, 4], 2, random.Random(seed + 10**6))
        for x in b:
            counts[x] += 1
    assert all(abs(c / 4000 - 0.4) < 0.03 for c in counts), counts
    assert n_replay(16, 0.2) == 4 and n_replay(10, 0.5) == 10
    rp = build_strategy("replay", {"buffer_size": 3, "ratio": 0.5})
    ctx = SimpleNamespace(train_data=[[{"t": 0, "i": i} for i in range(4)], [{"t": 1, "i": i} for i in range(6)]])
    assert rp.stage_data(ctx, 0, ctx.train_data[0]) == ctx.train_data[0]  # nothing to replay yet
    rp.after_stage(ctx, None, 0)
    assert len(rp.buffer) == 3 and rp.n_seen == 4
    mixed = rp.stage_data(ctx, 1, ctx.train_data[1])
    assert mixed[:6] == ctx.train_data[1] and len(mixed) == 12 and all(x["t"] == 0 for x in mixed[6:])


def test_gere_threshold_margin_by_hand():
    from tunelab.continual.strategies.gere import tm_loss, tm_thresholds

    h0 = torch.tensor([[[-2.0], [0.0], [2.0]]])  # [B=1, L=3, d=1]: negative, neutral, positive states
    neg, pos = tm_thresholds(h0)
    sigma = math.sqrt(8 / 3)
    assert (neg.item(), pos.item()) == (pytest.approx(-sigma), pytest.approx(sigma))
    h = torch.tensor([[[-1.0], [2.0], [1.0]]])
    # negative: relu(-1 + sigma); neutral: relu(2 - sigma); positive: relu(sigma - 1); 3 violations
    want = ((sigma - 1) + (2 - sigma) + (sigma - 1)) / 3
    assert tm_loss(h, h0, neg, pos).item() == pytest.approx(want)
    assert tm_loss(h0, h0, neg, pos).item() == 0.0


def test_gere_terms_on_the_tiny_model(tiny_model, tiny_tokenizer, general_files):
    text, _ = general_files
    g = build_strategy("gere", {"texts": str(text), "n_samples": 3, "max_tokens": 16, "batch_size": 2,
                                "losses": {"ce": 1.0, "l2": 1.0, "tm": 100.0, "kl": 1.0}})
    ctx = SimpleNamespace(tokenizer=tiny_tokenizer, precision="fp32")
    g.setup(ctx, tiny_model)
    assert g.ids.shape == (3, 16) and g.h0.shape[:2] == (3, 16)
    tiny_model.train()
    terms = g.loss_terms(tiny_model, {})
    # the model is still the base: features, margins and logits agree with it; CE does not vanish
    assert terms["l2"].item() == pytest.approx(0.0, abs=1e-10) and terms["tm"].item() == 0.0
    assert terms["kl"].item() == pytest.approx(0.0, abs=1e-6) and terms["ce"].item() > 1.0
    assert g.cursor == 2
    with torch.no_grad():
        for p in tiny_model.model.layers[-1].parameters():
            p.add_(0.1)
    terms = g.loss_terms(tiny_model, {})
    assert terms["l2"].item() > 0 and terms["tm"].item() > 0 and terms["kl"].item() > 0


def test_gere_default_weights_are_twice_the_authors_loss(tiny_model, tiny_tokenizer, general_files):
    """The authors' GeReTrainer minimises (CE_task + CE_gere) / 2 + 100 * TM (w_strategy '100'); with the
    default weights the step's loss (task mean + strategy terms) must be exactly twice that. The old
    default {ce: 1, tm: 100} gave CE_task + CE_gere + 100 TM (the authors' margin weight 50)."""
    import torch.nn.functional as F

    from tunelab.continual.strategies.gere import tm_loss
    from tunelab.objectives.base import build_objective

    text, _ = general_files
    g = build_strategy("gere", {"texts": str(text), "n_samples": 3, "max_tokens": 16, "batch_size": 2})
    g.setup(SimpleNamespace(tokenizer=tiny_tokenizer, precision="fp32"), tiny_model)
    with torch.no_grad():  # move away from the base so that TM is not zero
        for p in tiny_model.model.layers[-1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    tiny_model.train()
    ids = torch.randint(5, 60, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    sft = build_objective("sft", {"chunk_size": 0})
    out = StrategyObjective(sft, [g]).compute(tiny_model, batch)
    ours = (out.loss_sum / out.n_units).item()
    with torch.no_grad():  # the authors' loss by hand on the same general rows (0 and 1: the cursor started at 0)
        task = sft.compute(tiny_model, batch)
        ce_task = (task.loss_sum / task.n_units).item()
        o = tiny_model(input_ids=g.ids[[0, 1]], output_hidden_states=True, use_cache=False)
        ce_gere = F.cross_entropy(o.logits[:, :-1].reshape(-1, o.logits.size(-1)), g.ids[[0, 1], 1:].reshape(-1))
        tm = tm_loss(o.hidden_states[-1], g.h0[[0, 1]], g.neg_thr, g.pos_thr)
    assert tm.item() > 0
    authors = (ce_task + ce_gere.item()) / 2 + 100 * tm.item()
    assert ours == pytest.approx(2 * authors, rel=1e-5)


def test_hft_redraws_a_half_per_stage(tiny_model):
    from tunelab.methods.registry import build_method

    method = build_method("hft", {})
    model = method.prepare(tiny_model)
    stage0 = {n for n, p in model.named_parameters() if p.requires_grad}
    hft = build_strategy("hft", {})
    ctx = StreamContext(recipe=SimpleNamespace(base=SimpleNamespace(method=SimpleNamespace(name="hft"))),
                        task_names=["a", "b"], train_data=[[], []], objective=None, method=method)
    hft.check(ctx)
    hft.prepare_stage(ctx, model, 1)
    stage1 = {n for n, p in model.named_parameters() if p.requires_grad}
    assert stage1 == method.draw(model, 1) and stage1 != stage0
    n_all = len(list(model.named_parameters()))
    assert abs(len(stage1) - n_all / 2) <= n_all * 0.2


def test_lines_scales_each_layer_delta(tiny_model):
    from tunelab.continual.strategies.lines import apply_lines

    base = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(1.0)
    apply_lines(tiny_model, base, num_layers=2, alpha=0.5)
    delta = {n: (p - base[n]).mean().item() for n, p in tiny_model.named_parameters()}
    assert delta["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(0.5)  # shallowest: alpha
    assert delta["model.layers.1.mlp.down_proj.weight"] == pytest.approx(1.0)  # deepest: alpha + beta
    # outside the layers: alpha, as the authors' LiNeS_scaling (the final norm too; it was alpha + beta)
    assert delta["model.embed_tokens.weight"] == pytest.approx(0.5) and delta["model.norm.weight"] == pytest.approx(0.5)


def test_lines_on_lora_scales_b(tiny_model):
    from tunelab.continual.strategies.lines import apply_lines
    from tunelab.methods.registry import build_method

    model = build_method("lora", {"r": 2, "target_modules": ["q_proj"]}).prepare(tiny_model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(1.0)
    apply_lines(model, None, num_layers=2, alpha=0.25)
    b = {n: p.mean().item() for n, p in model.named_parameters() if "lora_B" in n}
    assert sorted(b.values()) == pytest.approx([0.25, 1.0])
