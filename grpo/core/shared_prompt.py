"""Deprecated: the shared-prefix training forward is :mod:`grpo.core.shared_prefix`.

The old names still resolve, with a ``DeprecationWarning``: ``can_share`` ->
``can_share_prefix``, ``prefix_ok`` -> ``prefix_sharing_verified``, ``shared_prompt_hidden``
-> ``shared_prefix_hidden``, ``check_prefix_sharing`` (same name), and the caches
``PromptRecorder`` -> :class:`grpo.core.kv_cache.PrefixRecorder`, ``SharedPromptCache`` ->
:class:`grpo.core.kv_cache.SharedPrefixTrainCache`.
"""

from grpo.core._deprecated import renamed

__getattr__ = renamed(
    __name__,
    {
        "can_share": "grpo.core.shared_prefix.can_share_prefix",
        "prefix_ok": "grpo.core.shared_prefix.prefix_sharing_verified",
        "shared_prompt_hidden": "grpo.core.shared_prefix.shared_prefix_hidden",
        "check_prefix_sharing": "grpo.core.shared_prefix.check_prefix_sharing",
        "PromptRecorder": "grpo.core.kv_cache.PrefixRecorder",
        "SharedPromptCache": "grpo.core.kv_cache.SharedPrefixTrainCache",
    },
)
