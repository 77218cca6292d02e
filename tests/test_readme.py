"""Every ``python`` code block of the README runs (and the demo passes), so they cannot rot."""

import pathlib
import re
import runpy

ROOT = pathlib.Path(__file__).resolve().parent.parent


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_quick_start_runs(tmp_path):
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert blocks, "the README has no python block"
    for i, block in enumerate(blocks):
        path = tmp_path / f"readme_block_{i}.py"  # a real file, so names come from its source
        path.write_text(block)
        runpy.run_path(str(path), run_name="__main__")


def test_demo_passes(capsys):
    namespace = runpy.run_path(str(ROOT / "examples" / "issue_12782.py"))
    assert namespace["main"]() == 0
    assert "all checks pass" in capsys.readouterr().out
