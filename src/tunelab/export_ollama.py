"""An Ollama `Modelfile` beside a GGUF export: FROM, TEMPLATE (the chat template translated), SYSTEM, stops.

Ollama renders prompts with Go's text/template over `.Messages`, not with Jinja, so the chat template is
translated. A general Jinja -> Go translation is not possible; instead the template is *measured*: a
conversation whose contents are sentinels is rendered, and the text the template writes around each role's
content is read off (prefix and suffix per role, the generation prompt, text before the first message, a
default system prompt it inserts when none is given). The Go template replays those pieces; every literal is a
Go string action (`{{ "..." }}`), so no whitespace trimming or brace in the text can change it.

Templates that are not "prefix + content + suffix" per message (Llama 2's `[INST]` folding the system prompt
into the first user turn, templates that branch on the message index) are detected by re-rendering a different
conversation from the pieces and comparing it with Jinja; they raise :class:`TemplateNotTranslatable`.

Ollama's convention for a conversation ending with an assistant message (a prefill) is to leave that turn
open, so the last assistant message gets no end-of-turn suffix; a conversation ending with a user message gets
the generation prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunelab.data.turns import end_of_turn

_S, _U1, _A1, _U2, _A2 = ("XQSYSTEMQX", "XQUSERONEQX", "XQASSTONEQX", "XQUSERTWOQX", "XQASSTTWOQX")


class TemplateNotTranslatable(ValueError):
    """The chat template does not have the per-message prefix/suffix shape a Go template can replay."""


@dataclass(frozen=True)
class TemplateParts:
    head: str
    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str
    default_system: str | None


def _between(text: str, a: str, b: str) -> str:
    i, j = text.find(a), text.find(b)
    if i < 0 or j < i + len(a):
        raise TemplateNotTranslatable("chat template does not write every message's content in order")
    return text[i + len(a):j]


def _strip_suffix(text: str, suffix: str, what: str) -> str:
    if not text.endswith(suffix):
        raise TemplateNotTranslatable(f"chat template: {what} is not a fixed piece of text")
    return text[: len(text) - len(suffix)]


def measure_template(tokenizer) -> TemplateParts:
    """The pieces of `tokenizer`'s chat template (module docstring); raises TemplateNotTranslatable."""

    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def m(role, content):
        return {"role": role, "content": content}

    conv = [m("user", _U1), m("assistant", _A1), m("user", _U2), m("assistant", _A2)]
    try:
        full = render([m("system", _S), *conv])
        nosys = render(conv)
        first = [m("system", _S), m("user", _U1)]
        with_gen, without_gen = render(first, True), render(first)
    except Exception as e:  # noqa: BLE001 - a template that cannot render a plain conversation
        raise TemplateNotTranslatable(f"chat template cannot render a system/user/assistant conversation: {e}") from e
    if not with_gen.startswith(without_gen):
        raise TemplateNotTranslatable("chat template: the generation prompt is not appended to the conversation")
    generation = with_gen[len(without_gen):]
    if any(x not in full for x in (_S, _U1, _A1, _U2, _A2)) or _U1 not in nosys:
        raise TemplateNotTranslatable("chat template does not write every message's content")
    asst_suf = full[full.index(_A2) + len(_A2):]
    gap = _between(full, _A1, _U2)
    if not gap.startswith(asst_suf):
        raise TemplateNotTranslatable("chat template: the assistant turn's end differs between turns")
    user_pre = gap[len(asst_suf):]
    user_suf = _strip_suffix(_between(full, _U1, _A1), generation, "the assistant prefix")
    asst_pre = generation
    sys_suf = _strip_suffix(_between(full, _S, _U1), user_pre, "the user prefix")
    head_sys = full[: full.index(_S)]
    nosys_head = nosys[: nosys.index(_U1)]
    head = _strip_suffix(nosys_head, user_pre, "the user prefix")
    default = None
    if head_sys.startswith(head):
        sys_pre = head_sys[len(head):]
    elif nosys_head.startswith(head_sys) and nosys_head.endswith(sys_suf + user_pre):
        # the template writes a default system prompt when the conversation has none
        head, sys_pre = "", head_sys
        default = nosys_head[len(head_sys): len(nosys_head) - len(sys_suf + user_pre)]
    else:
        raise TemplateNotTranslatable("chat template: the text before the first message depends on its role")
    parts = TemplateParts(head, (sys_pre, sys_suf), (user_pre, user_suf), (asst_pre, asst_suf), generation, default)
    # re-render conversations the pieces were not read from; any difference means the shape is not per-message
    probes = [[m("user", "a"), m("assistant", "b"), m("user", "c")],
              [m("system", "s"), m("user", "a"), m("assistant", "b"), m("user", "c"), m("assistant", "d")]]
    for msgs in probes:
        for gen in (True, False):
            if msgs[-1]["role"] == "assistant" and gen:
                continue
            want = render(msgs, gen)
            got = render_parts(parts, msgs, gen, close_last_assistant=True)
            if got != want:
                raise TemplateNotTranslatable(f"chat template is not per-message prefix + content + suffix "
                                              f"(rendering differs: {got!r} vs {want!r})")
    return parts


