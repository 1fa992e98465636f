"""HuggingFace transformers' ELECTRA and MLM training steps (PyTorch, CPU) with our sizes, and
the two timed side by side: the library behind `python -m script_jax.bench.hf_peer` (whose
docstring says what each side runs), reused by parity.py.
"""

from __future__ import annotations

import math
import os
from typing import Any

from script_jax.bench import flops
from script_jax.bench import step_timing
from script_jax.data import synthetic


# ----------------------------------------------------------------------------- the HF side

def hf_configs(config):
  """(generator, discriminator) ElectraConfigs with the sizes of `config`."""
  from transformers import ElectraConfig  # pylint: disable=g-import-not-at-top  (optional: transformers)
  m, g = config.model, config.electra
  common = dict(vocab_size=m.vocab_size, embedding_size=m.embedding_size,
                max_position_embeddings=m.max_position_embeddings,
                type_vocab_size=m.type_vocab_size, hidden_dropout_prob=m.dropout_rate,
                attention_probs_dropout_prob=m.attention_dropout_rate, hidden_act="gelu",
                layer_norm_eps=1e-12, initializer_range=m.get("initializer_range", 0.02))
  gen = ElectraConfig(hidden_size=g.generator_hidden_size,
                      num_hidden_layers=g.generator_num_layers,
                      num_attention_heads=g.generator_num_heads,
                      intermediate_size=g.generator_intermediate_size, **common)
  disc = ElectraConfig(hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                       num_attention_heads=m.num_heads, intermediate_size=m.intermediate_size,
                       **common)
  return gen, disc


def build_hf_model(config, objective: str):
  """The torch.nn.Module trained by `objective` ("electra": generator + discriminator)."""
  import torch  # pylint: disable=g-import-not-at-top  (optional: torch)
  import transformers  # pylint: disable=g-import-not-at-top  (optional: transformers)
  gen_cfg, disc_cfg = hf_configs(config)
  if objective == "mlm":
    return transformers.ElectraForMaskedLM(disc_cfg)
  model = torch.nn.Module()
  model.discriminator = transformers.ElectraForPreTraining(disc_cfg)
  model.generator = transformers.ElectraForMaskedLM(gen_cfg)
  # ELECTRA shares the whole embedding layer; the generator's decoder is tied to it.
  model.generator.electra.embeddings = model.discriminator.electra.embeddings
  model.generator.generator_lm_head.weight = (
      model.discriminator.electra.embeddings.word_embeddings.weight)
  return model


def _masked_logits(mlm_model, batch, full_logits: bool):
  """MLM logits [B, P, V] at the masked positions via HF's submodules, or via the stock path."""
  import torch  # pylint: disable=g-import-not-at-top  (optional: torch)
  if full_logits:
    logits = mlm_model(batch["input_ids"], attention_mask=batch["input_mask"],
                       token_type_ids=batch["segment_ids"]).logits
    return torch.gather(logits, 1, batch["masked_positions"][..., None].expand(
        -1, -1, logits.shape[-1]))
  hidden = mlm_model.electra(batch["input_ids"], attention_mask=batch["input_mask"],
                             token_type_ids=batch["segment_ids"]).last_hidden_state
  hidden_p = torch.gather(hidden, 1, batch["masked_positions"][..., None].expand(
      -1, -1, hidden.shape[-1]))
  return mlm_model.generator_lm_head(mlm_model.generator_predictions(hidden_p))


def _mlm_loss(logits, batch):
  """Weighted mean NLL of the original tokens at the masked positions (objectives.mlm_loss)."""
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top  (optional: torch)
  weights = batch["masked_weights"].reshape(-1)
  nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["masked_ids"].reshape(-1),
                        reduction="none")
  return (nll * weights).sum() / weights.sum().clamp_min(1e-6)


