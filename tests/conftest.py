"""Fixtures shared by the whole suite.

* every test runs with one intra-op thread: the inputs are tiny, so a second thread buys
  nothing, and on a shared 2-core machine OpenMP threads spin-waiting at barriers while
  descheduled cost several times the CPU;
* installed third-party plugins are off (``SURGERY_PLUGINS=""``), so what a user happens to
  have installed cannot change the results; the plugin tests turn them on explicitly;
* ``case``: every model of the zoo (:mod:`helpers.zoo`), traced once per session.
"""

from __future__ import annotations

import pytest
import torch

from helpers import zoo


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def no_third_party_plugins():
    from surgery.plugins import plugin_manager

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SURGERY_PLUGINS", "")
        plugin_manager.cache_clear()
        yield
    plugin_manager.cache_clear()


@pytest.fixture(params=zoo.ALL_MODELS)
def case(request: pytest.FixtureRequest) -> zoo.Case:
    """Every zoo model, traced (parametrised)."""
    return zoo.get_case(request.param)