def render_parts(parts: TemplateParts, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                 close_last_assistant: bool = False) -> str:
    """What the Go template renders (the Jinja rendering, when `close_last_assistant`); the default system
    prompt is inserted as Ollama's SYSTEM line makes it."""
    if parts.default_system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": parts.default_system}, *messages]
    roles = {"system": parts.system, "user": parts.user, "assistant": parts.assistant}
    out = [parts.head]
    for i, msg in enumerate(messages):
        pre, suf = roles[msg["role"]]
        last = i == len(messages) - 1
        out.append(pre + msg["content"])
        if msg["role"] != "assistant" or not last or close_last_assistant:
            out.append(suf)
    if add_generation_prompt and messages and messages[-1]["role"] != "assistant":
        out.append(parts.generation)
    return "".join(out)


def _lit(text: str) -> str:
    """A Go string action printing `text` (JSON string escapes are valid Go escapes)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def go_template(parts: TemplateParts) -> str:
    """The Ollama TEMPLATE: one line, every literal a string action (no `{{-` trimming to eat newlines)."""
    (sp, ss), (up, us), (ap, as_) = parts.system, parts.user, parts.assistant
    return (
        f"{_lit(parts.head)}{{{{ range $i, $_ := .Messages }}}}{{{{ $last := eq (len (slice $.Messages $i)) 1 }}}}"
        f'{{{{ if eq .Role "system" }}}}{_lit(sp)}{{{{ .Content }}}}{_lit(ss)}'
        f'{{{{ else if eq .Role "user" }}}}{_lit(up)}{{{{ .Content }}}}{_lit(us)}'
        f"{{{{ if $last }}}}{_lit(parts.generation)}{{{{ end }}}}"
        f'{{{{ else if eq .Role "assistant" }}}}{_lit(ap)}{{{{ .Content }}}}'
        f"{{{{ if not $last }}}}{_lit(as_)}{{{{ end }}}}"
        "{{ end }}{{ end }}"
    )


def stop_strings(tokenizer) -> list[str]:
    """Texts Ollama should stop on: the template's end-of-turn token and the tokenizer's EOS token."""
    out = []
    eot = end_of_turn(tokenizer)
    if eot is not None and eot.token:
        out.append(eot.token)
    if tokenizer.eos_token:
        out.append(str(tokenizer.eos_token))
    return list(dict.fromkeys(out))


def _quoted(text: str) -> str:
    if '"""' in text:
        raise TemplateNotTranslatable('a Modelfile string cannot contain """')
    return f'"""{text}"""'


def modelfile_text(gguf_name: str, tokenizer) -> str:
    parts = measure_template(tokenizer)
    lines = ["# written by tunelab: `ollama create NAME -f Modelfile` in this directory", f"FROM ./{gguf_name}",
             f"TEMPLATE {_quoted(go_template(parts))}"]
    if parts.default_system is not None:
        lines.append(f"SYSTEM {_quoted(parts.default_system)}")
    for s in stop_strings(tokenizer):
        lines.append(f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_file: str | Path, tokenizer, out: str | Path | None = None) -> Path:
    """`Modelfile` beside `gguf_file` (FROM names it relative to the Modelfile)."""
    gguf_file = Path(gguf_file)
    out = Path(out) if out is not None else gguf_file.with_name("Modelfile")
    out.write_text(modelfile_text(gguf_file.name, tokenizer), encoding="utf-8")
    return out
