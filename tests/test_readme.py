import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_examples_run(index, capsys):
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {})


def test_readme_names_the_commands_ci_runs():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in text and "scripts/test.sh" in ci
    assert "bash scripts/demo.sh" in text
