"""Slices of a sharded program keep their sharding constraints and run on 8 devices.

The check runs in a fresh process (tests/sharded_mlp.py) because the number of
simulated CPU devices is fixed when JAX starts.
"""

import pathlib
import subprocess
import sys


def test_sharded_mlp_slices_keep_constraints_and_match_unsharded():
    script = pathlib.Path(__file__).with_name("sharded_mlp.py")
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharded slices ok" in result.stdout
