"""Golden references for the preference losses (made by scripts/make_preference_goldens.py)."""

import json
from pathlib import Path

import pytest

GOLDENS = Path(__file__).parent / "goldens"


@pytest.fixture(scope="session")
def dpo_goldens():
    return json.loads((GOLDENS / "dpo.json").read_text())


@pytest.fixture(scope="session")
def rm_goldens():
    return json.loads((GOLDENS / "rm.json").read_text())
