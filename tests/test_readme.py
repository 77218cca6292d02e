"""Every ``python`` code block of the README runs, so does its command line example, and
the demo passes (which is what the ``make demo`` block runs), so they cannot rot."""

import pathlib
import re
import runpy
import shlex
import subprocess
import sys

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


def test_readme_command_line_block_runs(tmp_path):
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    commands = [
        " ".join(part.strip() for part in block.replace("\\\n", " ").split("\n") if part.strip())
        for block in blocks
        if "python -m jaxsurgery" in block
    ]
    assert commands, "the README shows no command line"
    for command in commands:
        argv = shlex.split(command.replace("f.dot", str(tmp_path / "f.dot")))
        assert argv[:3] == ["python", "-m", "jaxsurgery"]
        result = subprocess.run(
            [sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        assert "z3" in result.stdout and (tmp_path / "f.dot").exists()


def test_demo_passes(capsys):
    namespace = runpy.run_path(str(ROOT / "examples" / "issue_12782.py"))
    assert namespace["main"]() == 0
    assert "all checks pass" in capsys.readouterr().out
