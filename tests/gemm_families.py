"""Helpers the tests of gemm's config families share."""
import re

import pytest
import torch

from tuneforge.dsl import Problem, check, get
from tuneforge.dsl.devices import SPECS
from tuneforge.errors import ConfigRejected
from tuneforge.kernels import gemm as G


def assert_one_line_reason(m: int, config: dict, reason):
    """gemm at m x 5120 x 2048 on an H200: ``config`` passes (``reason`` None), or is refused with
    ``reason`` in one line -- by the launcher itself where the reason is the space's (``is not one of``)."""
    problem, gemm = Problem.make("gemm", "bf16", m=m, n=5120, k=2048), get("gemm")
    if reason is None:
        assert gemm.reject_reason(config, problem, SPECS["H200"]) is None
        return
    if "is not one of" in reason:
        with pytest.raises(ConfigRejected, match=re.escape(reason)) as e:
            G.gemm(torch.zeros(m, 2048), torch.zeros(5120, 2048), config=config)
        assert "\n" not in str(e.value)
        return
    why = gemm.reject_reason(config, problem, SPECS["H200"])
    assert why and reason in why and "\n" not in why


def assert_config_checks(problem: Problem, config: dict):
    """``config`` passes the constraints under the interpreter and matches the reference (NaN-poisoned
    output, through the checker)."""
    template = get(problem.op)
    assert template.reject_reason(config, problem, G.launch_spec(torch.device("cpu"))) is None
    result = check(template, problem, config)
    assert result, result.reason
