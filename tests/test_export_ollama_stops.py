"""Ollama Modelfile (its Go TEMPLATE run by a small interpreter against the Jinja rendering), the end-of-turn
token, the export-time generation-config check and the stop-rate warning."""

import json
import re

import pytest

from tunelab.data.turns import end_of_turn, stop_token_ids
from tunelab.export_ollama import TemplateNotTranslatable, measure_template, modelfile_text
from tunelab.export_stops import check_stop_tokens, fix_generation_config, stop_rate_warning

SMOL = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
          "+ m['content'] | trim + '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
          "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
          "{% for m in msgs %}{% if m['role'] == 'user' "
          "%}{{ '[INST] ' + (('<<SYS>>\n' + sys + '\n<</SYS>>\n\n') if loop.first and sys else '') + m['content'] + "
          "' [/INST]' }}{% else %}{{ ' ' + m['content'] + '</s>' }}{% endif %}{% endfor %}")

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": 'Say "hi"\n{{ twice }}'}]


def _parse(actions: list[str], i: int = 0):
    """Actions -> (nodes, index after the closing {{ end }} or the end, the closing action)."""
    nodes = []
    while i < len(actions):
        body = actions[i][2:-2].strip()
        i += 1
        if body in ("end", "else") or body.startswith("else if "):
            return nodes, i, body
        if body.startswith("if "):
            branches, cond = [], body[3:]
            while True:
                block, i, closer = _parse(actions, i)
                branches.append((cond, block))
                if closer == "end":
                    break
                cond = closer[8:] if closer.startswith("else if ") else "true"
            nodes.append(("if", branches))
        elif body.startswith("range "):
            block, i, _ = _parse(actions, i)
            nodes.append(("range", block))
        else:
            nodes.append(("action", body))
    return nodes, i, None


def run_go_template(template: str, messages: list[dict]) -> str:
    """Just enough of Go's text/template for what go_template() writes: string literals, `range` over .Messages
    with `$last := eq (len (slice $.Messages $i)) 1`, if / else if on `eq .Role "x"`, `$last`, `not $last`,
    `.Content`. Text outside actions is an error (go_template writes none)."""
    parts = [p for p in re.split(r"({{.*?}})", template) if p]
    assert all(p.startswith("{{") for p in parts), "bare text outside actions"
    tree, _, _ = _parse(parts)
    out: list[str] = []

    def cond_true(cond: str, msg: dict | None, last: bool) -> bool:
        if cond == "true":
            return True
        if cond in ("$last", "not $last"):
            return last if cond == "$last" else not last
        role = re.fullmatch(r'eq \.Role "(\w+)"', cond)
        assert role, cond
        return msg is not None and msg["role"] == role.group(1)

    def run(nodes, msg=None, last=False):
        for kind, arg in nodes:
            if kind == "range":
                for k, m in enumerate(messages):
                    run(arg, m, k == len(messages) - 1)
            elif kind == "if":
                for cond, block in arg:
                    if cond_true(cond, msg, last):
                        run(block, msg, last)
                        break
            elif arg == ".Content":
                out.append(msg["content"])
            elif arg.startswith('"'):
                out.append(json.loads(arg))
            elif not arg.startswith("$last :="):
                raise AssertionError(f"unknown action {arg!r}")

    run(tree)
    return "".join(out)


def _tok(tiny_tokenizer, template):
    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tok.chat_template = template
    return tok


def _template_of(modelfile: str) -> str:
    return re.search(r'TEMPLATE """(.*?)"""', modelfile, re.S).group(1)


@pytest.mark.parametrize("template", ["chatml", SMOL, LLAMA3])
def test_modelfile_template_renders_like_the_chat_template(tiny_tokenizer, template):
    tok = tiny_tokenizer if template == "chatml" else _tok(tiny_tokenizer, template)
    text = modelfile_text("model-f16.gguf", tok)
    assert "FROM ./model-f16.gguf" in text
    go = _template_of(text)
    for conv in (CONV, CONV[1:], CONV[1:2]):
        want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        default = re.search(r'SYSTEM """(.*?)"""', text, re.S)
        msgs = conv if conv[0]["role"] == "system" or not default else \
            [{"role": "system", "content": default.group(1)}, *conv]  # what Ollama does with SYSTEM
        assert run_go_template(go, msgs) == want
    # a conversation ending with the assistant: Ollama leaves that turn open (a prefill), Jinja closes it
    conv = CONV[:3]
    closed = tok.apply_chat_template(conv, tokenize=False)
    got = run_go_template(go, conv)
    assert closed.startswith(got) and closed[len(got):] == measure_template(tok).assistant[1]


def test_modelfile_stops_and_default_system(tiny_tokenizer):
    text = modelfile_text("m.gguf", _tok(tiny_tokenizer, SMOL))
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert "SYSTEM" not in modelfile_text("m.gguf", tiny_tokenizer)


def test_template_that_folds_the_system_prompt_is_refused(tiny_tokenizer):
    with pytest.raises(TemplateNotTranslatable):
        measure_template(_tok(tiny_tokenizer, LLAMA2))


def test_end_of_turn_of_templates(tiny_tokenizer):
    eot = end_of_turn(tiny_tokenizer)
    assert (eot.token, eot.token_id, eot.suffix) == ("<|im_end|>", 2, "<|im_end|>\n")
    tok = _tok(tiny_tokenizer, "{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    assert end_of_turn(tok).token is None  # a template with no end-of-turn token


def test_generation_config_missing_the_end_of_turn_is_fixed(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import GenerationConfig

    tok = _tok(tiny_tokenizer, SMOL)
    tok.eos_token = "<|endoftext|>"  # EOS disagrees with the template's <|im_end|> (id 2)
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    GenerationConfig(eos_token_id=0, pad_token_id=0).save_pretrained(tmp_path)
    messages = []
    check = fix_generation_config(tmp_path, tok, echo=messages.append)
    assert check.fixed_eos == [0, 2]
    assert GenerationConfig.from_pretrained(tmp_path).eos_token_id == [0, 2]
    assert any("end-of-turn token 2 ('<|im_end|>') is not in" in m for m in messages)
    # a second check finds nothing to fix; stop ids now cover both
    again = fix_generation_config(tmp_path, tok, echo=lambda _: None)
    assert again.fixed_eos is None
    assert stop_token_ids(tok, GenerationConfig.from_pretrained(tmp_path)) == [0, 2]


def test_agreeing_stop_tokens_have_no_problem(tiny_tokenizer):
    from transformers import GenerationConfig

    assert check_stop_tokens(tiny_tokenizer, GenerationConfig(eos_token_id=2)).problems == []


def test_stop_rate_warning():
    assert stop_rate_warning({"stop_rate": 0.9}, {"stop_rate": 0.88}) is None
    assert stop_rate_warning({"stop_rate": 0.9}, None) is None
    msg = stop_rate_warning({"stop_rate": 0.9}, {"stop_rate": 0.5})
    assert "90.0%" in msg and "50.0%" in msg
