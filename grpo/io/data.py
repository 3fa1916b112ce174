"""Prompt datasets: loading, chat-template rendering, prompt budgets and a resumable sampler.

- :func:`load_prompts` reads a ``datasets.Dataset`` / ``IterableDataset``, a list of dicts, a
  local jsonl / json / csv / parquet file (through ``datasets``) or a hub id.
- :func:`render_prompt` / :func:`encode_prompt` follow TRL's ``maybe_apply_chat_template`` and
  prompt tokenisation; :class:`PromptEncoder` adds the left truncation that always leaves room
  for the completion.
- :class:`PromptSampler` yields ``B`` distinct prompts per step, each repeated ``G`` times, in
  group-contiguous order, shuffled per epoch, sharded by ``(rank, world_size)`` and resumable
  from ``state_dict()``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import datasets
import numpy as np

from grpo.core.score import is_conversational
from grpo.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

PROMPT = "prompt"
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
OVERFLOW = ("truncate", "error", "drop")


class PromptTooLongError(DataError):
    """A prompt does not fit its token budget and ``overflow="error"``."""


# --- loading -------------------------------------------------------------------------------


def column_names(dataset: Any) -> list[str] | None:
    """Columns of a dataset or list of dicts; None for a stream whose schema is unknown yet."""
    if isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        return dataset.column_names
    if isinstance(dataset, Sequence) and len(dataset) > 0 and isinstance(dataset[0], Mapping):
        return list(dict.fromkeys(k for row in dataset for k in row))
    return None


def _missing_prompt(columns: Sequence[str]) -> DataError:
    return DataError(
        f"the dataset has no {PROMPT!r} column; its columns are {list(columns)} "
        "(pass prompt_column=... to use another one)"
    )


def check_prompt_column(dataset: Any) -> None:
    """Raise if ``dataset`` visibly lacks a ``prompt`` column or has no rows."""
    columns = column_names(dataset)
    if isinstance(dataset, (datasets.Dataset, list)) and len(dataset) == 0:
        raise DataError(f"the dataset is empty (0 rows; columns: {columns or []})")
    if columns is not None and PROMPT not in columns:
        raise _missing_prompt(columns)


def _load_path(path: Path, *, split: str, streaming: bool, **kwargs) -> Any:
    if path.is_dir():
        return datasets.load_dataset(str(path), split=split, streaming=streaming, **kwargs)
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"cannot load {str(path)!r}: unknown file type {path.suffix!r}; "
            f"use one of {sorted(FILE_BUILDERS)}"
        )
    return datasets.load_dataset(
        builder, data_files=str(path), split="train", streaming=streaming, **kwargs
    )


def _select_split(dataset: Any, split: str) -> Any:
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in dataset:
            raise DataError(f"split {split!r} not found; available splits: {list(dataset)}")
        return dataset[split]
    return dataset


def _rename_prompt_column(dataset: Any, prompt_column: str) -> Any:
    columns = dataset.column_names
    if columns is not None and prompt_column not in columns:
        raise DataError(
            f"prompt_column={prompt_column!r} is not a column; columns are {list(columns)}"
        )
    if columns is not None and PROMPT in columns:
        raise DataError(
            f"prompt_column={prompt_column!r} but the dataset also has a {PROMPT!r} column; "
            "drop or rename one of them"
        )
    return dataset.rename_column(prompt_column, PROMPT)


def load_prompts(
    source: Any,
    *,
    split: str = "train",
    streaming: bool = False,
    prompt_column: str = PROMPT,
    **load_kwargs,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load a prompt dataset and check it has a ``prompt`` column.

    Args:
        source: a ``Dataset`` / ``IterableDataset`` / ``DatasetDict``, a list of dicts, a local
            ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file or folder, or a hub id (passed
            to ``datasets.load_dataset`` with ``load_kwargs``).
        split: split to use for dicts, folders and hub ids.
        streaming: load files and hub ids as an ``IterableDataset`` (read lazily).
        prompt_column: column holding the prompts, renamed to ``prompt``.

    Returns:
        A ``datasets.Dataset`` (or ``IterableDataset`` when streaming).
    """
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if path.exists():
            dataset = _load_path(path, split=split, streaming=streaming, **load_kwargs)
        elif path.suffix.lower() in FILE_BUILDERS:
            raise FileNotFoundError(f"no such dataset file: {str(path)!r}")
        else:
            dataset = datasets.load_dataset(
                str(source), split=split, streaming=streaming, **load_kwargs
            )
    elif isinstance(source, list):
        check_prompt_formats(r.get(PROMPT) if isinstance(r, Mapping) else None for r in source)
        try:
            dataset = datasets.Dataset.from_list(source)
        except (TypeError, ValueError, ArithmeticError) as e:  # pyarrow's mixed-type errors
            raise DataError(
                f"cannot build a dataset from these rows: {type(e).__name__}: {e}; every "
                "column must hold one type"
            ) from e
    else:
        dataset = source
    dataset = _select_split(dataset, split)
    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        raise TypeError(
            "expected a datasets.Dataset / IterableDataset, a list of dicts or a path, got "
            f"{type(source).__name__}"
        )
    if prompt_column != PROMPT:
        dataset = _rename_prompt_column(dataset, prompt_column)
    check_prompt_column(dataset)
    return dataset


