"""Project hygiene: the test run's warning filters and the documentation's references."""

import warnings

from diffusers import DPMSolverMultistepScheduler


def test_known_third_party_warnings_are_filtered_and_ours_are_not():
    """diffusers' schedulers raise a NumPy 2 deprecation on every set_timesteps (~200k per test run); the pytest
    config filters it by message and module, so the same warning raised from our code still shows."""
    with warnings.catch_warnings(record=True) as seen:  # the filters pytest applied from pyproject.toml
        DPMSolverMultistepScheduler().set_timesteps(10)
        assert not [w for w in seen if issubclass(w.category, DeprecationWarning)], [str(w.message) for w in seen]
        warnings.warn_explicit("__array__ implementation doesn't accept a copy keyword", DeprecationWarning,
                               "sampler.py", 1, module="dlg_sampler.sampler")
    assert [str(w.message) for w in seen] == ["__array__ implementation doesn't accept a copy keyword"]
