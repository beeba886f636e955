"""Self-improvement loops (layer 7): rounds of generate -> score -> keep or pair -> an ordinary run
(`tunelab iterate`, docs/iterate.md). RAFT, ReST-EM, iterative DPO, SPIN, self-rewarding, STaR.

  loop.py      the rounds, their files, resume (`run_iterate`)
  sampling.py  a round's samples: the generation engine, the rewards, STaR's rationalization
  select.py    selection rules and preference pairs (pure)
  rounds.py    the per-round table
"""

from tunelab.iterate.loop import IterateError, run_iterate

__all__ = ["IterateError", "run_iterate"]
