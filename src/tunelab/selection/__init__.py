"""Data curation: score, deduplicate and select a subset of instruction data (`tunelab select`, `data.select:`).

  config.py     SelectConfig (the recipe's `data.select`, the CLI's --config)
  registry.py   Scorer / Selector interfaces, registries, budgets
  scorers/      one scorer per file: length, perplexity, ifd (ifd_ppl, ifd_loss), embedding, gradient (LESS),
                judge, reward, composite
  selectors/    one selector per file: random / topk / threshold (simple.py), kcenter, deita, qdit,
                cluster_rank, grape
  dedup.py      exact and MinHash-LSH near-duplicate removal
  lm.py         batched LM passes shared by the scorers (response losses, hidden states, next-token log-probs)
  cache.py      score cache keyed by data hash + model + scorer config
  run.py        select_records / select_file / select_for_recipe; report.py: report.json + report.png
See docs/selection.md.
"""
