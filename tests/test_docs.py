"""Every ```python block in docs/all-of-grpo.md runs, in order, in one namespace."""

import pathlib
import re

DOC = pathlib.Path(__file__).parent.parent / "docs" / "all-of-grpo.md"


def test_all_of_grpo_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name}[block {i}]", "exec"), namespace)