def hf_loss(model, batch, objective: str, config, full_logits: bool = False):
  """The scalar training loss of one step (the same math as script_jax.objectives)."""
  import torch  # pylint: disable=g-import-not-at-top  (optional: torch)
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top  (optional: torch)
  if objective == "mlm":
    return _mlm_loss(_masked_logits(model, batch, full_logits), batch)
  logits = _masked_logits(model.generator, batch, full_logits)
  gen_loss = _mlm_loss(logits, batch)
  with torch.no_grad():  # Gumbel-max sample, no gradient into the sampling
    uniform = torch.rand_like(logits).clamp_(1e-20, 1.0)
    gumbel = -torch.log(-torch.log(uniform))
    sampled = torch.argmax(logits / config.electra.temperature + gumbel, dim=-1)
    # The benchmark batch uses every prediction slot, so no padding slot needs dropping.
    sampled_ids = batch["input_ids"].scatter(1, batch["masked_positions"], sampled)
    originals = batch["input_ids"].scatter(1, batch["masked_positions"], batch["masked_ids"])
    is_original = (sampled_ids == originals).float()
  disc_logits = model.discriminator(sampled_ids, attention_mask=batch["input_mask"],
                                    token_type_ids=batch["segment_ids"]).logits
  mask = batch["input_mask"].float()
  disc_nll = F.binary_cross_entropy_with_logits(disc_logits, is_original, reduction="none")
  disc_loss = (disc_nll * mask).sum() / mask.sum()
  return gen_loss + config.disc_weight * disc_loss


def make_hf_optimizer(model, config, impl: str):
  """AdamW with decay off biases and LayerNorm, linear warmup/decay: as state_lib.make_optimizer."""
  import torch  # pylint: disable=g-import-not-at-top  (optional: torch)
  o = config.optim
  decay, no_decay = [], []
  for name, p in model.named_parameters():  # shared parameters are listed once
    (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
  kwargs = {"fused": impl == "fused", "foreach": impl == "foreach"}
  optimizer = torch.optim.AdamW(
      [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay,
                                                            "weight_decay": 0.0}],
      lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps, **kwargs)
  warmup, total = o.warmup_steps, config.num_train_steps

  def lr_factor(step):
    if step < warmup:
      return step / max(warmup, 1)
    return max(0.0, (total - step) / max(total - warmup, 1))
  return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def time_hf(config, objective: str, np_batch, *, steps: int, warmup: int, repeats: int,
            adamw: str = "fused", full_logits: bool = False, log=print) -> dict[str, Any]:
  """Times the HF train step on `np_batch`; returns steps/s and the parameter count."""
  import torch  # pylint: disable=g-import-not-at-top  (optional: torch)
  torch.manual_seed(0)
  model = build_hf_model(config, objective).train()
  num_params = sum(p.numel() for p in model.parameters())
  optimizer, scheduler = make_hf_optimizer(model, config, adamw)
  batch = {k: torch.from_numpy(v).long() if v.dtype.kind == "i" else torch.from_numpy(v)
           for k, v in np_batch.items()}

  def step():
    loss = hf_loss(model, batch, objective, config, full_logits)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  label = f"[hf {objective}{' stock' if full_logits else ''}]"
  step_timing.warm_up_torch(step, warmup, label)
  windows, others = step_timing.timed_windows(
      lambda: [step() for _ in range(steps)], repeats,
      lambda seconds, other: log(f"{label} {steps} steps in {seconds:.3f} s "
                                 f"({steps / seconds:.3f} steps/s; other processes used "
                                 f"{step_timing.percent(other)}% of the CPUs)"))
  attn = getattr(getattr(model, "config", None) or model.discriminator.config,
                 "_attn_implementation", None)
  best = min(range(len(windows)), key=windows.__getitem__)
  return {"steps_per_sec": steps / windows[best], "window_seconds": windows,
          "others_cpu_share": others, "others_cpu_share_best_window": others[best],
          "num_params": num_params, "attn_implementation": attn, "adamw": adamw,
          "full_logits": full_logits}


# ----------------------------------------------------------------------------- both sides

