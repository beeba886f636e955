"""Continual fine-tuning: a stream of tasks, one training stage per task through the one training loop,
every task (and general ability) evaluated after every stage, with anti-forgetting strategies.

  recipe.py      the continual recipe (a base Recipe + stages + strategies + general evaluation)
  stream.py      run_continual: validate all data, evaluate, train stage by stage, resume, joint bound, export
  evaluation.py  scoring every task and the general-ability files on a model
  strategies/    naive, replay, gere, ewc, l2, lwf, olora, ilora, hft, lines (one file each)

The R-matrix metrics (ACC, BWT, FWT, forgetting, general retention) are `tunelab.evaluate.forgetting`, the one
implementation, which `tunelab report` uses too.
"""
