"""The toy FLUX.1 learns the toy subject, keeps its class, and the subject survives every way out of training (the
merged folder, the LyCORIS and LoRA exports, an int8 base); the shared tests are in personalise.py. The toy FLUX is
pretrained with flow matching and FLUX.1 [dev]'s guidance input (docs/toy.md), so a flow-matching target of the wrong
sign, or training without the guidance the model samples with, learns the subject less (the note of issue 32)."""

import pytest
from personalise import (  # noqa: F401  the shared fixture and tests, collected here for this architecture
    run,
    test_a_short_run_learns_the_subject,
    test_the_class_keeps_its_scores,
    test_the_subject_survives_the_lycoris_and_lora_exports,
    test_the_subject_survives_the_merged_folder_in_plain_diffusers,
    test_training_on_an_int8_base_learns_the_subject,
    test_validation_keeps_the_last_step_of_a_run_that_does_not_overfit,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def arch():
    return "flux"
