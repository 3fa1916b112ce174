"""The tool-calling loop of the trainer: chat-template glue around the pure multi-turn rollout.

:func:`grpo.core.multiturn.multiturn_rollout` samples the turns; :class:`ToolLoop` is its
``respond`` callback. For each finished assistant turn it decodes the sampled ids (special
tokens kept), parses the tool calls (:mod:`grpo.tools`), runs them against that row's tools
and returns the token ids of the chat template's rendering of the tool messages, computed as
TRL's ``_get_tool_suffix_ids`` does: render a short conversation ending in an assistant
tool call with and without the tool messages (plus the generation prompt), cut the first at
its last EOS, and keep what the second adds. The sampled ids are never re-tokenised.

Per row it also builds the completion as TRL hands it to reward functions: a list of
``{"role": "assistant", ...}`` / ``{"role": "tool", ...}`` messages.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

from grpo.core.multiturn import MultiTurnRollout, Turn, multiturn_rollout
from grpo.core.rollout import Rollout, rollout
from grpo.tools import ToolCall, detect_format, parse_tool_calls, run_tool_calls


class AgentRollout(NamedTuple):
    """A multi-turn generation batch and what the trainer logs about it."""

    rollout: Rollout  # completion_mask 1 on every completion token
    tool_mask: mx.array  # [N, T] float32, 1 on tokens the model sampled
    completions: list  # N message lists (assistant and tool turns), as TRL's completions
    metrics: dict  # tools/* metrics of the batch


class ToolStats:
    """Counts of one batch: calls, failures and calls per tool name."""

    def __init__(self):
        self.calls, self.failures, self.per_tool = 0, 0, Counter()

    def add(self, results) -> None:
        for r in results:
            self.calls += 1
            self.failures += not r.ok
            self.per_tool[r.name] += 1

    def metrics(self, num_rows: int, turns: np.ndarray) -> dict[str, float]:
        # TRL: calls per completion, and failures per call (0 when nothing was called).
        out = {
            "tools/call_frequency": self.calls / max(num_rows, 1),
            "tools/failure_frequency": self.failures / self.calls if self.calls else 0.0,
            "tools/turns_per_completion": float(turns.mean()) if turns.size else 0.0,
        }
        for name, n in sorted(self.per_tool.items()):
            out[f"tools/calls/{name}"] = n / max(num_rows, 1)
        return out


def hf_tokenizer(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer inside an mlx-lm ``TokenizerWrapper``, or ``tokenizer``."""
    inner = getattr(tokenizer, "_tokenizer", None)
    return inner if hasattr(inner, "apply_chat_template") else tokenizer


def _call_id(row: int, k: int) -> str:
    # Nine alphanumerics: Mistral's templates reject any other tool-call id.
    return f"c{row:04d}{k:04d}"[-9:].rjust(9, "0")


