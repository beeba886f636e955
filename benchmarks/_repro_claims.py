"""The claims of benchmarks/reproductions.py: one function of (lab, seed) each, returning its measurements.

Every claim states a paper's finding as checks on its measurements: (key, side, threshold), e.g. ("retained",
">=", 0.9). A seed passes when all its checks hold; the verdict over the seeds is in reproductions.py.
Shared runs (same method, lr, task, seed) are trained once per seed and reused by every claim that names them.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable

from _repro_lab import TASK, Lab, forgetting, retained

Check = tuple[str, str, float]  # (measured key, ">=" | "<=" | ">" | "<", threshold)

# learning rates of the methods benchmark (benchmarks/methods.py: each family's usual rate for a short run)
LR_FULL, LR_LORA, LR_PISSA, LR_LISA, LR_HFT, LR_MEZO = 2e-5, 1e-3, 2e-4, 5e-5, 3e-5, 1e-6
MERGE_TASKS = (TASK, "sort_numbers", "reverse_words")  # three tasks whose task vectors interfere


@dataclass(frozen=True)
class Claim:
    name: str
    text: str  # the claim, as the paper makes it
    paper: str  # "Authors year" + link
    setting: str  # what runs here
    metric: str  # what the checks' keys mean
    checks: tuple[Check, ...]
    fn: Callable[[Lab, int], dict] = field(repr=False)
    context: tuple[str, ...] = ()  # measurements shown beside the checked ones (what the checked ones come from)


def _full(lab: Lab, seed: int):
    return lab.train(seed, "full", LR_FULL)


def _lora(lab: Lab, seed: int):
    return lab.train(seed, "lora", LR_LORA)


def _em(lab: Lab, run, key: str, task: str = TASK) -> float:
    return lab.scores(lab.merged(run), key, [task])[task]


def _ppl(lab: Lab, path, key: str) -> float:
    return lab.scores(path, key, ["ppl"])["ppl"]


def _merge_and_score(lab: Lab, name: str, recipe: dict, specs: list[str], calibrate: bool = False) -> dict:
    out, report = lab.merge(name, recipe, calibrate=calibrate)
    s = lab.scores(out, name, specs)
    lab.drop(out)
    return {**s, "report": report}


def claim_bitdelta(lab: Lab, seed: int) -> dict:
    run = _full(lab, seed)
    base, ft = lab.base_scores([TASK])[TASK], _em(lab, run, run.name)
    recipe = {"merge_method": "bitdelta", "base_model": lab.base(), "models": [{"model": str(lab.merged(run))}]}
    first = _merge_and_score(lab, f"bitdelta1-seed{seed}", recipe, [TASK])
    distilled = _merge_and_score(lab, f"bitdelta2-seed{seed}", recipe, [TASK], calibrate=True)
    d = distilled["report"]["distill"]
    return {"em_base": base, "em_ft": ft, "em_first_stage": first[TASK], "em_distilled": distilled[TASK],
            "ratio": first["report"]["compression"]["ratio"], "distill_loss_first": d["loss_first"],
            "distill_loss_last": d["loss_last"], "retained_first_stage": retained(first[TASK], base, ft),
            "retained": retained(distilled[TASK], base, ft)}


def claim_dare(lab: Lab, seed: int) -> dict:
    run = _full(lab, seed)
    base, ft = lab.base_scores([TASK])[TASK], _em(lab, run, run.name)
    m = _merge_and_score(lab, f"dare-seed{seed}", {
        "merge_method": "dare_linear", "base_model": lab.base(), "models": [{"model": str(lab.merged(run))}],
        "parameters": {"density": 0.1, "lambda": 1.0, "seed": seed}}, [TASK])
    return {"em_base": base, "em_ft": ft, "em_dare": m[TASK], "retained": retained(m[TASK], base, ft)}


def _interpolation(lab: Lab, seed: int, method: str, parameters: dict) -> dict:
    """A full fine-tune and its interpolation towards the base: target gain kept, forgetting cut."""
    run = _full(lab, seed)
    b = lab.base_scores([TASK, "ppl"])
    ft = lab.scores(lab.merged(run), run.name, [TASK, "ppl"])
    m = _merge_and_score(lab, f"{method}-seed{seed}", {
        "merge_method": method, "base_model": lab.base(), "models": [{"model": str(lab.merged(run))}],
        "parameters": parameters}, [TASK, "ppl"])
    f_ft, f_m = forgetting(ft["ppl"], b["ppl"]), forgetting(m["ppl"], b["ppl"])
    return {"em_base": b[TASK], "em_ft": ft[TASK], "em_merged": m[TASK], "ppl_base": b["ppl"],
            "ppl_ft": ft["ppl"], "ppl_merged": m["ppl"], "forgetting_ft": f_ft, "forgetting_merged": f_m,
            "retained": retained(m[TASK], b[TASK], ft[TASK]),
            "forgetting_cut": 1 - f_m / f_ft if f_ft > 0 else float("nan")}


def claim_wise_ft(lab: Lab, seed: int) -> dict:
    return _interpolation(lab, seed, "wise_ft", {"alpha": 0.5})


def claim_lines(lab: Lab, seed: int) -> dict:
    return _interpolation(lab, seed, "lines", {})


def _vs_full(lab: Lab, seed: int, other) -> dict:
    """Target loss and forgetting of a run against the shared full fine-tune."""
    full = _full(lab, seed)
    p0 = lab.base_scores(["ppl"])["ppl"]
    f_full, f_other = (forgetting(_ppl(lab, lab.merged(r), r.name), p0) for r in (full, other))
    return {"loss_full": lab.eval_loss(full), "loss_other": lab.eval_loss(other), "forgetting_full": f_full,
            "forgetting_other": f_other, "loss_gap": lab.eval_loss(other) - lab.eval_loss(full),
            "forgetting_gap": f_full - f_other}


def claim_lora_learns_less(lab: Lab, seed: int) -> dict:
    return _vs_full(lab, seed, _lora(lab, seed))


claim_lora_forgets_less = claim_lora_learns_less  # one pair of runs measures both halves of the paper's title


def claim_hft(lab: Lab, seed: int) -> dict:
    return _vs_full(lab, seed, lab.train(seed, "hft", LR_HFT, options={"seed": seed}))


def _loss_vs_lora(lab: Lab, seed: int, other) -> dict:
    lora = _lora(lab, seed)
    lo, lm = lab.eval_loss(lora), lab.eval_loss(other)
    return {"loss_lora": lo, "loss_other": lm, "loss_advantage": lo - lm}


def claim_dora(lab: Lab, seed: int) -> dict:
    return _loss_vs_lora(lab, seed, lab.train(seed, "dora", LR_LORA))


def claim_lisa(lab: Lab, seed: int) -> dict:
    return _loss_vs_lora(lab, seed, lab.train(seed, "lisa", LR_LISA, options={"seed": seed}))


def claim_pissa(lab: Lab, seed: int) -> dict:
    """Same rank, same lr (PiSSA's paper trains both at one rate): mean training loss over the run."""
    lora, pissa = lab.train(seed, "lora", LR_PISSA), lab.train(seed, "pissa", LR_PISSA)
    lo, pi = lab.step_losses(lora), lab.step_losses(pissa)
    return {"mean_loss_lora": statistics.fmean(lo), "mean_loss_pissa": statistics.fmean(pi),
            "loss_lora": lab.eval_loss(lora), "loss_pissa": lab.eval_loss(pissa),
            "curve_advantage": statistics.fmean(lo) - statistics.fmean(pi)}


def claim_mezo(lab: Lab, seed: int) -> dict:
    """MeZO at 3x the steps of the full fine-tune: 2 forward passes a step ~ 2/3 of a forward+backward, so
    about twice the full fine-tune's compute (the paper runs 100k steps; this is far shorter)."""
    full = _full(lab, seed)
    mezo = lab.train(seed, "mezo", LR_MEZO, steps=3 * lab.b.steps, options={"seed": seed})
    base = lab.base_scores([TASK])[TASK]
    ft, mz = _em(lab, full, full.name), _em(lab, mezo, mezo.name)
    return {"em_base": base, "em_ft": ft, "em_mezo": mz, "loss_full": lab.eval_loss(full),
            "loss_mezo": lab.eval_loss(mezo), "retained": retained(mz, base, ft)}


def claim_benign_refusal(lab: Lab, seed: int) -> dict:
    run = _full(lab, seed)
    r0 = lab.base_scores(["refusal"])["refusal"]
    r1 = lab.scores(lab.merged(run), run.name, ["refusal"])["refusal"]
    # a base that refuses nothing has no refusals to lose: the claim's premise (an aligned model) fails, and the
    # drop is undefined (NaN: inconclusive) rather than "not reproduced"
    return {"refusal_base": r0, "refusal_ft": r1, "refusal_drop": r0 - r1 if r0 > 0 else float("nan")}


def claim_intruders(lab: Lab, seed: int) -> dict:
    full, lora = _full(lab, seed), _lora(lab, seed)
    n_full, n_tensors = intruder_counts(lab.base(), lab.merged(full))
    n_lora, _ = intruder_counts(lab.base(), lab.merged(lora))
    return {"intruders_full": n_full, "intruders_lora": n_lora, "tensors": n_tensors,
            "intruder_excess": n_lora - n_full}


def intruder_counts(base: str, tuned, k: int = 10, eps: float = 0.5) -> tuple[int, int]:
    """Intruder dimensions (Shuttleworth et al. 2024, sec. 3): for each 2-D projection weight W0 (base) and W
    (fine-tuned), with left singular vectors U0 (all of them) and U (top k), count the i < k with
    max_j |cos(U[:, i], U0[:, j])| < eps. Returns (intruders over all matrices, matrices compared)."""
    import torch

    from tunelab.weights import CheckpointReader

    count = tensors = 0
    with CheckpointReader(base) as r0, CheckpointReader(tuned) as r1:
        for name in r0.names():
            if not name.endswith("proj.weight") or name not in r1:
                continue
            u0 = torch.linalg.svd(r0.get(name).float(), full_matrices=False)[0]  # (out, min(out, in))
            u = torch.linalg.svd(r1.get(name).float(), full_matrices=False)[0][:, :k]  # (out, k)
            sim = (u.T @ u0).abs().amax(dim=1)  # (k,): best match of each top vector among the base's
            count += int((sim < eps).sum())
            tensors += 1
    return count, tensors


def claim_ties(lab: Lab, seed: int) -> dict:
    runs = [lab.train(seed, "full", LR_FULL, task=t) for t in MERGE_TASKS]
    models = [{"model": str(lab.merged(r))} for r in runs]
    base = lab.base_scores(list(MERGE_TASKS))
    singles = {t: _em(lab, r, r.name, t) for t, r in zip(MERGE_TASKS, runs)}
    common = {"base_model": lab.base(), "models": models}
    # each method at its paper's usual setting: task arithmetic's sum scaled by 0.4 (Ilharco et al. pick
    # lambda on validation, typically 0.3-0.5), TIES at density 0.2 and lambda 1 (Yadav et al.'s defaults)
    ta = _merge_and_score(lab, f"ta-seed{seed}", {**common, "merge_method": "task_arithmetic",
                                                  "parameters": {"lambda": 0.4}}, list(MERGE_TASKS))
    ties = _merge_and_score(lab, f"ties-seed{seed}", {**common, "merge_method": "ties",
                                                      "parameters": {"density": 0.2, "lambda": 1.0}}, list(MERGE_TASKS))
    mean = statistics.fmean
    return {"em_base": base, "em_single": singles, "em_ta": {t: ta[t] for t in MERGE_TASKS},
            "em_ties": {t: ties[t] for t in MERGE_TASKS}, "mean_ta": mean(ta[t] for t in MERGE_TASKS),
            "mean_ties": mean(ties[t] for t in MERGE_TASKS),
            "ties_advantage": mean(ties[t] for t in MERGE_TASKS) - mean(ta[t] for t in MERGE_TASKS)}


_FT = f"full fine-tuning on `{TASK}` (lr {LR_FULL:g})"
_LORA = f"LoRA r 16 on the 7 linears (lr {LR_LORA:g})"
CLAIMS: dict[str, Claim] = {c.name: c for c in [
    Claim("dare", "DARE drops 90% of a fine-tune's delta entries (rescaling the rest) with little loss",
          "Yu et al. 2024, [2311.03099](https://arxiv.org/abs/2311.03099)",
          f"{_FT}; `dare_linear` density 0.1", "retained share of the exact-match gain",
          (("retained", ">=", 0.9),), claim_dare, ("em_base", "em_ft", "em_dare")),
    Claim("wise_ft", "interpolating a fine-tune with its base (WiSE-FT) cuts forgetting at a small target cost",
          "Wortsman et al. 2022, [2109.01903](https://arxiv.org/abs/2109.01903)",
          f"{_FT}; `wise_ft` alpha 0.5", "retained gain; forgetting_cut = 1 - forgetting_merged / forgetting_ft "
          "(forgetting = WikiText-2 perplexity / base's - 1)",
          (("retained", ">=", 0.9), ("forgetting_cut", ">=", 0.3)), claim_wise_ft,
          ("em_base", "em_ft", "em_merged", "forgetting_ft", "forgetting_merged")),
    Claim("lines", "scaling a fine-tune's shallow-layer updates down (LiNeS) cuts forgetting at a small target cost",
          "Wang et al. 2025, [2410.17146](https://arxiv.org/abs/2410.17146)",
          f"{_FT}; `lines` alpha 0, beta 1", "as wise_ft",
          (("retained", ">=", 0.9), ("forgetting_cut", ">=", 0.3)), claim_lines,
          ("em_base", "em_ft", "em_merged", "forgetting_ft", "forgetting_merged")),
    Claim("benign_refusal", "benign fine-tuning lowers an aligned model's refusal rate",
          "Qi et al. 2023, [2310.03693](https://arxiv.org/abs/2310.03693)", f"{_FT} (harmless data)",
          "refusal_drop = refusal rate of the base - of the fine-tune (shipped harmful prompts, phrase detector); "
          "undefined when the base refuses none",
          (("refusal_drop", ">", 0.0),), claim_benign_refusal, ("refusal_base", "refusal_ft")),
    Claim("lora_learns_less", "LoRA learns less than full fine-tuning (higher target loss)",
          "Biderman et al. 2024, [2405.09673](https://arxiv.org/abs/2405.09673)", f"{_LORA} vs {_FT}",
          "loss_gap = held-out loss of LoRA - of full", (("loss_gap", ">", 0.0),),
          claim_lora_learns_less, ("loss_full", "loss_other")),
    Claim("lora_forgets_less", "LoRA forgets less than full fine-tuning",
          "Biderman et al. 2024, [2405.09673](https://arxiv.org/abs/2405.09673)", f"{_LORA} vs {_FT}",
          "forgetting_gap = forgetting of full - of LoRA (WikiText-2 perplexity rise)",
          (("forgetting_gap", ">", 0.0),), claim_lora_forgets_less,
          ("forgetting_full", "forgetting_other")),
    Claim("intruders", "LoRA's updates carry intruder dimensions (new top singular vectors unlike any of the base's)"
          " that full fine-tuning's do not",
          "Shuttleworth et al. 2024, [2410.21228](https://arxiv.org/abs/2410.21228)", f"{_LORA} vs {_FT}",
          "intruder_excess = intruders of LoRA - of full: top-10 left singular vectors of each fine-tuned matrix "
          "whose best cosine with the base's is < 0.5, over the 7 projections of every layer",
          (("intruder_excess", ">", 0.0),), claim_intruders, ("intruders_full", "intruders_lora", "tensors")),
    Claim("hft", "half fine-tuning (a random half of the blocks frozen) forgets less than full fine-tuning",
          "Hui et al. 2024, [2404.18466](https://arxiv.org/abs/2404.18466)", f"`hft` (lr {LR_HFT:g}) vs {_FT}",
          "forgetting_gap = forgetting of full - of HFT", (("forgetting_gap", ">", 0.0),),
          claim_hft, ("forgetting_full", "forgetting_other", "loss_gap")),
    Claim("dora", "DoRA >= LoRA at equal rank", "Liu et al. 2024, [2402.09353](https://arxiv.org/abs/2402.09353)",
          f"DoRA r 16 vs {_LORA}, same lr", "loss_advantage = held-out loss of LoRA - of DoRA",
          (("loss_advantage", ">=", 0.0),), claim_dora, ("loss_lora", "loss_other")),
    Claim("pissa", "PiSSA converges faster than LoRA (same rank and rate)",
          "Meng et al. 2024, [2404.02948](https://arxiv.org/abs/2404.02948)",
          f"PiSSA vs LoRA, r 16, both at lr {LR_PISSA:g}", "curve_advantage = mean training loss of LoRA - of PiSSA",
          (("curve_advantage", ">", 0.0),), claim_pissa,
          ("mean_loss_lora", "mean_loss_pissa", "loss_lora", "loss_pissa")),
    Claim("lisa", "LISA (layerwise sampling) >= LoRA at similar memory",
          "Pan et al. 2024, [2403.17919](https://arxiv.org/abs/2403.17919)", f"LISA (lr {LR_LISA:g}) vs {_LORA}",
          "loss_advantage = held-out loss of LoRA - of LISA", (("loss_advantage", ">=", 0.0),),
          claim_lisa, ("loss_lora", "loss_other")),
    Claim("mezo", "MeZO (zeroth order, no backward) reaches a useful fraction of backprop's gain",
          "Malladi et al. 2023, [2305.17333](https://arxiv.org/abs/2305.17333)",
          f"MeZO (lr {LR_MEZO:g}, eps 1e-3, 3x the steps) vs {_FT}",
          "retained share of the full fine-tune's exact-match gain", (("retained", ">=", 0.5),),
          claim_mezo, ("em_base", "em_ft", "em_mezo", "loss_full", "loss_mezo")),
    Claim("bitdelta", "a 1-bit delta (sign x one scale per matrix, scales distilled) keeps most of a fine-tune's gain",
          "Liu et al. 2024, [2402.10193](https://arxiv.org/abs/2402.10193)",
          f"{_FT}; BitDelta of its delta, scales distilled on WikiText-2 raw (relative lr 0.02)",
          "retained = (EM_bitdelta - EM_base) / (EM_ft - EM_base)", (("retained", ">=", 0.9),), claim_bitdelta,
          ("em_base", "em_ft", "em_first_stage", "em_distilled", "retained_first_stage")),
    Claim("ties", "TIES beats task arithmetic when >= 3 task vectors interfere",
          "Yadav et al. 2023, [2306.01708](https://arxiv.org/abs/2306.01708)",
          f"full fine-tunes (lr {LR_FULL:g}) on {', '.join(MERGE_TASKS)}; task arithmetic lambda 0.4 vs TIES "
          "density 0.2 lambda 1", "ties_advantage = mean exact match over the 3 tasks, TIES - task arithmetic",
          (("ties_advantage", ">", 0.0),), claim_ties, ("mean_ta", "mean_ties")),
]}
