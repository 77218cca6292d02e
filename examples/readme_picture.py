"""Draw the README's picture: the issue-12782 graph with the z1 -> z2 slice highlighted.

Run from the repository root: ``.venv/bin/python examples/readme_picture.py``. The test
suite checks that the committed picture is what this script draws.
"""

import pathlib
import re
import runpy

import jax

import jaxsurgery as js

ROOT = pathlib.Path(__file__).resolve().parent.parent
PICTURE = ROOT / "docs" / "issue_12782_slice.svg"


def picture() -> str:
    demo = runpy.run_path(str(ROOT / "examples" / "issue_12782.py"))  # the demo's model
    graph = js.trace(demo["f"], *demo["make_params"](jax.random.key(0)))
    svg = graph.draw(highlight=graph.slice("z1", "z2"), engine="builtin").svg
    # (the arrowhead's id, unique in a notebook page, fixed in a file of its own)
    return re.sub(r"jsarrow[0-9a-f]+-\d+", "arrow", svg)


if __name__ == "__main__":
    PICTURE.write_text(picture())
    print(f"wrote {PICTURE.relative_to(ROOT)}")