def check_row(row: Mapping, index: int) -> None:
    """Raise unless ``row`` has a non-empty ``prompt``, naming the row and its columns."""
    if PROMPT not in row:
        raise _missing_prompt(list(row))
    prompt = row[PROMPT]
    empty = prompt is None or (isinstance(prompt, (str, list, tuple)) and len(prompt) == 0)
    if empty:
        raise DataError(f"row {index} has an empty {PROMPT!r} ({prompt!r}); columns: {list(row)}")
    if not isinstance(prompt, str) and not is_conversational(prompt):
        raise DataError(
            f"row {index}: {PROMPT!r} must be a string or a list of {{role, content}} messages, "
            f"got {prompt!r:.80}"
        )
    if not isinstance(prompt, str):
        for m, message in enumerate(prompt):
            if not isinstance(message, Mapping) or "role" not in message:
                raise DataError(
                    f"row {index}: message {m} of {PROMPT!r} must be a {{role, content}} "
                    f"mapping, got {message!r:.80}"
                )
        try:
            _generation_flags(prompt)
        except DataError as e:
            raise DataError(f"row {index}: {e}") from e


def _prompt_column(dataset: datasets.Dataset) -> list:
    # One Arrow read of the column (row-by-row access costs ~0.1 ms a row), unless the
    # feature decodes its stored strings (datasets' Json type holds a jsonl column that
    # mixes strings and message lists as JSON text).
    feature = dataset.features.get(PROMPT)
    plain = (datasets.Value, datasets.Sequence, list, getattr(datasets, "List", list))
    if not isinstance(feature, plain):
        return list(dataset[PROMPT])
    return dataset.with_format("arrow")[:][PROMPT].to_pylist()


def check_prompts(dataset: Any, *, encoder: Callable[..., Any] | None = None) -> None:
    """Check every row of a map-style dataset before training (streams are checked lazily).

    Each ``prompt`` must be a non-empty string or message list (:func:`check_row`), all of
    one format (plain strings or conversations, never both); with an
    ``encoder`` every prompt is also encoded, so an encoder with ``overflow="error"`` rejects a
    prompt that does not fit its budget now rather than at the step that samples it.
    """
    if _is_stream(dataset):
        return
    check_prompt_column(dataset)
    prompts = _prompt_column(dataset) if isinstance(dataset, datasets.Dataset) else None
    rows = [
        {PROMPT: prompts[index]} if prompts is not None else dataset[index]
        for index in range(len(dataset))
    ]
    for index, row in enumerate(rows):
        check_row(row, index)
    check_prompt_formats(row[PROMPT] for row in rows)
    if encoder is not None:
        for index, row in enumerate(rows):
            encoder(row[PROMPT], row=index)


