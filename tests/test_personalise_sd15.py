"""The toy SD 1.5 learns the toy subject (the shared tests are in personalise.py; the ways out of training are the
same code for both architectures and are measured on the toy SDXL, whose class also keeps its scores; the toy
SD 1.5's class drifts more, docs/toy.md)."""

import pytest
from personalise import (  # noqa: F401  the shared fixture and tests, collected here for this architecture
    run,
    test_a_short_run_learns_the_subject,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def arch():
    return "sd15"
