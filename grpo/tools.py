"""Tools for agentic GRPO: JSON schemas, parsing the model's tool calls, running them.

- :func:`tool_schema` describes a Python function to the model exactly as transformers does
  when ``apply_chat_template(..., tools=[fn])`` is called (``get_json_schema``: the
  signature's type hints and the Google-style docstring).
- :func:`parse_tool_calls` reads the calls out of one assistant turn in the format of the
  common chat templates: ``hermes`` (Qwen2.5 / Qwen3 / Hermes ``<tool_call>{json}</tool_call>``),
  ``llama3`` (Llama 3.1 / 3.2 bare ``{"name": ..., "parameters": ...}``) and ``mistral``
  (``[TOOL_CALLS] [{...}, ...]`` and the v11 ``[TOOL_CALLS]name[ARGS]{...}``).
  :func:`detect_format` picks one from a chat template's text.
- :func:`run_tool_calls` runs the calls of one turn against ``{name: callable}`` (sync and
  async tools; async ones of the same turn run concurrently). A malformed call, an unknown
  tool, arguments that do not fit the signature and a tool that raises each become a
  :class:`ToolResult` with ``ok=False`` whose content is the error: the rollout goes on, the
  model reads the error, and the trainer counts the failure (``tools/failure_frequency``).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

FORMATS = ("hermes", "llama3", "mistral")


@attrs.frozen
class ToolCall:
    """A well-formed call: ``name`` and its keyword ``arguments``."""

    name: str
    arguments: dict
    id: str | None = None


@attrs.frozen
class MalformedCall:
    """Text that was meant as a tool call but does not parse; ``error`` says why."""

    text: str
    error: str


@attrs.frozen
class ToolResult:
    """The outcome of one call: ``content`` is what the model reads in the tool message."""

    name: str
    content: str
    ok: bool


# -- schemas --------------------------------------------------------------------------------


def tool_name(fn: Callable) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def tool_schema(fn: Callable) -> dict:
    """The JSON schema transformers renders for ``fn`` (``get_json_schema``).

    Raises:
        ValueError: ``fn`` lacks type hints or a docstring describing every argument.
    """
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as e:  # DocstringParsingException / TypeHintParsingException
        raise ValueError(
            f"tool {tool_name(fn)!r} cannot be described to the model: {e} (a tool needs type "
            "hints and a Google-style docstring with an 'Args:' line per argument)"
        ) from e


def check_tools(tools: Sequence[Callable]) -> dict[str, Callable]:
    """``{name: tool}`` after checking each is callable, describable and uniquely named."""
    out: dict[str, Callable] = {}
    for fn in tools:
        if not callable(fn):
            raise TypeError(f"tools must be callables, got {fn!r} ({type(fn).__name__})")
        name = tool_name(fn)
        if name in out and out[name] is not fn:
            raise ValueError(f"two tools are named {name!r}; tool names must be unique")
        tool_schema(fn)
        out[name] = fn
    return out


# -- parsing --------------------------------------------------------------------------------


def detect_format(chat_template: str | None) -> str:
    """The tool-call format a chat template renders: ``hermes``, ``llama3`` or ``mistral``.

    Raises:
        ValueError: the template renders none of them (pass ``tool_call_format``).
    """
    text = chat_template or ""
    if "<tool_call>" in text:
        return "hermes"
    if "[TOOL_CALLS]" in text:
        return "mistral"
    if '"parameters": ' in text and "<|start_header_id|>" in text:
        return "llama3"
    raise ValueError(
        "cannot tell the tool-call format from the chat template (no <tool_call>, [TOOL_CALLS] "
        f"or Llama 3 'parameters' JSON); set tool_call_format to one of {list(FORMATS)}"
    )


def _call_from(obj: Any, text: str, *, args_key: str = "arguments") -> ToolCall | MalformedCall:
    if not isinstance(obj, dict):
        return MalformedCall(text, f"a tool call must be a JSON object, got {type(obj).__name__}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return MalformedCall(text, "the tool call has no 'name'")
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some templates and models encode the arguments as a string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            return MalformedCall(text, f"the arguments of {name!r} are not valid JSON: {e}")
    if not isinstance(args, dict):
        return MalformedCall(text, f"the arguments of {name!r} must be a JSON object")
    call_id = obj.get("id")
    return ToolCall(name, args, call_id if isinstance(call_id, str) else None)


def _json_call(body: str, **kw) -> ToolCall | MalformedCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return MalformedCall(body, f"the tool call is not valid JSON: {e}")
    return _call_from(obj, body, **kw)


_HERMES = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.S)


def _parse_hermes(text: str):
    start = text.find("<tool_call>")
    if start < 0:
        return text.strip(), []
    calls = []
    for m in _HERMES.finditer(text, start):
        body = m.group(1).strip()
        if not m.group(2):
            calls.append(MalformedCall(body, "the tool call is not closed with </tool_call>"))
        else:
            calls.append(_json_call(body))
    return text[:start].strip(), calls


def _parse_llama3(text: str):
    body = text.replace("<|python_tag|>", "").strip()
    if not body.startswith("{"):
        return text.strip(), []
    return "", [_json_call(body, args_key="parameters")]


_MISTRAL_V11 = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*(?:\[ARGS\])?\s*(\{.*\})\s*$", re.S)


def _parse_mistral(text: str):
    start = text.find("[TOOL_CALLS]")
    if start < 0:
        return text.strip(), []
    rest = text[start + len("[TOOL_CALLS]") :].strip()
    if rest.startswith("["):
        try:
            items = json.loads(rest)
        except json.JSONDecodeError as e:
            return text[:start].strip(), [
                MalformedCall(rest, f"[TOOL_CALLS] is not valid JSON: {e}")
            ]
        if not isinstance(items, list) or not items:
            return text[:start].strip(), [MalformedCall(rest, "[TOOL_CALLS] holds no call")]
        return text[:start].strip(), [_call_from(x, json.dumps(x)) for x in items]
    calls = []
    for part in rest.split("[TOOL_CALLS]"):
        m = _MISTRAL_V11.match(part)
        if m is None:
            calls.append(MalformedCall(part, "expected [TOOL_CALLS]name[ARGS]{json}"))
        else:
            body = json.dumps({"name": m.group(1), "arguments": "__args__"})
            calls.append(_json_call(body.replace('"__args__"', m.group(2))))
    return text[:start].strip(), calls


_PARSERS = {"hermes": _parse_hermes, "llama3": _parse_llama3, "mistral": _parse_mistral}


def parse_tool_calls(text: str, *, format: str) -> tuple[str, list[ToolCall | MalformedCall]]:
    """Split one assistant turn (special tokens kept, end-of-turn token removed) into its
    text content and its tool calls.

    Args:
        text: the decoded turn.
        format: one of :data:`FORMATS`.

    Returns:
        ``(content, calls)``; ``calls`` is empty when the turn calls no tool.
    """
    if format not in _PARSERS:
        raise ValueError(f"unknown tool-call format {format!r}; choose one of {list(FORMATS)}")
    return _PARSERS[format](text)


# -- running --------------------------------------------------------------------------------


def _error(name: str, message: str) -> ToolResult:
    return ToolResult(name, str({"error": message}), False)


def _prepare(call, tools: Mapping[str, Callable]):
    """``(name, bound call or None, error result or None)``."""
    if isinstance(call, MalformedCall):
        return "unknown", None, _error("unknown", f"malformed tool call: {call.error}")
    fn = tools.get(call.name)
    if fn is None:
        return (
            call.name,
            None,
            _error(call.name, f"unknown tool {call.name!r}; tools: {sorted(tools)}"),
        )
    try:
        inspect.signature(fn).bind(**call.arguments)
    except TypeError as e:
        return call.name, None, _error(call.name, f"bad arguments for {call.name!r}: {e}")
    return call.name, fn, None


def _outcome(name: str, value: Any) -> ToolResult:
    if isinstance(value, Exception):
        return _error(name, f"{name!r} raised {type(value).__name__}: {value}")
    return ToolResult(name, value if isinstance(value, str) else str(value), True)


async def _gather(pending):
    return await asyncio.gather(*(coro for _, coro in pending), return_exceptions=True)


def run_tool_calls(
    calls: Sequence[ToolCall | MalformedCall], tools: Mapping[str, Callable]
) -> list[ToolResult]:
    """Run one turn's calls in order; async tools of the turn run concurrently.

    Never raises for a bad call: every failure is a :class:`ToolResult` with ``ok=False``.
    """
    from grpo.core.score import _run_coroutine

    results: list[ToolResult | None] = [None] * len(calls)
    pending: list[tuple[int, Any]] = []
    names = []
    for k, call in enumerate(calls):
        name, fn, err = _prepare(call, tools)
        names.append(name)
        if err is not None:
            results[k] = err
            continue
        try:
            value = fn(**call.arguments)
        except Exception as e:
            value = e
        if inspect.isawaitable(value):
            pending.append((k, value))
        else:
            results[k] = _outcome(name, value)
    if pending:
        for (k, _), value in zip(pending, _run_coroutine(_gather(pending)), strict=True):
            results[k] = _outcome(names[k], value)
    return results
