"""Slices of a sharded program keep their sharding constraints and run on 8 devices.

The check runs in a fresh process (tests/sharded_mlp.py) because the number of
simulated CPU devices is fixed when JAX starts.
"""

from conftest import run_script


def test_sharded_mlp_slices_keep_constraints_and_match_unsharded():
    run_script("sharded_mlp.py", "sharded slices ok")


def test_explicit_meshes_and_shard_maps_holding_loops():
    run_script("sharded_meshes.py", "meshes ok")
