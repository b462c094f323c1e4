"""Without torch and mace-torch (the README's test environment) the parity tests are not collected at all, so the
default run reports no skip for them; ``.ci/run``'s second target installs both and runs ``pytest -m torch``."""

import importlib.util

collect_ignore = (
    ["test_mace_parity.py"]
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("mace") is None
    else []
)
