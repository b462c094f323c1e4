"""On-the-fly active learning: simulate, find where the model is unsure, label, retrain, simulate further.

* :func:`run_active_learning` (``equiforce learn CONFIG``): the loop (:mod:`equiforce.learning.loop`);
* :mod:`~equiforce.learning.config`: its YAML config (:func:`load_learn_config`);
* :mod:`~equiforce.learning.labellers`: labellers (EMT, GFN-xTB via tblite, any ASE calculator);
* :mod:`~equiforce.learning.labelling`: labelling in worker processes, each label appended as it is done.

The names are imported lazily: labelling workers import :mod:`equiforce.learning.labellers` without JAX.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LearnConfig", "LearnResult", "load_learn_config", "run_active_learning"]


def __getattr__(name: str) -> Any:
    if name in ("LearnResult", "run_active_learning"):
        from equiforce.learning import loop

        return getattr(loop, name)
    if name in ("LearnConfig", "load_learn_config"):
        from equiforce.learning import config

        return getattr(config, name)
    raise AttributeError(f"module 'equiforce.learning' has no attribute {name!r}")
