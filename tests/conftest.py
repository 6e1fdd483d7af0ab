import os
import sys

# tests import their dense references (tests/dense.py) as plain modules
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """One data cache (WordPiece, digits VQ codebook) for the whole session: fitted once, read after."""
    return tmp_path_factory.mktemp("digits-cache")