def check_prompt_formats(prompts: Iterable[Any]) -> None:
    """Raise :class:`DataError` if plain-string and conversational prompts are mixed,
    naming the first row of each kind."""
    first: dict[str, int] = {}  # prompt format -> first row in it
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            first.setdefault("plain", index)
        elif is_conversational(prompt):
            first.setdefault("chat", index)
        if len(first) == 2:
            # Completions reach the rewards as strings or as message lists depending on the
            # batch's first prompt, so a mixed dataset would switch formats batch by batch.
            raise DataError(
                f"the dataset mixes prompt formats: row {first['plain']} is a plain string, "
                f"row {first['chat']} is conversational (a list of messages); use one format "
                "for every row"
            )


# --- rendering and tokenisation --------------------------------------------------------------


def _hf_tokenizer(tokenizer: Any) -> Any:
    # mlx-lm's TokenizerWrapper keeps the Hugging Face tokenizer in ``_tokenizer``.
    return getattr(tokenizer, "_tokenizer", tokenizer)


def _generation_flags(messages: Sequence[Mapping]) -> dict[str, bool]:
    last = messages[-1].get("role")
    if last in ("user", "tool"):
        return {"add_generation_prompt": True, "continue_final_message": False}
    if last == "assistant":
        return {"add_generation_prompt": False, "continue_final_message": True}
    raise DataError(
        f"invalid role in the last message: {last!r}; a prompt must end with a 'user', 'tool' "
        "or (to be continued) 'assistant' message"
    )


def render_prompt(
    prompt: str | Sequence[Mapping], tokenizer: Any, *, chat_template: str | None = None, **kwargs
) -> str:
    """A prompt as text, as TRL's ``maybe_apply_chat_template`` renders it.

    Plain strings pass through. Message lists go through the chat template (``chat_template``
    overrides the tokenizer's), with ``add_generation_prompt`` when the last message is the
    user's (or a tool's) and ``continue_final_message`` when it is the assistant's. Extra
    ``kwargs`` reach the template.
    """
    if isinstance(prompt, str):
        return prompt
    flags = _generation_flags(prompt)
    hf = _hf_tokenizer(tokenizer)
    if chat_template is None and getattr(hf, "chat_template", None) is None:
        if getattr(tokenizer, "has_chat_template", False) and hf is not tokenizer:
            # mlx-lm supplies its own renderer for some models.
            return tokenizer.apply_chat_template(list(prompt), tokenize=False, **flags, **kwargs)
        raise DataError(
            "the tokenizer has no chat template, so conversational prompts cannot be rendered; "
            "pass chat_template=... or use plain-string prompts"
        )
    return hf.apply_chat_template(
        list(prompt), tokenize=False, chat_template=chat_template, **flags, **kwargs
    )


def encode_prompt(
    prompt: str | Sequence[Mapping], tokenizer: Any, *, chat_template: str | None = None, **kwargs
) -> list[int]:
    """Token ids of a prompt, as TRL tokenises it: a rendered conversation without extra special
    tokens (the template has them), a plain string with the tokenizer's special tokens."""
    text = render_prompt(prompt, tokenizer, chat_template=chat_template, **kwargs)
    hf = _hf_tokenizer(tokenizer)
    return list(hf.encode(text, add_special_tokens=isinstance(prompt, str)))


def prompt_budget(
    *,
    max_prompt_length: int | None = None,
    max_completion_length: int,
    context_length: int | None = None,
) -> int | None:
    """Most prompt tokens a row may keep: ``min(max_prompt_length, context - max_completion)``.

    Reserving the whole completion budget inside the model context means every kept prompt
    leaves room for at least one (indeed ``max_completion_length``) completion tokens.

    Returns:
        The budget, or None when nothing limits prompts.

    Raises:
        ValueError: when no prompt token would fit.
    """
    if max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1 or None, got {max_prompt_length}")
    budget = max_prompt_length
    if context_length is not None:
        room = context_length - max_completion_length
        if room < 1:
            raise ConfigError(
                f"max_completion_length={max_completion_length} leaves no room for a prompt in "
                f"the model context of {context_length} tokens; use at most {context_length - 1}"
            )
        budget = room if budget is None else min(budget, room)
    return budget


