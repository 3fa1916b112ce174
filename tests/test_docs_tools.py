"""Every ```python block in docs/tools.md runs, in order, in one namespace."""

import pathlib
import re

DOC = pathlib.Path(__file__).parent.parent / "docs" / "tools.md"


def test_tools_doc_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 4  # setup, a tool, an environment, a rollout_func
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name}[block {i}]", "exec"), namespace)
