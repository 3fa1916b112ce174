"""TRL's ``environment_factory``: one environment instance per rollout row, its methods as tools.

Rules (TRL 1.x, ``GRPOTrainer(environment_factory=...)``):

- ``environment_factory`` is a zero-argument callable (usually a class) or a dict
  ``{name: factory}``; with a dict every row picks its environment by its ``environment``
  column, and only that environment's tools are rendered into its prompt.
- Each environment must define ``reset(**row)``; it is called once per rollout row (``G``
  times per prompt, one instance each) with the row's columns (``environment`` excluded). A
  string it returns is appended to the last user message: the environment may own the data.
- Every public method other than ``reset`` and ``get_reward`` is a tool (documented as any
  tool); the trainer's ``tools=`` are exposed beside them.
- ``get_reward()`` (sync or async), when defined, becomes one extra reward function per
  environment class, named after the class, weight 1; rows of another environment score
  ``None`` under it.
- Instances are created once and pooled: a batch that needs more instances of an
  environment than exist creates them, and every batch resets the ones it uses.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from grpo.tools import check_tools, tool_name

ENVIRONMENT_COLUMN = "environment"
_NOT_TOOLS = ("reset", "get_reward")


def environment_methods(instance: Any) -> list[Callable]:
    """The public bound methods of ``instance`` that are tools (not ``reset``/``get_reward``)."""
    return [
        member
        for name, member in inspect.getmembers(instance, predicate=inspect.ismethod)
        if name not in _NOT_TOOLS and not name.startswith("_")
    ]


def environment_reward(env_type: type) -> Callable:
    """A reward function scoring each row by its environment's ``get_reward()``; ``None`` for
    rows bound to another environment class."""
    if inspect.iscoroutinefunction(env_type.get_reward):

        async def reward(environments, **kwargs):
            return [await e.get_reward() if type(e) is env_type else None for e in environments]

    else:

        def reward(environments, **kwargs):
            return [e.get_reward() if type(e) is env_type else None for e in environments]

    reward.__name__ = reward.__qualname__ = env_type.__name__
    return reward


class Environments:
    """The environments of a run: validated factories, per-row instances and their tools.

    Args:
        factory: a callable returning an environment, or ``{name: callable}``.
        tools: the trainer's standalone tools, exposed in every environment too.
    """

    def __init__(self, factory: Callable | Mapping[str, Callable], tools: Sequence[Callable] = ()):
        self.multi = isinstance(factory, Mapping)
        self.factories = dict(factory) if self.multi else {None: factory}
        if not self.factories:
            raise ValueError("environment_factory is an empty dict; give at least one environment")
        self.tools = list(tools)
        self.pool: dict[Any, list] = {}
        self.env_tools: dict[Any, list[Callable]] = {}
        self.reward_funcs: list[Callable] = []
        reward_types: list[type] = []
        for name, make in self.factories.items():
            if not callable(make):
                raise TypeError(f"environment_factory[{name!r}] is not callable: {make!r}")
            instance = make()
            if not callable(getattr(instance, "reset", None)):
                raise ValueError(
                    f"environment {type(instance).__name__} must define a callable reset(**row)"
                )
            methods = environment_methods(instance)
            check_tools(self.tools + methods)
            self.env_tools[name] = self.tools + methods
            self.pool[name] = [instance]
            env_type = type(instance)
            has_reward = callable(getattr(instance, "get_reward", None))
            if has_reward and env_type not in reward_types:  # one column per class
                reward_types.append(env_type)
                self.reward_funcs.append(environment_reward(env_type))

    @property
    def all_tools(self) -> list[Callable]:
        """Every tool of every environment (deduplicated by name), for checks and metrics."""
        seen: dict[str, Callable] = {}
        for tools in self.env_tools.values():
            for fn in tools:
                seen.setdefault(tool_name(fn), fn)
        return list(seen.values())

    def names(self, columns: Mapping[str, Sequence], n: int) -> list:
        """Each row's environment name (``None`` for a single factory)."""
        if not self.multi:
            return [None] * n
        if ENVIRONMENT_COLUMN not in columns:
            raise ValueError(
                f"a dict environment_factory needs an {ENVIRONMENT_COLUMN!r} column naming each "
                f"row's environment (one of {sorted(self.factories)})"
            )
        names = list(columns[ENVIRONMENT_COLUMN])
        for name in dict.fromkeys(names):
            if name not in self.factories:
                raise ValueError(
                    f"a row has environment={name!r}, which is not among the environments passed "
                    f"to environment_factory; expected one of {sorted(self.factories)}"
                )
        return names

    def acquire(self, names: Sequence) -> list:
        """One pooled instance per row (creating more when the batch needs them)."""
        cursor: dict[Any, int] = {}
        out = []
        for name in names:
            pool, k = self.pool[name], cursor.get(name, 0)
            if k == len(pool):
                pool.append(self.factories[name]())
            cursor[name] = k + 1
            out.append(pool[k])
        return out

    def reset(self, instances: Sequence, rows: Sequence[Mapping]) -> list:
        """``reset(**row)`` on every instance; returns what each returned (None or a string)."""
        out = []
        for env, row in zip(instances, rows, strict=True):
            kwargs = {k: v for k, v in row.items() if not (self.multi and k == ENVIRONMENT_COLUMN)}
            out.append(env.reset(**kwargs))
        return out

    def tools_for(self, instance: Any) -> dict[str, Callable]:
        """``{name: callable}`` of one row: the standalone tools and its instance's methods."""
        return {tool_name(fn): fn for fn in self.tools + environment_methods(instance)}

    def schemas_for(self, name: Any) -> list[Callable]:
        """The tools rendered into a prompt of environment ``name``."""
        return self.env_tools[name]


def with_observation(prompt: Any, observation: Any) -> Any:
    """``prompt`` with ``observation`` (a string returned by ``reset``) appended to its last
    user message, as TRL does; the dataset row is left untouched."""
    if observation is None:
        return prompt
    if not isinstance(observation, str):
        raise TypeError(
            f"reset() returned {type(observation).__name__}; return None or the text to append "
            "to the prompt's last message"
        )
    if isinstance(prompt, str):
        return prompt + observation
    last = dict(prompt[-1])
    last["content"] = (last.get("content") or "") + observation
    return [*prompt[:-1], last]
