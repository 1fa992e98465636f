"""Fine-tuning on GLUE: the recipe's optimizer pieces against references, prediction counting
every example once, and `python -m script_jax.finetune.glue` end to end from a pretraining
workdir made by the real trainer through to the results table."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.metrics
from helpers import run_module, shared_workdir

from script_jax import config_lib
from script_jax import metrics_records
from script_jax import models
from script_jax import state as state_lib
from script_jax.finetune import glue_runs
from script_jax.finetune import model as task_models
from script_jax.finetune import optim
from script_jax.finetune import trainer


def _tiny_cfg(num_layers=3):
  return models.EncoderConfig(vocab_size=50, embedding_size=8, hidden_size=16,
                              num_layers=num_layers, num_heads=2, intermediate_size=32,
                              max_position_embeddings=16)


def _classifier_params(cfg, num_outputs=3, batch=2, length=7):
  model = task_models.Classifier(cfg, num_outputs)
  ids = np.ones((batch, length), np.int32)
  return model, model.init(jax.random.key(0), ids, ids * 0, ids)["params"]


@pytest.mark.parametrize("quirk", [True, False])
def test_layerwise_decay_follows_depth(quirk):
  cfg = _tiny_cfg(num_layers=3)
  _, params = _classifier_params(cfg)
  scales = optim.layer_scales(params, 3, 0.8, top_layer_at_decay_2=quirk)
  flat = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(scales)[0]}
  top = 3 + (2 if quirk else 1)  # ELECTRA's code: depth d at 0.8 ** (L + 2 - d)
  for key, scale in flat.items():
    if "'head'" in key:
      want = 1.0
    elif "'embeddings'" in key or "embeddings_project" in key:
      want = 0.8 ** top
    else:
      layer = int(key.split("'layer_")[1].split("'")[0])
      want = 0.8 ** (top - layer - 1)
    assert scale == pytest.approx(want), key
  # Every part of the model got a scale, the E->H projection at the embeddings' depth.
  assert any("embeddings_project" in k for k in flat) and any("'head'" in k for k in flat)
  assert flat[next(k for k in flat if "layer_2" in k)] == pytest.approx(0.8 ** (2 if quirk else 1))


def test_schedule_is_warmup_times_linear_decay():
  schedule = optim.learning_rate_schedule(3e-4, total_steps=50, warmup_fraction=0.1)
  for t in [0, 1, 3, 5, 6, 20, 49, 50]:
    want = 3e-4 * min(1.0, t / 5) * max(0.0, 1.0 - t / 50)  # ELECTRA: product, not two phases
    assert float(schedule(t)) == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_adam_without_bias_correction_matches_numpy():
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(3, 4)).astype(np.float32)}
  tx = state_lib.scale_by_adam_without_bias_correction(0.9, 0.999, 1e-6)
  state = tx.init(params)
  m = np.zeros((3, 4)); v = np.zeros((3, 4))
  for _ in range(3):
    g = rng.normal(size=(3, 4))
    updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state)
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    np.testing.assert_allclose(updates["w"], m / (np.sqrt(v) + 1e-6), rtol=2e-5)


@pytest.mark.slow
def test_optimizer_step_matches_a_hand_computed_update():
  """clip -> adam (no bias correction) -> + weight decay off biases -> * -lr(t) * layer scale."""
  cfg = _tiny_cfg(num_layers=1)
  _, params = _classifier_params(cfg)
  ft = config_lib.finetune_config()
  ft.weight_decay = 0.01
  tx, schedule = optim.make_optimizer(ft, params, num_layers=1, total_steps=10)
  state = tx.init(params)
  rng = np.random.default_rng(1)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32) * 0.1,
                       params)
  updates, _ = tx.update(grads, state, params)
  norm = math.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads)))
  clip = min(1.0, 1.0 / norm)
  scales = optim.layer_scales(params, 1, 0.8)
  lr0 = float(schedule(0))

  def want(path, p, g, s):
    g = np.asarray(g, np.float64) * clip
    adam = (0.1 * g) / (np.sqrt(0.001 * g * g) + 1e-6)
    name = str(getattr(path[-1], "key", path[-1]))
    decay = 0.0 if name in ("bias", "scale") else 0.01
    return -lr0 * s * (adam + decay * np.asarray(p))
  expected = jax.tree_util.tree_map_with_path(want, params, grads, scales)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-12)


@pytest.mark.slow
def test_predict_counts_every_example_once_on_8_devices():
  assert jax.device_count() == 8
  cfg = _tiny_cfg(num_layers=1)
  model, params = _classifier_params(cfg)
  rng = np.random.default_rng(2)
  n = 13  # not a multiple of the batch or of the devices
  arrays = {"input_ids": rng.integers(0, 50, size=(n, 7)).astype(np.int32),
            "segment_ids": np.zeros((n, 7), np.int32), "input_mask": np.ones((n, 7), np.int32)}
  outputs = trainer.predict(model, params, arrays, batch_size=8)
  direct = model.apply({"params": params}, arrays["input_ids"], arrays["segment_ids"],
                       arrays["input_mask"])
  assert outputs.shape == (n, 3)
  np.testing.assert_allclose(outputs, direct, rtol=1e-5, atol=1e-6)


def test_pretrained_encoder_must_fit():
  cfg = _tiny_cfg(num_layers=1)
  _, params = _classifier_params(cfg)
  encoder = jax.tree.map(np.asarray, params["backbone"])
  replaced = task_models.with_pretrained_encoder(params, encoder)
  assert replaced["head"] is params["head"]
  wrong = jax.tree.map(lambda x: np.zeros((x.shape[0] + 1,) + x.shape[1:]), encoder)
  with pytest.raises(ValueError, match="does not fit this model"):
    task_models.with_pretrained_encoder(params, wrong)


# ----------------------------------------------------------------------------- end to end

_COLA = [("gj04", 1, "The cat sat on the mat."), ("gj04", 0, "Cat the mat on sat."),
         ("bc01", 1, "She gave him a book."), ("bc01", 0, "She him gave book a."),
         ("r-67", 1, "We expect the results soon."), ("r-67", 0, "Results the soon expect.")]
_STSB = [("A plane is taking off.", "An air plane is taking off.", 5.0),
         ("A man plays a flute.", "A man is eating.", 0.6),
         ("Two dogs run in a field.", "Dogs are running outside.", 3.8),
         ("The sky is blue.", "A woman slices onions.", 0.0)]


def _glue_fixture(root):
  """A GLUE folder in the standard layout: CoLA (no header) and STS-B (with one)."""
  for name, split, repeat in [("train", "train", 8), ("dev", "dev", 3)]:
    cola = root / "CoLA"
    cola.mkdir(parents=True, exist_ok=True)
    (cola / f"{split}.tsv").write_text("".join(
        f"{s}\t{l}\t\t{t}\n" for s, l, t in _COLA * repeat))
    stsb = root / "STS-B"
    stsb.mkdir(parents=True, exist_ok=True)
    header = ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
              "\tscore\n")
    (stsb / f"{split}.tsv").write_text(header + "".join(
        f"{i}\tmain\tx\t2012\t{i}\tnone\tnone\t{a}\t{b}\t{s:.3f}\n"
        for i, (a, b, s) in enumerate(_STSB * repeat)))
    del name
  # The unlabelled test files, as the standard release has them (index column, header).
  (root / "CoLA" / "test.tsv").write_text("index\tsentence\n" + "".join(
      f"{i}\t{t}\n" for i, (_, _, t) in enumerate(_COLA)))
  (root / "STS-B" / "test.tsv").write_text(
      "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\n" +
      "".join(f"{i}\tmain\tx\t2012\t{i}\tnone\tnone\t{a}\t{b}\n"
              for i, (a, b, _) in enumerate(_STSB)))
  return str(root)


_FAST = ["--nocheck_counts", "--config.num_seeds=2", "--config.epochs=1",
         "--config.batch_size=8", "--config.max_length=32", "--config.log_every_steps=2"]


@pytest.mark.slow
def test_glue_command_end_to_end(tmp_path, tmp_path_factory):
  workdir = shared_workdir(tmp_path_factory)
  data_dir = _glue_fixture(tmp_path / "glue")
  out = tmp_path / "out"
  args = [f"--init_from={workdir}", f"--data_dir={data_dir}", f"--output_dir={out}", *_FAST]
  result = run_module("finetune.glue", args, timeout=600)
  stderr = result.stderr.decode()
  assert result.returncode == 0, stderr[-3000:]
  assert "ETA" in stderr and "steps/s" in stderr  # progress while fine-tuning
  results = json.loads((out / "results.json").read_text())
  assert set(results["runs"]) == {"cola", "stsb"}  # every task found in the folder
  for task, metric_names in [("cola", {"mcc"}), ("stsb", {"pearson", "spearman"})]:
    assert set(results["runs"][task]) == {"0", "1"}
    for run in results["runs"][task].values():
      assert metric_names <= set(run) and run["train_examples"] > 0
      assert all(-100 <= run[m] <= 100 for m in metric_names)
  # STS-B trains on its pairs and their swaps, as ELECTRA does.
  assert results["runs"]["stsb"]["0"]["train_examples"] == 2 * len(_STSB) * 8
  table = result.stdout.decode()
  assert "| model | CoLA | SST-2 | MRPC | STS-B |" in table
  assert (out / "results.md").read_text().startswith("| model | CoLA")
  for task in ("cola", "stsb"):  # logged through the pretraining's writer
    assert metrics_records.read_records(str(out / task / "seed_0"))[-1]["step"] > 0
  # Every run predicted its task's test file, in the GLUE server's format.
  for task, name, n in [("cola", "CoLA", len(_COLA)), ("stsb", "STS-B", len(_STSB))]:
    for seed in (0, 1):
      rows = [line.split("\t") for line in
              (out / task / f"seed_{seed}" / "test_predictions" / f"{name}.tsv")
              .read_text().splitlines()]
      assert rows[0] == ["index", "prediction"] and [r[0] for r in rows[1:]] == [
          str(i) for i in range(n)]
      if task == "cola":
        assert {r[1] for r in rows[1:]} <= {"0", "1"}
      else:
        assert all(0 <= float(r[1]) <= 5 for r in rows[1:])
  submitted = run_module("finetune.submit", [f"--output_dir={out}"], timeout=120)
  assert submitted.returncode == 0, submitted.stderr.decode()[-2000:]
  record = json.loads((out / "submission" / "results.json").read_text())
  assert set(record["files"]) == {"CoLA.tsv", "STS-B.tsv"} and len(record["missing"]) == 9
  assert "the GLUE server scores only a submission of all of them" in submitted.stdout.decode()

  # A rerun skips what is done; one more seed runs only that seed.
  again = run_module("finetune.glue", args, timeout=600)
  assert again.returncode == 0 and b"all 2 seeds done" in again.stderr
  more = run_module("finetune.glue", [*args, "--config.num_seeds=3", "--tasks=cola"],
                    timeout=600)
  assert more.returncode == 0, more.stderr.decode()[-2000:]
  runs = json.loads((out / "results.json").read_text())["runs"]
  assert set(runs["cola"]) == {"0", "1", "2"} and runs["cola"]["0"] == results["runs"]["cola"]["0"]


@pytest.mark.slow
def test_glue_command_random_init_and_bad_input(tmp_path, tmp_path_factory):
  workdir = shared_workdir(tmp_path_factory)
  data_dir = _glue_fixture(tmp_path / "glue")
  out = tmp_path / "random"
  result = run_module("finetune.glue", [f"--init_from={workdir}", f"--data_dir={data_dir}",
                                        f"--output_dir={out}", "--random_init", "--tasks=CoLA",
                                        *_FAST, "--config.num_seeds=1",
                                        "--config.max_train_examples=10",
                                        "--config.save_model=True"], timeout=600)
  assert result.returncode == 0, result.stderr.decode()[-3000:]
  assert "+random |" in result.stdout.decode()
  results = json.loads((out / "results.json").read_text())
  assert results["random_init"] and results["runs"]["cola"]["0"]["train_examples"] == 10
  assert results["finetune_config"]["max_train_examples"] == 10

  # The saved model, reloaded for prediction, gives the dev-set score the run reported.
  sentences = tmp_path / "dev_sentences.txt"
  sentences.write_text("".join(f"{t}\n" for _, _, t in _COLA * 3))
  predicted = run_module("finetune.predict", [f"--run_dir={out}/cola/seed_0",
                                              f"--input={sentences}"], timeout=300)
  assert predicted.returncode == 0, predicted.stderr.decode()[-3000:]
  rows = [line.split("\t") for line in predicted.stdout.decode().splitlines()]
  assert [t for _, t in rows] == [t for _, _, t in _COLA * 3]
  mcc = sklearn.metrics.matthews_corrcoef([l for _, l, _ in _COLA * 3],
                                          [int(label) for label, _ in rows])
  assert 100 * mcc == pytest.approx(results["runs"]["cola"]["0"]["mcc"], abs=1e-6)
  missing = run_module("finetune.predict", [f"--run_dir={out}/cola/seed_9",
                                            f"--input={sentences}"], timeout=300)
  assert missing.returncode == 2 and b"save_model=True" in missing.stderr

  def error(*extra):
    bad = run_module("finetune.glue", [f"--init_from={workdir}", f"--output_dir={out}_bad",
                                       *_FAST, *extra], timeout=300)
    assert bad.returncode == 2 and b"Traceback" not in bad.stderr, bad.stderr.decode()[-2000:]
    return bad.stderr.decode()

  assert "Unknown GLUE task 'colaa'" in error(f"--data_dir={data_dir}", "--tasks=colaa")
  assert "No GLUE task found" in error(f"--data_dir={tmp_path}")
  assert "No SST-2 train file" in error(f"--data_dir={data_dir}", "--tasks=sst2")
  # The real row counts are checked unless told otherwise.
  strict = error(f"--data_dir={data_dir}", "--tasks=cola", "--check_counts")
  assert "8,551" in strict or "8551" in strict
  (tmp_path / "glue" / "CoLA" / "dev.tsv").write_text("gj04\tmaybe\t\tA bad label.\n")
  assert "dev.tsv:1" in error(f"--data_dir={data_dir}", "--tasks=cola")
  assert "is not a script_jax workdir" in error(f"--data_dir={data_dir}",
                                                f"--init_from={tmp_path / 'nowhere'}")


@pytest.mark.parametrize("n, batch", [(13, 4), (8, 4), (3, 8)])
def test_epochs_train_every_example_once_padded_to_whole_batches(n, batch):
  """ELECTRA's step count: ceil(N / batch) per epoch, every example once, padding rows weight 0."""
  for epoch in range(2):
    batches = trainer.epoch_batches(n, batch, seed=5, epoch=epoch)
    assert len(batches) == -(-n // batch)
    rows = np.concatenate([r for r, _ in batches])
    weights = np.concatenate([w for _, w in batches])
    assert all(len(r) == batch for r, _ in batches)
    assert sorted(rows[weights > 0].tolist()) == list(range(n))
    assert weights.sum() == n and (weights[n:] == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_padding_rows_change_nothing_in_the_step(reduction):
  """A batch with weight-0 rows gives the loss and the update of its real rows alone."""
  cfg = _tiny_cfg(num_layers=1)
  model, params = _classifier_params(cfg)
  ft = config_lib.finetune_config()
  ft.dropout_rate = ft.attention_dropout_rate = 0.0
  tx, schedule = optim.make_optimizer(ft, params, num_layers=1, total_steps=10)
  replicated = jax.sharding.NamedSharding(trainer.data_mesh(), jax.sharding.PartitionSpec())
  step = trainer.make_train_step(model, glue_runs.classification_loss, tx, schedule, reduction, 0,
                                 replicated)
  rng = np.random.default_rng(3)
  real = {"input_ids": rng.integers(0, 50, size=(5, 7)).astype(np.int32),
          "segment_ids": np.zeros((5, 7), np.int32), "input_mask": np.ones((5, 7), np.int32),
          "labels": rng.integers(0, 3, 5).astype(np.int32)}
  padded = {k: np.concatenate([v, v[:3]]) for k, v in real.items()}
  results = []
  for batch, weight in ((real, np.ones(5, np.float32)),
                        (padded, np.array([1] * 5 + [0] * 3, np.float32))):
    p = jax.tree.map(jnp.array, params)
    new, _, metrics = step(p, tx.init(p), {**batch, "example_weight": weight}, jnp.int32(0))
    results.append((float(metrics["loss"]), jax.device_get(new)))
  assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("regression", [False, True])
def test_logged_task_metric_averages_the_real_rows_only(tmp_path, regression):
  """13 examples in batches of 8: the last batch has 3 padding rows (copies of example 0). With
  a learning rate of 0 the model is fixed, so the logged accuracy (mse) must equal the metric of
  its predictions over the 13 examples, computed here with NumPy."""
  cfg = dataclasses.replace(_tiny_cfg(num_layers=1), dropout_rate=0.0,
                            attention_dropout_rate=0.0)
  model, params = _classifier_params(cfg, num_outputs=1 if regression else 3)
  ft = config_lib.finetune_config()
  ft.learning_rate, ft.batch_size, ft.log_every_steps = 0.0, 8, 100
  rng = np.random.default_rng(4)
  n = 13
  arrays = {"input_ids": rng.integers(0, 50, size=(n, 7)).astype(np.int32),
            "segment_ids": np.zeros((n, 7), np.int32), "input_mask": np.ones((n, 7), np.int32)}
  outputs = np.asarray(trainer.predict(model, params, arrays, 8), np.float64)
  if regression:  # example 0 (the padding rows' copy) is off by 1, the others by 0.1
    arrays["labels"] = (outputs[:, 0] + np.where(np.arange(n) == 0, 1.0, 0.1)).astype(np.float32)
    name, want = "mse", np.mean((outputs[:, 0] - arrays["labels"]) ** 2)
    loss_fn = glue_runs.regression_loss
  else:  # right on example 0 only: 1/13 (the padding rows would make it 0.25)
    predicted = outputs.argmax(-1)
    arrays["labels"] = np.where(np.arange(n) == 0, predicted, (predicted + 1) % 3).astype(np.int32)
    name, want = "accuracy", 1 / n
    loss_fn = glue_runs.classification_loss
  _, last = trainer.fit(model, params, loss_fn, arrays, ft, seed=0, num_layers=1, epochs=1,
                        log_dir=str(tmp_path))
  [logged] = metrics_records.read_records(str(tmp_path))
  assert logged["step"] == 2 and logged == last
  assert logged[name] == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_stsb_trains_on_the_score_over_5_and_predicts_on_0_to_5():
  """ELECTRA's RegressionTask: targets label / 5; predictions scaled back for the metrics."""
  from script_jax.finetune import glue_data  # pylint: disable=g-import-not-at-top
  stsb, cola = glue_data.get_task("stsb"), glue_data.get_task("cola")
  scores = np.array([0.0, 2.5, 3.8, 5.0], np.float32)
  np.testing.assert_allclose(glue_runs.training_targets(stsb, scores), [0.0, 0.5, 0.76, 1.0],
                             rtol=1e-6)
  np.testing.assert_allclose(glue_runs.predictions_from(stsb, np.array([[0.1], [0.9]])), [0.5, 4.5])
  labels = np.array([1, 0, 1], np.int32)
  assert glue_runs.training_targets(cola, labels) is labels
  assert glue_runs.predictions_from(cola, np.array([[0.2, 0.1], [0.0, 3.0]])).tolist() == [0, 1]


@pytest.mark.slow
def test_task_heads_start_from_glorot_uniform_as_electras_dense_layers():
  """tf.layers.dense's default kernel initializer: U(-a, a), a = sqrt(6 / (fan_in + fan_out));
  the encoder keeps the pretraining's truncated normal."""
  cfg = _tiny_cfg(num_layers=1)
  _, params = _classifier_params(cfg, num_outputs=3)
  kernel = np.asarray(params["head"]["kernel"])
  fan_in, fan_out = kernel.shape
  limit = math.sqrt(6 / (fan_in + fan_out))
  assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.8 * limit
  assert np.var(kernel) == pytest.approx(limit ** 2 / 3, rel=0.35)
  assert (np.asarray(params["head"]["bias"]) == 0).all()
  ids = np.zeros((1, 7), np.int32)
  for extractor, extra in ((task_models.SpanExtractor(cfg), {}),
                           (task_models.JointSpanExtractor(cfg, beam_size=2),
                            {"context_mask": ids + 1})):
    head_params = extractor.init(jax.random.key(0), ids, ids, ids + 1, **extra)["params"]
    kernels = [(p, l) for p, l in jax.tree_util.tree_leaves_with_path(head_params)
               if str(getattr(p[0], "key", p[0])) != "backbone"
               and str(getattr(p[-1], "key", p[-1])) == "kernel"]
    assert len(kernels) >= 2
    for path, leaf in kernels:
      names = [str(getattr(p, "key", p)) for p in path]
      if names[0] != "backbone" and names[-1] == "kernel":
        fan_in, fan_out = leaf.shape
        assert np.abs(leaf).max() <= math.sqrt(6 / (fan_in + fan_out)), names
        assert np.abs(leaf).max() > 0.5 * math.sqrt(6 / (fan_in + fan_out)), names


@pytest.mark.parametrize("preset, lr, decay, weight_decay", [
    ("small", 3e-4, 0.8, 0.0), ("base", 1e-4, 0.8, 0.0), ("electra_code", 1e-4, 0.8, 0.01),
    ("large", 5e-5, 0.9, 0.01)])
def test_finetune_presets(preset, lr, decay, weight_decay):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "finetune_cfg", os.path.join(os.path.dirname(__file__), "..", "configs", "finetune.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  ft = module.get_config(preset)
  assert (ft.learning_rate, ft.layerwise_lr_decay, ft.weight_decay) == (lr, decay, weight_decay)
  config_lib.validate_finetune_config(ft, squad=True, num_devices=8)
  with pytest.raises(config_lib.ConfigError, match="use one of small, base, electra_code"):
    module.get_config("huge")
