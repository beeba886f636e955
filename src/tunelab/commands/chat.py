"""`tunelab chat RUN|MODEL`: talk to a model in the terminal, with its chat template and streamed tokens.

The target is anything `tunelab eval` takes (run directory, checkpoint, adapter, merged HF directory, hub id in the
local cache, built-in alias) or a `.gguf` file, run by llama.cpp when llama-cpp-python is installed (otherwise
dequantised and run by transformers). Lines starting with `/` are commands: `/reset` (forget the conversation),
`/system TEXT` (set the system prompt and reset), `/exit` (or end of input). Generation stops on the stop ids of
`tunelab.data.turns.stop_token_ids` (EOS and the template's end-of-turn token).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

COMMANDS_HELP = "/reset forgets the conversation, /system TEXT sets the system prompt, /exit quits."


class _Backend:
    """One reply at a time from the conversation so far: `reply(messages, echo) -> text` streams as it goes."""

    def __init__(self, target: str, max_new_tokens: int, sampling: dict, seed: int | None):
        self.max_new_tokens, self.sampling, self.seed = max_new_tokens, sampling, seed
        self.llm = None
        if target.endswith(".gguf"):
            try:
                from tunelab import llamacpp

                self.llm = llamacpp.load(target)
            except ImportError:
                self.llm = None  # no llama.cpp: transformers dequantises the GGUF below
        from transformers import AutoTokenizer

        if self.llm is not None:
            path = Path(target)
            self.tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            self.model = None
        else:
            from tunelab.evaluate.targets import load_target

            _, self.model, self.tokenizer = load_target(target, generates="chat")
            self.model.eval()

    def stops(self) -> list[int]:
        from tunelab.data.turns import stop_token_ids

        return stop_token_ids(self.tokenizer, getattr(self.model, "generation_config", None))

    def reply(self, messages: list[dict[str, str]], echo) -> str:
        from tunelab.data.encode import encode_prompt

        ids = encode_prompt(self.tokenizer, messages)
        if self.llm is not None:
            from tunelab import llamacpp

            out: list[int] = []
            text = ""
            for tok in llamacpp.stream(self.llm, ids, self.max_new_tokens, self.stops(), seed=self.seed,
                                       temperature=self.sampling.get("temperature", 0.0),
                                       top_p=self.sampling.get("top_p", 1.0), top_k=self.sampling.get("top_k", 0)):
                out.append(tok)
                new = self.tokenizer.decode(out, skip_special_tokens=True)
                echo(new[len(text):])
                text = new
            return text
        import torch
        from transformers import TextStreamer

        class _Echo(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                echo(text)

        if self.seed is not None:
            torch.manual_seed(self.seed)
        decoding = {"do_sample": True, **self.sampling} if self.sampling.get("temperature", 0.0) > 0 else \
            {"do_sample": False}
        with torch.no_grad():
            out = self.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                      dtype=torch.long), max_new_tokens=self.max_new_tokens, eos_token_id=self.stops(),
                                      pad_token_id=self.tokenizer.pad_token_id, **decoding,
                                      streamer=_Echo(self.tokenizer, skip_prompt=True, skip_special_tokens=True))
        return self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def chat_loop(backend, lines, echo, system: str | None = None) -> list[dict[str, str]]:
    """Read user lines, print streamed replies; returns the final conversation (for tests)."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = messages[:1] if messages and messages[0]["role"] == "system" else []
            echo("(conversation reset)\n")
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip()
            messages = [{"role": "system", "content": system}] if system else []
            echo(f"(system prompt {'set' if system else 'cleared'}; conversation reset)\n")
            continue
        if line.startswith("/"):
            echo(f"(unknown command {line.split()[0]}: {COMMANDS_HELP})\n")
            continue
        messages.append({"role": "user", "content": line})
        echo("assistant> ")
        messages.append({"role": "assistant", "content": backend.reply(messages, echo).strip()})
        echo("\n")
    return messages


def register(app: typer.Typer) -> None:
    @app.command("chat")
    def chat(
        target: str = typer.Argument(..., help="Run directory, checkpoint, adapter, merged/HF model directory, "
                                               "built-in alias, or a .gguf file (llama.cpp when installed)."),
        system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
        max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Tokens per reply at most."),
        temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; > 0 samples."),
        top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (with --temperature > 0)."),
        top_k: int = typer.Option(0, "--top-k", help="Sample among the k likeliest tokens (0: all)."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed."),
    ):
        """Chat with a model (streaming, its chat template, history). /reset, /system TEXT, /exit."""
        import sys

        from tunelab.commands._common import guard, setup_logging

        setup_logging()
        sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if temperature > 0 else {}

        def go():
            backend = _Backend(target, max_new_tokens, sampling, seed)
            typer.echo(f"chatting with {target} ({'llama.cpp' if backend.llm is not None else 'transformers'}). "
                       f"{COMMANDS_HELP}", err=True)

            def lines():
                while True:
                    typer.echo("you> ", nl=False)
                    line = sys.stdin.readline()
                    if not line:
                        return
                    yield line

            chat_loop(backend, lines(), lambda text: typer.echo(text, nl=False), system)

        guard(go)
