"""The toy SDXL learns the toy subject, keeps its class, and the subject survives every way out of training; also
as two accelerate processes (the shared tests are in personalise.py)."""

import pytest
from personalise import (  # noqa: F401  the shared fixture and tests, collected here for this architecture
    run,
    test_a_short_run_learns_the_subject,
    test_the_class_keeps_its_scores,
    test_the_subject_survives_the_lycoris_and_lora_exports,
    test_the_subject_survives_the_merged_folder_in_plain_diffusers,
    test_training_on_an_int8_base_learns_the_subject,
    test_two_processes_give_the_same_scores,
    test_validation_keeps_the_last_step_of_a_run_that_does_not_overfit,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def arch():
    return "sdxl"
