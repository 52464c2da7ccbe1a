"""Every Python block of the README runs as a script, exactly as written; a farm block's
placeholder head node (HEAD:5555) is filled with a broker of the test's own."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from farms import start_farm

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BLOCKS = re.findall(r"```python\n(.*?)```", open(README, encoding="utf-8").read(), re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block-{i}" for i in range(len(BLOCKS))])
def test_a_readme_block_runs_as_a_script(block, tmp_path):
    script = tmp_path / "snippet.py"
    if "HEAD:5555" not in block:
        script.write_text(block)
        result = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        return
    with start_farm(3, 8) as (broker, _):  # 16 envs and a spare worker for on_failure="restart"
        script.write_text(block.replace("tcp://HEAD:5555", broker.endpoint))
        result = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
