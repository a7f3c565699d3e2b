"""Fixtures shared by the whole suite.

* every test runs with one intra-op thread: the inputs are tiny, so a second thread buys
  nothing, and on a shared 2-core machine OpenMP threads spin-waiting at barriers while
  descheduled cost several times the CPU;
* installed third-party plugins are off (``SURGERY_PLUGINS=""``), so what a user happens to
  have installed cannot change the results; the plugin tests turn them on explicitly;
* ``case``: every model of the zoo (:mod:`helpers.zoo`), traced once per session.
"""

from __future__ import annotations

import os

import pytest
import torch

from helpers import zoo


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config: pytest.Config) -> None:
    """Before any test module is imported (the CLI's option choices ask the plugin manager
    while its module loads): no third-party plugin, here and in the subprocesses tests start."""
    os.environ["SURGERY_PLUGINS"] = ""


@pytest.fixture(params=zoo.ALL_MODELS)
def case(request: pytest.FixtureRequest) -> zoo.Case:
    """Every zoo model, traced (parametrised)."""
    return zoo.get_case(request.param)
