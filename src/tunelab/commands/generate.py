"""`tunelab generate RUN|MODEL --input prompts.jsonl -o out.jsonl`: batch generation into a JSONL file.

Each input line is a JSON object with `messages` (a chat) or `prompt` (one user turn; `system` optional). Each
output line is the input object plus `completion` (the decoded reply) and `stopped` (whether it ended with an
end-of-turn / EOS token within --max-new-tokens). Generation is batched with left padding through
`tunelab.evaluate.tasks.generate_with_stops`, the evaluation's generation path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def read_prompts(path: Path) -> tuple[list[dict], list[list[dict[str, str]]]]:
    """(records, chats) of a JSONL file; a malformed line raises DataError naming file:line."""
    from tunelab.data.formats import DataError

    records, chats = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not JSON ({e.msg})") from None
        if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            chat = rec["messages"]
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            chat = ([{"role": "system", "content": rec["system"]}] if rec.get("system") else []) + \
                [{"role": "user", "content": rec["prompt"]}]
        else:
            raise DataError(f"{path}:{i}: expected an object with 'messages' (a list) or 'prompt' (a string)")
        records.append(rec)
        chats.append(chat)
    return records, chats


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate(
        target: str = typer.Argument(..., help="Run directory, checkpoint, adapter, merged/HF model directory or "
                                               "built-in alias."),
        input: str = typer.Option(..., "--input", "-i", help="JSONL: objects with `messages` or `prompt`."),
        output: str = typer.Option(..., "-o", "--output", help="JSONL written: each input plus `completion` and "
                                                               "`stopped`."),
        max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Tokens per completion at most."),
        batch_size: int = typer.Option(16, "--batch-size", help="Prompts per batch."),
        temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; > 0 samples."),
        top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (with --temperature > 0)."),
        seed: int = typer.Option(0, "--seed", help="Sampling seed."),
        precision: Optional[str] = typer.Option(None, "--precision", help="Autocast dtype: bf16, fp16 or fp32 "
                                                "(default: fp32 on CPU, bf16 on GPU)."),
    ):
        """Generate completions for a JSONL file of prompts (batched, the model's chat template)."""
        from tunelab.commands._common import guard, setup_logging

        setup_logging()

        def go():
            import torch

            from tunelab.evaluate.targets import load_target
            from tunelab.evaluate.tasks import generate_with_stops

            records, chats = read_prompts(Path(input))
            out_path = Path(output)
            _, model, tok = load_target(target, generates="generate text")
            device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
            model.to(device)
            torch.manual_seed(seed)
            sampling = {"temperature": temperature, "top_p": top_p} if temperature > 0 else None
            if sampling is not None:
                sampling["seed"] = seed
            texts, stopped = generate_with_stops(model, tok, chats, max_new_tokens=max_new_tokens,
                                                 batch_size=batch_size, precision=precision or "auto",
                                                 sampling=sampling)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = out_path.with_name(out_path.name + ".tmp")
            with tmp.open("w", encoding="utf-8") as fh:
                for rec, text, stop in zip(records, texts, stopped):
                    fh.write(json.dumps({**rec, "completion": text, "stopped": stop}, ensure_ascii=False) + "\n")
            tmp.replace(out_path)
            typer.echo(f"{len(records)} completions written to {out_path} ({sum(stopped)} stopped within "
                       f"{max_new_tokens} tokens)")

        guard(go)
