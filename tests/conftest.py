import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

# Two cores: one intra-op thread per pytest worker keeps `pytest -n 2` from oversubscribing.
torch.set_num_threads(int(os.environ.get("DYNTRM_TEST_THREADS", "1")))

settings.register_profile("default", deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def grids(min_side: int = 1, max_side: int = 30):
    """Random ARC grids of every size min_side..max_side in both directions."""
    shape = st.tuples(st.integers(min_side, max_side), st.integers(min_side, max_side))
    return shape.flatmap(lambda s: hnp.arrays(np.uint8, s, elements=st.integers(0, 9)))


@pytest.fixture
def tmp_tasks(tmp_path):
    """Write task dicts as files in a directory; returns a writer function."""
    import json

    def write(name, obj, raw=None):
        p = tmp_path / f"{name}.json"
        p.write_text(raw if raw is not None else json.dumps(obj))
        return p

    return write