def run_peer(config, objectives, *, batch_size: int, steps: int, warmup: int, repeats: int,
             threads: int | None = None, adamw: str = "fused", hf_stock: bool = False,
             skip_ours: bool = False, log=print) -> dict[str, Any]:
  """Ours (script_jax.bench.step_timing) and HF's step for each objective, in this one process."""
  import torch  # pylint: disable=g-import-not-at-top  (optional: torch)
  import transformers  # pylint: disable=g-import-not-at-top  (optional: transformers)
  threads = threads or os.cpu_count()
  torch.set_num_threads(threads)
  # Equal shapes: HF's softmax layer has exactly vocab_size rows, so ours is not padded here.
  config = config.copy_and_resolve_references()
  config.model.vocab_pad_multiple = 1
  report_env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
  report = step_timing.environment()
  report["versions"].update(torch=torch.__version__, transformers=transformers.__version__)
  report["settings"] = {"objectives": list(objectives), "batch_size": batch_size,
                        "seq_len": config.seq_len,
                        "max_predictions_per_seq": config.mask.max_predictions_per_seq,
                        "dtype": config.model.dtype, "steps": steps, "warmup": warmup,
                        "repeats": repeats, "torch_threads": threads, "adamw": adamw,
                        "torch_environment": report_env}
  results = {}
  for objective in objectives:
    if objective not in ("electra", "mlm"):
      raise ValueError(f"hf_peer compares electra and mlm, not {objective!r}")
    cfg = step_timing.with_settings(config, objective, batch_size)
    np_batch = synthetic.random_masked_batch(cfg, batch_size)
    entry = {"model_flops_per_step": flops.train_step_flops(cfg)["total"]}
    if not skip_ours:
      entry["ours"] = step_timing.benchmark_objective(cfg, objective, steps=steps, warmup=warmup,
                                                      repeats=repeats, log=log)
    entry["hf"] = time_hf(cfg, objective, np_batch, steps=steps, warmup=warmup,
                          repeats=repeats, adamw=adamw, log=log)
    if hf_stock:
      entry["hf_stock"] = time_hf(cfg, objective, np_batch, steps=steps, warmup=warmup,
                                  repeats=repeats, adamw=adamw, full_logits=True, log=log)
    if "ours" in entry:
      entry["ours_over_hf"] = entry["ours"]["steps_per_sec"] / entry["hf"]["steps_per_sec"]
    results[objective] = entry
  report["results"] = results
  report["load_average_end"] = list(os.getloadavg())
  return report


def format_table(report) -> str:
  """The human-readable summary of `run_peer`'s report."""
  lines = [f"{'objective':<9} {'side':<10} {'params':>11} {'steps/s':>8} {'GFLOP/s':>8} "
           f"{'ours/hf':>7} {'others %':>8}"]
  for objective, entry in report["results"].items():
    for side in ("ours", "hf", "hf_stock"):
      if side not in entry:
        continue
      r = entry[side]
      ratio = entry["ours"]["steps_per_sec"] / r["steps_per_sec"] if "ours" in entry else math.nan
      gflops = (r["steps_per_sec"] * entry["model_flops_per_step"] / 1e9
                if side != "hf_stock" else math.nan)  # stock does more than the model FLOPs
      lines.append(f"{objective:<9} {side:<10} {r['num_params']:>11,} {r['steps_per_sec']:>8.3f} "
                   f"{gflops:>8.1f} {ratio:>7.2f} "
                   f"{step_timing.percent(r['others_cpu_share_best_window']):>8}")
  s = report["settings"]
  lines.append("others %: CPU share other processes used during the reported window")
  lines.append(f"batch {s['batch_size']} x {s['seq_len']}, P={s['max_predictions_per_seq']}, "
               f"{s['dtype']}, torch threads {s['torch_threads']} (OMP_WAIT_POLICY "
               f"{s['torch_environment']['OMP_WAIT_POLICY'] or 'unset'}), AdamW {s['adamw']}; "
               f"jax {report['versions']['jax']}, torch {report['versions']['torch']}, "
               f"transformers {report['versions']['transformers']}")
  return "\n".join(lines)
