"""The model card TRL writes, and pushes to the Hugging Face Hub through ``huggingface_hub``.

``save_model`` always writes ``README.md`` into its directory: TRL's GRPO card (card data
with the base model and tags, "trained with GRPO", TRL's DeepSeekMath citation) saying the
weights were trained with mlx-grpo and are mlx-lm adapters, plus the run's configuration.

With ``push_to_hub=True`` the repository ``hub_model_id`` (default: the name of
``output_dir``) is created once (``hub_private_repo``, ``hub_token``) and uploaded to as
transformers' ``Trainer`` does: at ``push_to_hub()`` and every ``save_model()``; at every
checkpoint for ``hub_strategy`` ``every_save`` (the checkpoint's weights at the repository
root), ``checkpoint`` (also the whole checkpoint as ``last-checkpoint/``) and
``all_checkpoints`` (every checkpoint in its own folder); only at the end for ``end``. The
endpoint is ``HF_ENDPOINT`` (huggingface_hub's own setting). Uploads are blocking.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HUB_STRATEGIES = ("end", "every_save", "checkpoint", "all_checkpoints")
TAGS = ("trl", "grpo", "mlx", "mlx-grpo")
GRPO_PAPER = {
    "title": "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
    "id": "2402.03300",
    "citation": textwrap.dedent("""\
        @article{shao2024deepseekmath,
            title        = {{DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models}},
            author       = {Zhihong Shao and Peiyi Wang and Qihao Zhu and Runxin Xu and Junxiao Song and Mingchuan Zhang and Y. K. Li and Y. Wu and Daya Guo},
            year         = 2024,
            eprint       = {arXiv:2402.03300},
        }"""),
}
TRL_CITATION = textwrap.dedent("""\
    @software{vonwerra2020trl,
      title   = {{TRL: Transformers Reinforcement Learning}},
      author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallouédec, Quentin},
      license = {Apache-2.0},
      url     = {https://github.com/huggingface/trl},
      year    = {2020}
    }""")

TEMPLATE = """\
---
{{ card_data }}
---

# Model Card for {{ model_name }}

