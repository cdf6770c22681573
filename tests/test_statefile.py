"""Pickle-free state files round-trip what exact resume needs: optimizer state, RNG states, counters."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from gannet.trainer.checkpoint.statefile import load_state, save_state


def test_optimizer_and_rng_states_round_trip_exactly(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.5, 0.999))
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"opt": opt.state_dict(), "python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "step": 7, "nothing": None, "ratio": 0.1}
    save_state(state, tmp_path / "s")
    back = load_state(tmp_path / "s")
    assert back["python"] == random.getstate() and back["step"] == 7 and back["nothing"] is None
    assert back["numpy"][0] == "MT19937" and (back["numpy"][1] == np.random.get_state()[1]).all()
    assert torch.equal(back["torch"], torch.get_rng_state())
    assert list(back["opt"]["state"]) == [0, 1]  # int keys survive JSON
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert back["opt"]["param_groups"][0]["betas"] == (0.5, 0.999)
    restored = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    restored.load_state_dict(back["opt"])  # torch accepts it as a real optimizer state
    json.loads((tmp_path / "s.json").read_text())  # the structure is plain JSON, no pickle anywhere


def test_unstorable_objects_are_refused(tmp_path):
    with pytest.raises(TypeError, match="cannot store object"):
        save_state({"x": object()}, tmp_path / "s")
