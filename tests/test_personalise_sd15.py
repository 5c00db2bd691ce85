"""The toy SD 1.5 learns the toy subject and keeps its class (the shared tests are in personalise.py; the ways out of
training are the same code for both architectures and are measured on the toy SDXL)."""

import pytest
from personalise import (  # noqa: F401  the shared fixture and tests, collected here for this architecture
    run,
    test_a_short_run_learns_the_subject,
    test_the_class_keeps_its_scores,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def arch():
    return "sd15"