def fit_prompt(
    ids: Sequence[int], *, budget: int | None, overflow: str = "truncate", row: Any = None
) -> list[int] | None:
    """Fit prompt token ids into ``budget``: keep the last ``budget`` tokens (``"truncate"``,
    TRL's left truncation), raise (``"error"``) or return None (``"drop"``)."""
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow={overflow!r} is not supported; choose one of {list(OVERFLOW)}")
    ids = list(ids)
    if budget is None or len(ids) <= budget:
        return ids
    if overflow == "truncate":
        return ids[-budget:]
    if overflow == "drop":
        return None
    raise PromptTooLongError(
        f"prompt at row {row} has {len(ids)} tokens, more than the budget of {budget} "
        "(min(max_prompt_length, context length - max_completion_length)); shorten it, raise "
        "the limits, or set overflow='truncate' / 'drop'"
    )


@attrs.frozen
class PromptEncoder:
    """Render, tokenise and fit one prompt: ``encoder(prompt, row=i) -> ids | None``.

    ``None`` means the prompt was dropped (``overflow="drop"``); :class:`PromptSampler` counts
    it and moves on.
    """

    tokenizer: Any
    max_completion_length: int
    max_prompt_length: int | None = None
    context_length: int | None = None
    overflow: str = attrs.field(default="truncate", validator=attrs.validators.in_(OVERFLOW))
    chat_template: str | None = None
    template_kwargs: Mapping[str, Any] = attrs.field(factory=dict)

    def __attrs_post_init__(self):
        self.budget  # noqa: B018  (validate the limits now, not at the first prompt)

    @property
    def budget(self) -> int | None:
        return prompt_budget(
            max_prompt_length=self.max_prompt_length,
            max_completion_length=self.max_completion_length,
            context_length=self.context_length,
        )

    def __call__(self, prompt: str | Sequence[Mapping], *, row: Any = None) -> list[int] | None:
        try:
            ids = encode_prompt(
                prompt, self.tokenizer, chat_template=self.chat_template, **self.template_kwargs
            )
        except DataError as e:
            if row is None:
                raise
            raise DataError(f"row {row}: {e}") from e
        except Exception as e:  # a Jinja chat template rejecting the messages
            where = f"row {row}: " if row is not None else ""
            raise DataError(
                f"{where}the chat template cannot render this prompt "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from e
        return fit_prompt(ids, budget=self.budget, overflow=self.overflow, row=row)


def stop_token_sequences(stop: str | Sequence[str] | None, tokenizer: Any) -> list[list[int]]:
    """Token id sequences of stop strings, for the rollout to match on generated ids.

    Each string is encoded on its own (no special tokens added); a BPE tokenizer may split the
    same text differently inside a completion, so the rollout should also check decoded text
    when exact stopping matters.
    """
    if stop is None:
        return []
    strings = [stop] if isinstance(stop, str) else list(stop)
    hf = _hf_tokenizer(tokenizer)
    out: list[list[int]] = []
    for s in strings:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        ids = list(hf.encode(s, add_special_tokens=False))
        if not ids:
            raise ValueError(f"stop string {s!r} encodes to no tokens")
        if ids not in out:
            out.append(ids)
    return out


def decode_completions(completion_ids: Sequence[Sequence[int]], tokenizer: Any) -> list[str]:
    """Completion texts for reward functions, as TRL decodes them (special tokens skipped).

    Args:
        completion_ids: ``N`` lists of completion token ids, padding already removed.
    """
    hf = _hf_tokenizer(tokenizer)
    return [hf.decode(list(ids), skip_special_tokens=True) for ids in completion_ids]


# --- sampling ------------------------------------------------------------------------------


class PromptBatch(NamedTuple):
    """One step's prompts: ``B`` distinct rows, each repeated ``G`` times (group-contiguous)."""

    prompts: list  # N = B*G raw prompts (str or message lists)
    columns: dict[str, list]  # every other column, N values each (for reward kwargs)
    indices: list[int]  # B dataset indices (stream positions when streaming)
    prompt_ids: list[list[int]] | None  # B encoded prompts when the sampler has an encoder

    @property
    def group_size(self) -> int:
        return len(self.prompts) // len(self.indices)

    @property
    def unique_prompts(self) -> list:
        """The ``B`` distinct prompts, one per group."""
        return self.prompts[:: self.group_size]


def _is_stream(dataset: Any) -> bool:
    return isinstance(dataset, datasets.IterableDataset) or not hasattr(dataset, "__getitem__")


class PromptSampler:
    """Seeded, resumable iterator of :class:`PromptBatch`: ``B`` distinct prompts per step.

    Map-style data (``Dataset``, list of dicts): each epoch is a permutation drawn from
    ``numpy.random.default_rng(seed + epoch)``; the first ``n - n % world_size`` rows are
    dealt round-robin to ranks (rank ``r`` takes positions ``r, r + W, ...``), so shards never
    overlap and every rank has the same number of rows. A batch never spans two epochs (so its
    prompts are distinct); the epoch's last ``len(shard) % B`` rows wait for the next shuffle.

    Streaming data (``IterableDataset``): read lazily, never drained into a list. With
    ``shuffle=True`` each epoch uses ``dataset.shuffle(seed=seed + epoch,
    buffer_size=shuffle_buffer)`` (a reservoir that reads ``shuffle_buffer`` rows ahead);
    ``shuffle=False`` reads in order. Ranks take every ``world_size``-th row; the epoch's final
    incomplete round of ``world_size`` rows is skipped so ranks stay in step.

    ``state_dict()`` holds the epoch and the position within it (rows consumed, including
    dropped ones); ``load_state_dict`` restores the exact sequence (streams skip ahead lazily).

    With an ``encoder`` (e.g. :class:`PromptEncoder`), batches carry ``prompt_ids``; a prompt
    the encoder drops (None) is counted in ``num_dropped``, logged, and replaced by the next
    row. With ``world_size > 1``, drops can leave ranks with different step counts: prefer
    ``overflow="truncate"`` or ``"error"`` there.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        batch_size: int,
        group_size: int,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        encoder: Callable[..., list[int] | None] | None = None,
    ):
        if batch_size < 1 or group_size < 1:
            raise ValueError(
                f"batch_size and group_size must be >= 1, got {batch_size} and {group_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(
                f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
            )
        check_prompt_column(dataset)
        self.dataset, self.encoder = dataset, encoder
        self.batch_size, self.group_size, self.seed = batch_size, group_size, seed
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.streaming = _is_stream(dataset)
        self.epoch, self.cursor, self.num_dropped = 0, 0, 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, shard indices)
        self._stream: Iterator | None = None
        if not self.streaming and len(self._shard(0)) < batch_size:
            raise DataError(
                f"rank {rank}'s shard has {len(self._shard(0))} rows ({len(dataset)} rows over "
                f"{world_size} rank(s)); batch_size={batch_size} needs at least {batch_size} "
                "distinct prompts per step"
            )

    # -- map-style order ----------------------------------------------------------------------

    def _shard(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            n = len(self.dataset)
            order = (
                np.random.default_rng(self.seed + epoch).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            usable = n - n % self.world_size
            self._order = (epoch, order[:usable][self.rank :: self.world_size])
        return self._order[1]

    def _next_indexed(self) -> tuple[int, Mapping] | None:
        shard = self._shard(self.epoch)
        if self.cursor >= len(shard):
            return None
        index = int(shard[self.cursor])
        self.cursor += 1
        return index, self.dataset[index]

    # -- streaming order ----------------------------------------------------------------------

    def _open_stream(self) -> Iterator:
        ds = self.dataset
        if self.shuffle and hasattr(ds, "shuffle"):
            ds = ds.shuffle(seed=self.seed + self.epoch, buffer_size=self.shuffle_buffer)
        stream = iter(ds)
        for _ in itertools.islice(stream, self.cursor):  # resume: skip lazily, keep nothing
            pass
        return stream

    def _next_streamed(self) -> tuple[int, Mapping] | None:
        if self._stream is None:
            self._stream = self._open_stream()
        # Read one full round of world_size rows and keep ours, so ranks stay in step.
        start = self.cursor - self.cursor % self.world_size
        ours = None
        while self.cursor < start + self.world_size:
            row = next(self._stream, None)
            if row is None:
                self._stream = None
                return None
            if self.cursor % self.world_size == self.rank:
                ours = (self.cursor, row)
            self.cursor += 1
        return ours

    # -- batches ------------------------------------------------------------------------------

    def _next_row(self) -> tuple[int, Mapping] | None:
        return self._next_streamed() if self.streaming else self._next_indexed()

    def _accept(self, index: int, row: Mapping) -> list[int] | None:
        """The row's prompt ids ([] without an encoder), or None when the encoder drops it."""
        check_row(row, index)
        if self.encoder is None:
            return []
        ids = self.encoder(row[PROMPT], row=index)
        if ids is None:
            self.num_dropped += 1
            logger.warning(
                "dropped the prompt at row %d: it does not fit the prompt budget "
                "(%d dropped so far)",
                index,
                self.num_dropped,
            )
        return ids

    def _fill_epoch(self) -> list[tuple[int, Mapping, Any]] | None:
        picked = []
        while len(picked) < self.batch_size:
            item = self._next_row()
            if item is None:
                return None  # epoch exhausted; a partial batch is discarded
            ids = self._accept(*item)
            if ids is not None:
                picked.append((*item, ids))
        return picked

    def __iter__(self) -> PromptSampler:
        return self

    def __next__(self) -> PromptBatch:
        for _ in range(2):
            fresh = self.cursor == 0
            picked = self._fill_epoch()
            if picked is not None:
                return self._batch(picked)
            self.epoch, self.cursor, self._stream = self.epoch + 1, 0, None
            if fresh:
                break
        raise DataError(
            f"a whole epoch gave fewer than batch_size={self.batch_size} usable prompts on rank "
            f"{self.rank} ({self.num_dropped} dropped for not fitting the prompt budget)"
        )

    def _batch(self, picked: list[tuple[int, Mapping, Any]]) -> PromptBatch:
        G = self.group_size
        rows = [row for _, row, _ in picked]
        keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k != PROMPT]
        return PromptBatch(
            prompts=[row[PROMPT] for row in rows for _ in range(G)],
            columns={k: [row.get(k) for row in rows for _ in range(G)] for k in keys},
            indices=[index for index, _, _ in picked],
            prompt_ids=None if self.encoder is None else [list(ids) for _, _, ids in picked],
        )

    # -- state --------------------------------------------------------------------------------

    @property
    def steps_per_epoch(self) -> int | None:
        """Batches per epoch for map-style data without drops; None for streams."""
        return None if self.streaming else len(self._shard(self.epoch)) // self.batch_size

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.cursor,
            "num_dropped": self.num_dropped,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume at ``state``'s position; the seed and layout must match the saved run."""
        for key in ("seed", "batch_size", "rank", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: the saved sampler has {key}={state[key]}, this one has "
                    f"{key}={getattr(self, key)}; the prompt sequence would differ"
                )
        self.epoch, self.cursor = int(state["epoch"]), int(state["position"])
        self.num_dropped = int(state.get("num_dropped", 0))
        self._stream = None


def decode_rollout(roll: Any, tokenizer: Any) -> tuple[list[list[int]], list[str]]:
    """``(ids, texts)`` of a rollout's completions: each row's ids up to its length, and
    their text (:func:`decode_completions`)."""
    ids = np.array(roll.completion_ids)
    lengths = np.array(roll.completion_lengths)
    rows = [ids[i, : lengths[i]].tolist() for i in range(ids.shape[0])]
    return rows, decode_completions(rows, tokenizer)


def eos_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """EOS ids of an mlx-lm ``TokenizerWrapper`` or a Hugging Face tokenizer."""
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids:
        return tuple(sorted(int(i) for i in ids))
    eos = getattr(_hf_tokenizer(tokenizer), "eos_token_id", None)
    if eos is None:
        raise ConfigError("the tokenizer has no eos_token_id; completions could never end")
    return (int(eos),) if isinstance(eos, int) else tuple(int(i) for i in eos)
