"""Fine-tuning config mistakes: each one a clear `error:` through the real command, exit 2,
no traceback, before any work (config_lib.validate_finetune_config)."""

import pytest
from helpers import load_config, run_module

from script_jax import config_lib

# The checks come before the starting point is read: a folder that does not exist shows that
# nothing else was tried.
_NOWHERE = ["--init_from=/nonexistent/workdir", "--output_dir=/nonexistent/out"]


@pytest.mark.slow
@pytest.mark.parametrize("module, flag, message", [
    ("finetune.glue", "--config.batch_size=0", "batch_size=0 must be at least 1"),
    ("finetune.glue", "--config.epochs=-1", "epochs=-1 must be at least 0"),
    ("finetune.glue", "--config.num_seeds=0", "num_seeds=0 must be at least 1"),
    ("finetune.glue", "--config.max_length=4", "max_length=4 must be at least 8"),
    ("finetune.glue", "--config.learning_rate=0", "learning_rate=0.0 must be above 0"),
    ("finetune.glue", "--config.warmup_fraction=1.5", "warmup_fraction=1.5 must be in [0, 1]"),
    ("finetune.squad", "--config.squad.max_length=64",
     "squad.max_length=64 leaves no room for context after a question of "
     "squad.max_query_length=64"),
    ("finetune.squad", "--config.squad.na_prob_thresh=2", "squad.na_prob_thresh=2.0 must be"),
    ("finetune.squad", "--config.squad.doc_stride=0", "squad.doc_stride=0 must be at least 1"),
])
def test_config_mistake_is_one_clear_error(module, flag, message):
  extra = ["--data_dir=/nonexistent/glue"] if module == "finetune.glue" else [
      "--dev_file=/nonexistent/dev.json", "--dev_split=0.5"]
  result = run_module(module, [*_NOWHERE, *extra, flag])
  stderr = result.stderr.decode()
  assert result.returncode == 2, stderr[-2000:]
  assert "Traceback" not in stderr
  assert message in stderr, stderr[-2000:]
  assert "error: Invalid fine-tuning config:" in stderr
  assert "not a script_jax workdir" not in stderr and "does not exist" not in stderr


@pytest.mark.slow
def test_batch_not_divisible_by_the_devices_through_the_command():
  result = run_module("finetune.glue", [*_NOWHERE, "--data_dir=/nonexistent/glue",
                                        "--config.batch_size=12"],
                      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert result.returncode == 2
  assert b"batch_size=12 is not divisible by the 8 devices" in result.stderr
  assert b"Traceback" not in result.stderr


def test_every_problem_is_listed_at_once_and_defaults_pass():
  config_lib.validate_finetune_config(load_config("finetune"), squad=True, num_devices=8)
  ft = load_config("finetune", batch_size=0, num_seeds=0)
  ft.squad.head = "xlnet"
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate_finetune_config(ft, squad=True, num_devices=1)
  text = str(error.value)
  assert "batch_size=0" in text and "num_seeds=0" in text and "squad.head='xlnet'" in text
