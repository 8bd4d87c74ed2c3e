"""The reliability suite's size knob: ``--reliability-examples N`` (or the environment).

``$VSMMU_RELIABILITY_EXAMPLES`` works too.  The default keeps the probes to a
few minutes in ``make test``; a long run (``--reliability-examples 100000``)
sends that many vfio-user messages and hostile register writes (and a fifth
as many QMP inputs).
"""

from __future__ import annotations

import os

import pytest

DEFAULT_EXAMPLES = 4000
ENV_KNOB = "VSMMU_RELIABILITY_EXAMPLES"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register ``--reliability-examples``."""
    parser.addoption("--reliability-examples", type=int, default=None,
                     help=f"messages per probe in tests/reliability (default ${ENV_KNOB} "
                          f"or {DEFAULT_EXAMPLES})")


@pytest.fixture
def reliability_examples(request: pytest.FixtureRequest) -> int:
    """How many messages each probe sends."""
    given = request.config.getoption("--reliability-examples")
    if given is not None:
        return int(given)
    return int(os.environ.get(ENV_KNOB, DEFAULT_EXAMPLES))