class ToolLoop:
    """Runs a generation batch with tools; one instance per trainer.

    Args:
        tokenizer: an mlx-lm ``TokenizerWrapper`` or a Hugging Face tokenizer whose chat
            template renders tool calls and tool messages.
        format: tool-call format (``hermes`` / ``llama3`` / ``mistral``); ``None`` detects it
            from the chat template.
        max_iterations: most rounds of tool calls per completion (TRL's
            ``max_tool_calling_iterations``; ``None``: no limit but the token budget).
        chat_template: overrides the tokenizer's template.
        template_kwargs: extra template variables (TRL's ``chat_template_kwargs``).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        format: str | None = None,
        max_iterations: int | None = None,
        chat_template: str | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ):
        self.hf = hf_tokenizer(tokenizer)
        self.chat_template = chat_template
        template = chat_template or getattr(self.hf, "chat_template", None)
        if not template:
            raise ValueError("tools need a tokenizer with a chat template that renders tool calls")
        self.format = format or detect_format(template)
        self.max_iterations = max_iterations
        self.template_kwargs = dict(template_kwargs or {})
        self.sampler = rollout  # what samples each turn (any grpo.core.rollout.Sampler)
        eos = getattr(self.hf, "eos_token_id", None)
        self.eos_id = eos if isinstance(eos, int) else None

    # -- rendering -------------------------------------------------------------------------

    def _render(self, messages, **kw) -> list[int]:
        text = self.hf.apply_chat_template(
            messages,
            tokenize=False,
            chat_template=self.chat_template,
            **self.template_kwargs,
            **kw,
        )
        return list(self.hf.encode(text, add_special_tokens=False))

    def suffix_ids(self, tool_messages: Sequence[Mapping]) -> list[int]:
        """Token ids the template puts after an assistant tool-call turn's EOS: the tool
        messages and the next assistant header."""
        calls = [
            {
                "type": "function",
                "id": m["tool_call_id"],
                "function": {"name": m["name"], "arguments": {}},
            }
            for m in tool_messages
        ]
        dummy = [
            {"role": "user", "content": "dummy"},
            {"role": "assistant", "content": "", "tool_calls": calls},
        ]
        prefix = self._render(dummy, add_generation_prompt=False)
        full = self._render(dummy + list(tool_messages), add_generation_prompt=True)
        # Templates close a turn with "EOS\n"; the sampled turn stops at EOS, so cut there.
        if self.eos_id is not None and self.eos_id in prefix:
            prefix = prefix[: len(prefix) - prefix[::-1].index(self.eos_id)]
        if full[: len(prefix)] != prefix:
            raise ValueError(
                "the chat template is not prefix-preserving: rendering tool messages after an "
                "assistant tool call changes the tokens before them, so tool results cannot be "
                "appended without re-tokenising (use a template that renders earlier turns "
                "unchanged, e.g. TRL's training templates)"
            )
        return full[len(prefix) :]

    def decode_turn(self, ids: Sequence[int], *, ended: bool) -> str:
        ids = list(ids)
        if ended and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        return self.hf.decode(ids, skip_special_tokens=False)

    # -- one turn ----------------------------------------------------------------------------

    def _assistant_message(self, t: Turn) -> tuple[dict, list]:
        text = self.decode_turn(t.ids, ended=t.ended)
        content, calls = parse_tool_calls(text, format=self.format)
        if not calls:
            plain = self.hf.decode(list(t.ids), skip_special_tokens=True)
            return {"role": "assistant", "content": plain}, []
        message = {"role": "assistant", "content": content}
        ids = [getattr(c, "id", None) or _call_id(t.row, k) for k, c in enumerate(calls)]
        valid = [
            {"type": "function", "id": i, "function": {"name": c.name, "arguments": c.arguments}}
            for c, i in zip(calls, ids, strict=True)
            if isinstance(c, ToolCall)
        ]
        if valid:
            message["tool_calls"] = valid
        return message, list(zip(calls, ids, strict=True))

    def respond_fn(
        self, tools_per_row: Sequence[Mapping[str, Callable]], completions: list, stats: ToolStats
    ) -> Callable:
        """The ``respond`` callback of :func:`multiturn_rollout` for one batch."""

        def respond(turn: int, turns: list[Turn]):
            out = []
            for t in turns:
                message, calls = self._assistant_message(t)
                completions[t.row].append(message)
                if t.final or not calls:  # max_turns marks the last allowed turn final
                    out.append(None)
                    continue
                results = run_tool_calls([c for c, _ in calls], tools_per_row[t.row])
                stats.add(results)
                tool_messages = [
                    {"role": "tool", "name": r.name, "content": r.content, "tool_call_id": i}
                    for r, (_, i) in zip(results, calls, strict=True)
                ]
                delta = self.suffix_ids(tool_messages)
                if len(delta) < t.room:  # else the row ends here and the results are dropped
                    completions[t.row].extend(tool_messages)
                out.append(delta)
            return out

        return respond

    # -- a batch -----------------------------------------------------------------------------

    def run(
        self,
        params: dict,
        key: mx.array,
        prompts: list[list[int]],
        tools_per_row: Sequence[Mapping[str, Callable]],
        *,
        model,
        sampling,
        sampler=None,
    ) -> AgentRollout:
        """Multi-turn completions of ``prompts`` (``B`` prompts, ``G = sampling.group_size``
        rows each; ``tools_per_row`` has ``B * G`` entries)."""
        N = len(prompts) * sampling.group_size
        if len(tools_per_row) != N:
            raise ValueError(f"got tools for {len(tools_per_row)} rows, expected {N}")
        completions: list[list[dict]] = [[] for _ in range(N)]
        stats = ToolStats()
        max_turns = None if self.max_iterations is None else self.max_iterations + 1
        out: MultiTurnRollout = multiturn_rollout(
            params,
            key,
            prompts,
            model=model,
            sampling=sampling,
            respond=self.respond_fn(tools_per_row, completions, stats),
            max_turns=max_turns,
            sampler=sampler or self.sampler,
        )
        metrics = stats.metrics(N, np.array(out.num_turns))
        return AgentRollout(out.rollout, out.tool_mask, completions, metrics)
