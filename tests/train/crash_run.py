"""`tunelab train` that crashes: every process raises after step N (for resume tests under torchrun).

    python -m torch.distributed.run ... tests/train/crash_run.py RECIPE N [a.b=c ...]

N = 0 never crashes. No evaluation and no export: the training loop and its checkpoints only.
"""

import sys

from tunelab.runner import open_workspace, resolve_recipe_arg, train_workspace


class Crash(SystemExit):
    pass


def main() -> None:
    recipe_path, crash_at, *overrides = sys.argv[1:]
    recipe, run_dir = resolve_recipe_arg(recipe_path, overrides)
    ws = open_workspace(recipe, run_dir=run_dir)

    def crash(step: int, loss: float) -> None:
        if step == int(crash_at):
            raise Crash(3)

    train_workspace(ws, on_step=crash)


if __name__ == "__main__":
    main()