This model is a fine-tuned version of {% if base_model %}[{{ base_model }}](https://huggingface.co/{{ base_model }}){% else %}a local model{% endif %}{% if dataset_name %} on the [{{ dataset_name }}](https://huggingface.co/datasets/{{ dataset_name }}) dataset{% endif %}.
It has been trained with [mlx-grpo](https://github.com/mlx-grpo/mlx-grpo), GRPO on Apple's MLX with the interface of [TRL](https://github.com/huggingface/trl).

## Quick start

The weights are mlx-lm {{ fine_tune_type }} adapters (`adapters.safetensors`, `adapter_config.json`):

```python
from mlx_lm import generate, load

model, tokenizer = load("{{ base_model or 'path/to/base_model' }}", adapter_path="{{ hub_model_id }}")
messages = [{"role": "user", "content": "If you had a time machine, but could only go to the past or the future once and never return, which would you choose and why?"}]
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
print(generate(model, tokenizer, prompt=prompt, max_tokens=128))
```

## Training procedure

{% if wandb_url %}[<img src="https://raw.githubusercontent.com/wandb/assets/main/wandb-github-badge-28.svg" alt="Visualize in Weights & Biases" width="150" height="24"/>]({{ wandb_url }}){% endif %}
{% if trackio_url %}[<img src="https://raw.githubusercontent.com/gradio-app/trackio/refs/heads/main/trackio/assets/badge.png" alt="Visualize in Trackio" title="Visualize in Trackio" width="150" height="24"/>]({{ trackio_url }}){% endif %}

This model was trained with {{ trainer_name }}, a method introduced in [{{ paper_title }}](https://huggingface.co/papers/{{ paper_id }}).

### Training configuration

Fields of `GRPOConfig` that differ from their defaults:

```json
{{ config_json }}
```

### Framework versions

- mlx-grpo: {{ grpo_version }}
- MLX: {{ mlx_version }}
- mlx-lm: {{ mlx_lm_version }}
- Transformers: {{ transformers_version }}
- Datasets: {{ datasets_version }}
- Tokenizers: {{ tokenizers_version }}

## Citations

Cite {{ trainer_name }} as:

```bibtex
{{ trainer_citation }}
```

Cite TRL as:

```bibtex
{{ trl_citation }}
```
"""


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def changed_config(args: Any) -> dict[str, Any]:
    """The config's fields that differ from their defaults, tokens redacted."""
    import attrs

    out = {}
    for f in attrs.fields(type(args)):
        value = getattr(args, f.name)
        default = f.default.factory() if isinstance(f.default, attrs.Factory) else f.default
        if f.converter is not None and default is not attrs.NOTHING:
            try:
                default = f.converter(default)
            except Exception:  # noqa: BLE001  (a converter that needs the instance)
                pass
        if value != default:
            out[f.name] = f"<{f.name.upper()}>" if f.name.endswith("_token") else value
    return out


def base_model_id(base: str | None) -> str | None:
    """The base model as card data names it: a hub id, never a local directory (as TRL)."""
    if not base or os.path.isdir(base):
        return None
    return str(base)


def model_card(
    args: Any,
    *,
    base_model: str | None,
    model_name: str,
    hub_model_id: str,
    fine_tune_type: str = "lora",
    dataset_name: str | None = None,
    tags: Iterable[str] | str | None = None,
    wandb_url: str | None = None,
    trackio_url: str | None = None,
):
    """TRL's GRPO model card (a ``huggingface_hub.ModelCard``) for this run."""
    from huggingface_hub import ModelCard, ModelCardData

    extra = [tags] if isinstance(tags, str) else list(tags or ())
    card_data = ModelCardData(
        base_model=base_model,
        datasets=dataset_name,
        library_name="mlx",
        licence="license",
        model_name=model_name,
        tags=list(dict.fromkeys(["generated_from_trainer", *TAGS, *extra])),
    )
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        base_model=base_model,
        model_name=model_name,
        hub_model_id=hub_model_id,
        fine_tune_type=fine_tune_type,
        dataset_name=dataset_name,
        wandb_url=wandb_url,
        trackio_url=trackio_url,
        trainer_name="GRPO",
        trainer_citation=GRPO_PAPER["citation"],
        paper_title=GRPO_PAPER["title"],
        paper_id=GRPO_PAPER["id"],
        trl_citation=TRL_CITATION,
        config_json=json.dumps(changed_config(args), indent=2, default=str),
        grpo_version=_version("mlx-grpo"),
        mlx_version=_version("mlx"),
        mlx_lm_version=_version("mlx-lm"),
        transformers_version=_version("transformers"),
        datasets_version=_version("datasets"),
        tokenizers_version=_version("tokenizers"),
    )


def tracker_urls() -> dict[str, str | None]:
    """The W&B run URL (when a run is active) for the card's badge."""
    import sys

    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    return {"wandb_url": getattr(run, "url", None)}


class HubRepo:
    """The run's Hub repository: created on first use, uploaded to as ``hub_strategy`` says."""

    def __init__(self, args: Any):
        if args.hub_strategy not in HUB_STRATEGIES:
            raise ValueError(
                f"hub_strategy must be one of {list(HUB_STRATEGIES)}, got {args.hub_strategy!r}"
            )
        self.args = args
        self.repo_id: str | None = None

    @property
    def name(self) -> str:
        """``hub_model_id``, else the name of ``output_dir`` (transformers' default)."""
        return self.args.hub_model_id or Path(self.args.output_dir).absolute().name

    def _api(self, token: str | None = None):
        from huggingface_hub import HfApi

        # HF_ENDPOINT read now, not when huggingface_hub was first imported.
        return HfApi(endpoint=os.getenv("HF_ENDPOINT") or None, token=token or self.args.hub_token)

    def create(self) -> str:
        """Create the repository once (``exist_ok``); returns its full id ``owner/name``."""
        if self.repo_id is None:
            url = self._api().create_repo(
                self.name, private=self.args.hub_private_repo, exist_ok=True, repo_type="model"
            )
            self.repo_id = url.repo_id
        return self.repo_id

    def upload(
        self,
        folder: str | Path,
        *,
        commit_message: str,
        path_in_repo: str | None = None,
        ignore_patterns: list[str] | None = None,
        token: str | None = None,
        revision: str | None = None,
    ):
        """Upload ``folder`` (blocking); returns huggingface_hub's ``CommitInfo``."""
        repo_id = self.create()
        return self._api(token).upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            path_in_repo=path_in_repo,
            commit_message=commit_message,
            ignore_patterns=ignore_patterns,
            revision=revision or self.args.hub_revision,
        )

    def push_output_dir(self, *, commit_message: str, token=None, revision=None):
        """transformers' ``push_to_hub``: ``output_dir`` without checkpoints (kept for
        ``all_checkpoints``) and without ``_*`` files."""
        ignore = ["_*"]
        if self.args.hub_strategy != "all_checkpoints":
            ignore.append("checkpoint-*/**")
        return self.upload(
            self.args.output_dir,
            commit_message=commit_message,
            ignore_patterns=ignore,
            token=token,
            revision=revision,
        )

    def push_checkpoint(self, checkpoint: Path, model_files: Iterable[str]):
        """transformers' push at a checkpoint save (every strategy but ``end``): the
        checkpoint's ``model_files`` are copied into ``output_dir``, which is uploaded (its
        checkpoints too for ``all_checkpoints``); ``checkpoint`` also uploads the checkpoint
        folder as ``last-checkpoint``."""
        strategy = self.args.hub_strategy
        if strategy == "end":
            return
        import shutil

        out = Path(self.args.output_dir)
        for name in model_files:
            if (checkpoint / name).is_file():
                shutil.copyfile(checkpoint / name, out / name)
        message = f"Training in progress, step {checkpoint.name.split('-')[-1]}"
        self.push_output_dir(commit_message=message)
        if strategy == "checkpoint":
            self.upload(checkpoint, commit_message=message, path_in_repo="last-checkpoint")
