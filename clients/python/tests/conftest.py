import json
import os
from pathlib import Path

import pytest

# The repository's signing vectors (keygate's own tests pass them too).
VECTORS = Path(os.environ.get(
    "KEYGATE_VECTORS",
    Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "signing.json",
))


@pytest.fixture(scope="session")
def vectors():
    return json.loads(VECTORS.read_text())["cases"]
