"""Regenerate trl_1_16_grpo_fields.json: TRL 1.16's GRPOConfig fields and defaults.

    pip download --no-deps -d /tmp/trl trl==1.16.0 && unzip -q -d /tmp/trl /tmp/trl/trl-*.whl
    PYTHONPATH=/tmp/trl .venv/bin/python tests/data/gen_trl_fields.py

TRL's config module imports transformers' TrainingArguments only, so PyTorch is not needed.
"""

import dataclasses
import json
from pathlib import Path

import trl
from transformers import TrainingArguments
from trl.trainer.grpo_config import GRPOConfig

base = {f.name for f in dataclasses.fields(TrainingArguments)}
rows = []
for f in dataclasses.fields(GRPOConfig):
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = None
    try:
        json.dumps(default)
    except TypeError:
        default = repr(default)
    rows.append(
        {
            "name": f.name,
            "default": default,
            "from": "TrainingArguments" if f.name in base else "GRPOConfig",
        }
    )
out = {"trl": trl.__version__, "fields": rows}
Path(__file__).with_name("trl_1_16_grpo_fields.json").write_text(json.dumps(out, indent=1) + "\n")
print(f"{len(rows)} fields of trl {trl.__version__}")
