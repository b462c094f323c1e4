"""Open-ended fuzzing (slow target): the property tests of tests/test_fuzz_inputs.py and tests/interop/test_mace_fuzz.py
run again with new, seeded cases -- at least 10,000 per run -- instead of their fixed derandomised set.

Run: ``python -m pytest -m slow tests/test_fuzz_open.py`` (add ``-n 0 -s`` to see the case counts). The seed is
drawn afresh for each run, or taken from ``EQUIFORCE_FUZZ_SEED``; it is printed at the start (pytest's header,
see tests/conftest.py) and in every failure message. ``EQUIFORCE_FUZZ_SEED=<seed>`` with the same command
reproduces a failure: hypothesis draws the same cases from the same seed.

The tests themselves are not copied: each is the original test's body and strategies (its hypothesis handle's
inner test and ``given`` arguments) with another ``settings`` (``FACTOR`` times the examples, random instead of
derandomised) and ``@seed``. The outcomes are counted by the originals' ``record`` and printed per target at the
end (:func:`test_open_fuzz_generated_enough_cases`, which also fails a run with fewer than ``MIN_CASES``).
"""

from __future__ import annotations

import collections
import functools
import json
import os

import pytest
from hypothesis import given, seed, settings

import tests.interop.test_mace_fuzz as M
import tests.test_fuzz_inputs as F
from tests.test_fuzz_inputs import base_files, model_file, reference, work  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow

SEED = int(os.environ["EQUIFORCE_FUZZ_SEED"])  # tests/conftest.py draws one when it is not set
MIN_CASES = 10_000
#: examples per test, as a multiple of the regression set's
FACTOR = 6
REPRODUCE = (
    f"fuzz seed {SEED}: reproduce with EQUIFORCE_FUZZ_SEED={SEED} python -m pytest -m slow tests/test_fuzz_open.py"
)
_START = collections.Counter(F.CASES)


def reopen(test, factor: int = FACTOR):
    """``test`` (a hypothesis test, possibly parametrized) with ``factor`` times its examples, drawn from SEED."""
    handle = test.hypothesis
    inner = handle.inner_test

    @functools.wraps(inner)
    def noted(*args, **kwargs):
        try:
            return inner(*args, **kwargs)
        except Exception as err:
            if REPRODUCE not in getattr(err, "__notes__", []):
                err.add_note(REPRODUCE)
            raise

    base = test._hypothesis_internal_use_settings
    new = given(**handle._given_kwargs)(noted)  # the original strategies, not a copy of them
    new = seed(SEED)(settings(base, max_examples=factor * base.max_examples, derandomize=False, database=None)(new))
    for mark in getattr(test, "pytestmark", []):  # its parametrization
        new = getattr(pytest.mark, mark.name)(*mark.args, **mark.kwargs)(new)
    return new


test_open_damaged_structure_file = reopen(F.test_damaged_structure_file)
test_open_random_bytes = reopen(F.test_random_bytes)
test_open_npz_array_mutations = reopen(F.test_npz_array_mutations)
test_open_extxyz_bad_numbers_are_located = reopen(F.test_extxyz_bad_numbers_are_located)
test_open_extxyz_token_mutations = reopen(F.test_extxyz_token_mutations)
test_open_hdf5_content_edits = reopen(F.test_hdf5_content_edits)
test_open_random_yaml_documents = reopen(F.test_random_yaml_documents)
test_open_damaged_config_file = reopen(F.test_damaged_config_file)
test_open_wrong_value_per_key = reopen(F.test_wrong_value_per_key)
test_open_random_overrides = reopen(F.test_random_overrides)
test_open_non_utf8_and_random_bytes_config = reopen(F.test_non_utf8_and_random_bytes_config)
test_open_damaged_model_file = reopen(F.test_damaged_model_file)
test_open_model_header_field_edits = reopen(F.test_model_header_field_edits)
test_open_model_parameter_edits = reopen(F.test_model_parameter_edits)
test_open_damaged_mace_file = reopen(M.test_damaged_mace_file_is_refused_clearly, factor=15)


def test_open_fuzz_generated_enough_cases():
    """Runs last in this file: the cases this run generated, per target and outcome (printed, and written to
    ``$EQUIFORCE_FUZZ_REPORT`` when set); at least MIN_CASES of them when the whole file ran."""
    cases = F.CASES - _START
    targets = sorted({t for t, _ in cases})
    lines = [
        f"  {t:34s} {cases[t, 'refused'] + cases[t, 'read']:6d}  refused {cases[t, 'refused']:5d}  "
        f"read {cases[t, 'read']:5d}"
        for t in targets
    ]
    total = sum(cases.values())
    print(f"\nopen-ended fuzz, seed {SEED}: {total} cases\n" + "\n".join(lines))
    if os.environ.get("EQUIFORCE_FUZZ_REPORT"):
        report = {"seed": SEED, "total": total, "cases": {f"{t}|{o}": n for (t, o), n in sorted(cases.items())}}
        with open(os.environ["EQUIFORCE_FUZZ_REPORT"], "w") as fh:
            json.dump(report, fh, indent=1)
    if len(targets) >= 14:  # the whole file ran (not a -k selection)
        assert total >= MIN_CASES, f"only {total} new cases ({REPRODUCE})"
