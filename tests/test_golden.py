"""Golden losses of the first train steps: any change to the model, objectives or optimizer shows.

If a change is meant to alter the numbers, rerun with GOLDEN_PRINT=1, check the new values are
explained by the change, and paste them here.
"""

import os

import jax
import numpy as np
import pytest
from conftest import load_config
from test_objectives import _random_batch
from test_train_step import _run_steps

GOLDEN = {
    "script": [60.69253, 53.56987, 61.06523],
    "electra": [42.26629, 42.2703, 41.86827],
    "mlm": [7.63441, 7.63119, 7.61938],
}


@pytest.mark.parametrize("objective", sorted(GOLDEN))
def test_first_three_steps_match_golden_losses(objective):
  config = load_config("tiny", objective=objective, batch_size=8, **{"optim.warmup_steps": 2})
  batches = [_random_batch(config, 8, seed=100 + s) for s in range(3)]
  _, losses = _run_steps(config, jax.devices()[:1], batches)
  if os.environ.get("GOLDEN_PRINT"):
    print(f'"{objective}": {[round(l, 5) for l in losses]},')
  np.testing.assert_allclose(losses, GOLDEN[objective], rtol=2e-4)
