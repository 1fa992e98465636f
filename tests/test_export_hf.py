"""Export to and import from HuggingFace transformers, checked against transformers itself
(PyTorch, CPU): every exported folder loads with the Auto classes and gives our outputs; every
folder transformers saves imports here and gives its outputs; import then export gives back the
same tensors. torch and transformers are optional for users, so this file needs them installed
(.ci/run installs them in a second step)."""

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from helpers import load_config, run_module, shared_workdir  # pylint: disable=wrong-import-position

from script_jax import models  # pylint: disable=wrong-import-position
from script_jax.data import tokenizers as our_tokenizers  # pylint: disable=wrong-import-position
from script_jax.interop import hf_export  # pylint: disable=wrong-import-position
from script_jax.interop import hf_folder  # pylint: disable=wrong-import-position
from script_jax.interop import hf_tokenizer  # pylint: disable=wrong-import-position
from script_jax.finetune import model as task_models  # pylint: disable=wrong-import-position
from script_jax.scoring import pll_scorer  # pylint: disable=wrong-import-position

# torch and transformers models beside ours, each built and compared: tens of seconds a test.
pytestmark = pytest.mark.slow

VOCAB = 500  # not a multiple of vocab_pad_multiple (128): the padding is stripped and restored
ATOL = 1e-4
TEXTS = ["The function returns a new list of the items.", "A class definition is executable.",
         "Café names, naïve ÀCCENTS and 中文 are fine too!", "x" * 150 + " end",
         "  spaces   everywhere  ", "numbers 3.14 and (brackets) [here]"]


def tiny(**overrides):
  """configs/tiny.py at test sizes: E != H (the E -> H projection), 2 layers, vocab 500."""
  values = {"model.vocab_size": VOCAB, "model.embedding_size": 32, "model.num_layers": 2,
            "model.max_position_embeddings": 40, "electra.generator_num_layers": 1}
  values.update(overrides)
  return load_config("tiny", **values)


def perturbed(params, seed):
  """Initial parameters with noise on every leaf, so zero biases and unit LayerNorm scales are
  not what the mapping is tested on."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x + rng.normal(0, 0.2, x.shape), np.float32),
                      jax.device_get(params))


def init(model, seed=0, positions=False):
  ids = np.zeros((1, 4), np.int32)
  args = (ids, ids, ids + 1) + ((ids,) if positions else ())
  return perturbed(model.init(jax.random.key(seed), *args)["params"], seed)


def ragged_batch(seed, batch=3, length=12, vocab=VOCAB):
  """Random ids (no special ids), padding after different lengths, two segments in one row."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  mask[1, 7:] = 0
  mask[2, 3:] = 0
  ids[mask == 0] = 0
  segments = np.zeros((batch, length), np.int32)
  segments[0, 6:] = 1
  return ids, segments, mask


def hf_outputs(model, ids, segments, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long),
                 token_type_ids=torch.tensor(segments, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()


def assert_close_where(ours, theirs, mask, atol=ATOL):
  """Equal at real positions (padded positions are free to differ: masking conventions)."""
  real = np.broadcast_to(mask.astype(bool).reshape(mask.shape + (1,) * (ours.ndim - 2)),
                         ours.shape)
  np.testing.assert_allclose(ours[real], theirs[real], atol=atol, rtol=0)


def mlm_logits(model, params, ids, segments, mask):
  features = model.apply({"params": params}, ids, segments, mask)
  table, bias = model.apply({"params": params}, method=model.output_embedding)
  return np.asarray(models.tied_logits(features, table, bias))


def torch_critic_pll(mlm_model, ids, mask, score_mask):
  """The critic's PLL (eq. 7) from a HuggingFace ElectraForMaskedLM: sum over scored tokens of
  log sigmoid(logsumexp_v s_tv), every position's logits over the (unpadded) vocabulary."""
  logits = hf_outputs(mlm_model, ids, np.zeros_like(ids), mask)
  log_p = torch.nn.functional.logsigmoid(torch.logsumexp(torch.tensor(logits), dim=-1)).numpy()
  return (log_p * score_mask).sum(-1)


# ----------------------------------------------------------------------------- tokenizers

def _corpus_lines():
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  return [l.strip() for t in sorted(topics) for l in topics[t].splitlines() if len(l.split()) > 4]


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
  """A 500-entry uncased WordPiece vocab.txt: specials, characters, ## characters, words."""
  chars = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?()[]{}'\"-_/\\*+=<>#$%&@"
  tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
  counts = {}
  for line in _corpus_lines()[:3000]:
    for word in line.lower().split():
      word = word.strip(".,;:()'\"")
      if word.isalpha():
        counts[word] = counts.get(word, 0) + 1
  for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
    if len(tokens) == VOCAB:
      break
    if word not in tokens:
      tokens.append(word)
  path = tmp_path_factory.mktemp("wordpiece") / "vocab.txt"
  path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
  return our_tokenizers.WordPieceTokenizer(str(path))


def write_tokenizer(folder, tokenizer, max_length=40):
  files = hf_tokenizer.tokenizer_files(tokenizer, tokenizer.special_ids, max_length)
  os.makedirs(folder, exist_ok=True)
  for name, data in files.items():
    with open(os.path.join(folder, name), "wb") as f:
      f.write(data)
  return folder


def assert_same_ids(folder, tokenizer, texts):
  auto = transformers.AutoTokenizer.from_pretrained(str(folder))
  special = tokenizer.special_ids
  for text in texts:
    ours = tokenizer.encode(text)
    assert auto(text, add_special_tokens=False)["input_ids"] == ours, text
    assert auto(text)["input_ids"] == [special["cls"], *ours, special["sep"]], text
  pair = auto(texts[0], texts[1])
  a, b = tokenizer.encode(texts[0]), tokenizer.encode(texts[1])
  assert pair["input_ids"] == [special["cls"], *a, special["sep"], *b, special["sep"]]
  assert pair["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
  return auto


def test_wordpiece_tokenizer_gives_our_ids(wordpiece, tmp_path):
  folder = write_tokenizer(tmp_path / "hf", wordpiece)
  auto = assert_same_ids(folder, wordpiece, TEXTS + _corpus_lines()[3000:3300])
  assert auto.mask_token_id == wordpiece.special_ids["mask"]
  assert auto.pad_token_id == wordpiece.special_ids["pad"]
  # The 150-character word is pieces in ours (BERT's limit is 200), [UNK] in BertTokenizer's.
  assert wordpiece.encode("x" * 150) != [wordpiece.special_ids["unk"]]
  # Read back: the same tokenizer.
  back, special_ids = hf_tokenizer.load_folder_tokenizer(str(folder))
  assert special_ids == wordpiece.special_ids and back.lowercase
  assert back.encode_batch(TEXTS) == wordpiece.encode_batch(TEXTS)


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_tokenizer_gives_our_ids(model_type, tmp_path):
  lines = _corpus_lines()
  tokenizer = our_tokenizers.train_sentencepiece(lines[:3000], 400, str(tmp_path / "spm.model"),
                                                 model_type=model_type)
  folder = write_tokenizer(tmp_path / "hf", tokenizer)
  assert_same_ids(folder, tokenizer, TEXTS + lines[3000:3500])
  back, special_ids = hf_tokenizer.load_folder_tokenizer(str(folder))
  assert special_ids == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
  assert back.encode_batch(TEXTS) == tokenizer.encode_batch(TEXTS)


def test_sentencepiece_that_cannot_be_reproduced_is_refused(tmp_path):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_corpus_lines()[:2000]), model_prefix=str(tmp_path / "bf"),
      vocab_size=400, byte_fallback=True, pad_id=0, pad_piece="[PAD]", unk_id=1,
      unk_piece="[UNK]", bos_id=-1, eos_id=-1, control_symbols="[CLS],[SEP],[MASK]",
      minloglevel=2)
  tokenizer = our_tokenizers.SentencePieceTokenizer(str(tmp_path / "bf.model"))
  with pytest.raises(hf_tokenizer.TokenizerExportError, match="byte_fallback"):
    hf_tokenizer.tokenizer_files(tokenizer, tokenizer.special_ids, 40)


# ----------------------------------------------------------------------------- export: outputs

@pytest.mark.parametrize("layout", ["electra", "bert"])
def test_masked_lm_export_gives_our_logits_and_critic_pll(layout, wordpiece, tmp_path):
  config = tiny(**({"model.embedding_size": 64} if layout == "bert" else {}))
  model = models.build_model(config)
  params = init(model, seed=1)
  cfg = model.cfg
  arch = {"electra": "ElectraForMaskedLM", "bert": "BertForMaskedLM"}[layout]
  folder = hf_export.write_folder(
      str(tmp_path / "hf"), hf_folder.hf_config_dict(cfg, arch, layout, 0),
      hf_export.mlm_tensors(params, cfg, layout),
      hf_tokenizer.tokenizer_files(wordpiece, wordpiece.special_ids, 40))
  hf_model = transformers.AutoModelForMaskedLM.from_pretrained(folder)
  assert type(hf_model).__name__ == arch
  ids, segments, mask = ragged_batch(seed=2)
  theirs = hf_outputs(hf_model, ids, segments, mask)
  assert theirs.shape == ids.shape + (VOCAB,)  # the padding rows are gone
  assert_close_where(mlm_logits(model, params, ids, segments, mask)[..., :VOCAB], theirs, mask)
  score_mask = mask.copy()
  score_mask[:, 0] = 0
  ours_pll = pll_scorer.critic_pll(params, ids, mask, score_mask, model=model)
  np.testing.assert_allclose(torch_critic_pll(hf_model, ids, mask, score_mask), ours_pll,
                             atol=ATOL, rtol=0)


def test_electra_export_gives_our_logits_and_imports_back(wordpiece, tmp_path):
  config = tiny(objective="electra")
  model = models.build_model(config)
  params = init(model, seed=3, positions=True)
  cfg, gen_cfg = model.disc_cfg, model.gen_cfg
  files = hf_tokenizer.tokenizer_files(wordpiece, wordpiece.special_ids, 40)
  disc_dir = hf_export.write_folder(
      str(tmp_path / "both" / "discriminator"),
      hf_folder.hf_config_dict(cfg, "ElectraForPreTraining", "electra", 0),
      hf_export.discriminator_tensors(params, cfg), files)
  gen_dir = hf_export.write_folder(
      str(tmp_path / "both" / "generator"),
      hf_folder.hf_config_dict(gen_cfg, "ElectraForMaskedLM", "electra", 0),
      hf_export.mlm_tensors(params, gen_cfg, "electra", "generator", "generator_head",
                            "generator_output_bias"), files)
  ids, segments, mask = ragged_batch(seed=4)
  disc = transformers.AutoModelForPreTraining.from_pretrained(disc_dir)
  assert type(disc).__name__ == "ElectraForPreTraining"
  ours = np.asarray(model.apply({"params": params}, ids, segments, mask,
                                method=model.discriminate))
  # HuggingFace's logit is "replaced" (labels 1 = replaced), ours "original".
  assert_close_where(ours[..., None], -hf_outputs(disc, ids, segments, mask)[..., None], mask)
  gen = transformers.AutoModelForMaskedLM.from_pretrained(gen_dir)
  positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
  ours = np.asarray(model.apply({"params": params}, ids, segments, mask, positions,
                                method=model.generate))
  assert gen.config.hidden_size == 16 and gen.config.embedding_size == 32
  assert_close_where(ours[..., :VOCAB], hf_outputs(gen, ids, segments, mask), mask)
  # Export then import (the folder with both parts): our parameters, the padding rows zero.
  back_config, back, _ = hf_export.load_hf_folder(str(tmp_path / "both"), objective="electra")
  assert back_config.electra.generator_hidden_size == 16
  unpad = lambda path, x: x[:VOCAB] if "word_embeddings" in str(path) or "bias" in str(
      path[-1]) and x.shape[:1] == (512,) else x
  jax.tree_util.tree_map_with_path(
      lambda path, a, b: np.testing.assert_array_equal(unpad(path, a), unpad(path, b)),
      params, back)
  assert not back["generator_output_bias"][VOCAB:].any()


def test_export_of_an_electra_workdir(wordpiece, tmp_path, monkeypatch):
  """export_pretrained on an ELECTRA run, both parts (the workdir's checkpoint and tokenizer
  stand in: the SCRIPT command test below reads a real one)."""
  from script_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from script_jax.data import prepared_folder  # pylint: disable=g-import-not-at-top
  config = tiny(objective="electra", **{"model.scan_layers": True})
  model = models.build_model(config)
  params = init(model, seed=12, positions=True)
  monkeypatch.setattr(checkpoints, "load_pretrained", lambda workdir, step: (
      config, model, params))
  monkeypatch.setattr(prepared_folder, "load_workdir_tokenizer", lambda workdir, config: (
      wordpiece, wordpiece.special_ids))
  written = hf_export.export_pretrained(str(tmp_path), str(tmp_path / "hf"), part="both")
  assert [os.path.basename(w) for w in written] == ["discriminator", "generator"]
  ids, segments, mask = ragged_batch(seed=11)
  disc = transformers.AutoModelForPreTraining.from_pretrained(written[0])
  ours = np.asarray(model.apply({"params": params}, ids, segments, mask,
                                method=model.discriminate))
  assert_close_where(ours[..., None], -hf_outputs(disc, ids, segments, mask)[..., None], mask)
  gen = transformers.AutoModelForMaskedLM.from_pretrained(written[1])
  positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
  ours = np.asarray(model.apply({"params": params}, ids, segments, mask, positions,
                                method=model.generate))
  assert_close_where(ours[..., :VOCAB], hf_outputs(gen, ids, segments, mask), mask)
  assert json.loads((tmp_path / "hf" / "generator" / "config.json").read_text())[
      "script_jax"]["part"] == "generator"
  with pytest.raises(hf_export.ExportError, match="layout=electra"):
    hf_export.export_pretrained(str(tmp_path), str(tmp_path / "bert"), layout="bert")
  with pytest.raises(hf_export.ExportError, match="--overwrite"):
    hf_export.export_pretrained(str(tmp_path), str(tmp_path / "hf"), part="both")


@pytest.mark.parametrize("num_outputs", [3, 1])
def test_classifier_export_gives_our_logits(num_outputs, tmp_path):
  config = tiny()
  cfg = models.encoder_config_from(config.model)
  model = task_models.Classifier(cfg, num_outputs)
  params = init(model, seed=5)
  # Large LayerNorm scales and shifts: the [CLS] states GELU's shift must cover.
  last = params["backbone"]["encoder"]["layer_1"]["ffn_norm"]
  last["scale"] = last["scale"] * 5.0
  last["bias"] = last["bias"] * 5.0
  folder = hf_export.write_folder(
      str(tmp_path / "hf"),
      hf_folder.hf_config_dict(cfg, "ElectraForSequenceClassification", "electra", 0,
                               num_labels=num_outputs),
      hf_export.classifier_tensors(params, cfg), {})
  hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
  assert type(hf_model).__name__ == "ElectraForSequenceClassification"
  ids, segments, mask = ragged_batch(seed=6, batch=4)
  ours = np.asarray(model.apply({"params": params}, ids, segments, mask))
  theirs = hf_outputs(hf_model, ids, segments, mask)
  assert theirs.shape == (4, num_outputs)
  np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)
  assert np.abs(ours).max() > 1.0  # not a trivially small comparison


# ----------------------------------------------------------------------------- export: commands

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return shared_workdir(tmp_path_factory)


def test_export_command_on_a_pretraining_workdir(workdir, tmp_path):
  """The real workdir (checkpoint, SentencePiece tokenizer) through the command: the folder's
  tokenizer gives our ids and its critic PLL is the scorer's."""
  out = tmp_path / "hf"
  result = run_module("interop.hf", [f"--workdir={workdir}", f"--output_dir={out}"])
  assert result.returncode == 0, result.stderr.decode()[-3000:]
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "special_tokens_map.json",
                                     "spm.model", "tokenizer.json", "tokenizer_config.json"]
  scorer = pll_scorer.Scorer.from_workdir(workdir, batch_size=4)
  auto = assert_same_ids(out, scorer.tokenizer, TEXTS[:3] + TEXTS[4:])
  hf_model = transformers.AutoModelForMaskedLM.from_pretrained(str(out))
  texts = TEXTS[:3]
  ours, num_tokens = scorer.score(texts)
  encoded = auto(texts, padding=True)
  ids, mask = np.asarray(encoded["input_ids"]), np.asarray(encoded["attention_mask"])
  score_mask = (mask > 0) & (ids != auto.cls_token_id) & (ids != auto.sep_token_id)
  assert list(score_mask.sum(-1)) == list(num_tokens)
  np.testing.assert_allclose(torch_critic_pll(hf_model, ids, mask, score_mask), ours,
                             atol=ATOL, rtol=0)
  # A second export into the same folder is refused, naming the way out.
  again = run_module("interop.hf", [f"--workdir={workdir}", f"--output_dir={out}"])
  assert again.returncode == 2 and b"error:" in again.stderr and b"--overwrite" in again.stderr
  assert b"Traceback" not in again.stderr
  # --part is for ELECTRA workdirs only.
  with pytest.raises(hf_export.ExportError, match="--part"):
    hf_export.export_pretrained(workdir, str(tmp_path / "x"), part="generator")


def test_export_of_a_glue_run(workdir, tmp_path):
  """OUT/<task>/seed_<s>/params as the GLUE command saves it -> ElectraForSequenceClassification
  that gives our logits on the HuggingFace tokenizer's encoding of a sentence pair."""
  from script_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from script_jax.data import prepared_folder  # pylint: disable=g-import-not-at-top
  from script_jax.finetune import glue_data, trainer  # pylint: disable=g-import-not-at-top,g-multiple-import
  config = checkpoints.read_run_config(workdir)
  cfg = models.encoder_config_from(config.model, scan_layers=False, remat=False)
  model = task_models.Classifier(cfg, 2)
  params = init(model, seed=7)
  run_dir = tmp_path / "out" / "rte" / "seed_0"
  trainer.save_params(str(run_dir / "params"), params)
  (tmp_path / "out" / "results.json").write_text(json.dumps({"init_from": workdir, "runs": {}}))
  folder = hf_export.export_finetuned(str(run_dir), str(tmp_path / "hf"))
  hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
  assert hf_model.config.id2label == {0: "entailment", 1: "not_entailment"}
  auto = transformers.AutoTokenizer.from_pretrained(folder)
  tokenizer, special = prepared_folder.load_workdir_tokenizer(workdir, config)
  example = glue_data.Example(guid="0", text_a=TEXTS[0], text_b=TEXTS[1], label=0)
  arrays = glue_data.featurize([example], tokenizer.encode, special["cls"], special["sep"],
                               special["pad"], 32)
  ours = np.asarray(model.apply({"params": params}, arrays["input_ids"], arrays["segment_ids"],
                                arrays["input_mask"]))
  encoded = auto(TEXTS[0], TEXTS[1], return_tensors="pt")
  n = encoded["input_ids"].shape[1]
  assert encoded["input_ids"][0].tolist() == arrays["input_ids"][0, :n].tolist()
  assert encoded["token_type_ids"][0].tolist() == arrays["segment_ids"][0, :n].tolist()
  with torch.no_grad():
    theirs = hf_model(**encoded).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- import

def _perturb_torch(model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.2)
  return model.eval()


@pytest.fixture(scope="module")
def hf_electra(tmp_path_factory, wordpiece):
  """An ELECTRA discriminator and generator built in transformers with random weights, sharing
  their embeddings as ELECTRA does, saved with save_pretrained and our WordPiece vocab."""
  root = tmp_path_factory.mktemp("hf_electra")
  common = dict(vocab_size=VOCAB, embedding_size=32, max_position_embeddings=40,
                type_vocab_size=2)
  disc = _perturb_torch(transformers.ElectraForPreTraining(transformers.ElectraConfig(
      hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
      **common)), 0)
  gen = _perturb_torch(transformers.ElectraForMaskedLM(transformers.ElectraConfig(
      hidden_size=16, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64,
      **common)), 1)
  gen.electra.embeddings.load_state_dict(disc.electra.embeddings.state_dict())
  bert = _perturb_torch(transformers.BertForMaskedLM(transformers.BertConfig(
      vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=128, max_position_embeddings=40)), 2)
  folders = {}
  for name, model in (("disc", disc), ("gen", gen), ("bert", bert)):
    folders[name] = str(root / name)
    model.save_pretrained(folders[name])
    write_tokenizer(folders[name], wordpiece)
  return folders, {"disc": disc, "gen": gen, "bert": bert}


def _saved_tensors(folder):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return load_file(os.path.join(folder, "model.safetensors"))


def test_import_electra_gives_transformers_outputs_and_exports_back(hf_electra):
  folders, hf_models = hf_electra
  config, params, tokenizer = hf_export.load_hf_folder(f"{folders['disc']},{folders['gen']}",
                                                       objective="electra")
  assert (config.model.hidden_size, config.electra.generator_hidden_size) == (64, 16)
  assert tokenizer.vocab_size == VOCAB
  model = models.build_model(config)
  ids, segments, mask = ragged_batch(seed=8)
  ours = np.asarray(model.apply({"params": params}, ids, segments, mask,
                                method=model.discriminate))
  theirs = hf_outputs(hf_models["disc"], ids, segments, mask)
  assert_close_where(ours[..., None], -theirs[..., None], mask)
  positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
  ours = np.asarray(model.apply({"params": params}, ids, segments, mask, positions,
                                method=model.generate))
  assert_close_where(ours[..., :VOCAB], hf_outputs(hf_models["gen"], ids, segments, mask), mask)
  # Import then export: the very tensors transformers saved.
  cfg, gen_cfg = model.disc_cfg, model.gen_cfg
  for exported, folder in ((hf_export.discriminator_tensors(params, cfg), folders["disc"]),
                           (hf_export.mlm_tensors(params, gen_cfg, "electra", "generator",
                                                  "generator_head", "generator_output_bias"),
                            folders["gen"])):
    saved = _saved_tensors(folder)
    assert sorted(exported) == sorted(saved)
    for name, value in saved.items():
      np.testing.assert_array_equal(exported[name], value, err_msg=name)


@pytest.mark.parametrize("source,layout", [("gen", "electra"), ("bert", "bert")])
def test_import_masked_lm_gives_transformers_logits_and_exports_back(hf_electra, source, layout):
  folders, hf_models = hf_electra
  config, params, _ = hf_export.load_hf_folder(folders[source], objective="script")
  model = models.build_model(config)
  ids, segments, mask = ragged_batch(seed=9)
  assert_close_where(mlm_logits(model, params, ids, segments, mask)[..., :VOCAB],
                     hf_outputs(hf_models[source], ids, segments, mask), mask)
  exported = hf_export.mlm_tensors(params, model.cfg, layout)
  saved = _saved_tensors(folders[source])
  assert sorted(exported) == sorted(saved)
  for name, value in saved.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_import_reads_sharded_safetensors_and_pytorch_pickles(hf_electra, tmp_path):
  folders, hf_models = hf_electra
  _, reference, _ = hf_export.load_hf_folder(folders["gen"], objective="mlm")
  sharded, pickled = str(tmp_path / "sharded"), str(tmp_path / "pickled")
  hf_models["gen"].save_pretrained(sharded, max_shard_size="20KB")
  assert "model.safetensors.index.json" in os.listdir(sharded)
  shutil.copytree(folders["gen"], pickled)
  os.remove(os.path.join(pickled, "model.safetensors"))
  torch.save(hf_models["gen"].state_dict(), os.path.join(pickled, "pytorch_model.bin"))
  for folder in (sharded, pickled):
    write_tokenizer(folder, hf_tokenizer.load_folder_tokenizer(folders["gen"])[0])
    _, params, _ = hf_export.load_hf_folder(folder, objective="mlm")
    jax.tree.map(np.testing.assert_array_equal, params, reference)


def test_export_and_import_through_a_remote_file_system(hf_electra):
  """ram:// is TensorFlow's in-memory file system, served by the same code as gs://."""
  from script_jax import fs  # pylint: disable=g-import-not-at-top
  folders, _ = hf_electra
  _, reference, tokenizer = hf_export.load_hf_folder(folders["gen"], objective="mlm")
  remote = "ram://export_test/gen"
  fs.makedirs(remote)
  for name in os.listdir(folders["gen"]):
    fs.copy(os.path.join(folders["gen"], name), fs.join(remote, name))
  config, params, _ = hf_export.load_hf_folder(remote, objective="mlm")
  jax.tree.map(np.testing.assert_array_equal, params, reference)
  cfg = models.encoder_config_from(config.model)
  out = hf_export.write_folder("ram://export_test/back", hf_folder.hf_config_dict(
      cfg, "ElectraForMaskedLM", "electra", 0), hf_export.mlm_tensors(params, cfg, "electra"),
                        hf_tokenizer.tokenizer_files(tokenizer, tokenizer.special_ids, 40))
  _, again, _ = hf_export.load_hf_folder(out, objective="mlm")
  jax.tree.map(np.testing.assert_array_equal, again, reference)


def test_import_old_bert_names_and_a_bare_encoder_for_fine_tuning(hf_electra, tmp_path):
  """LayerNorm gamma/beta (as bert-base-uncased's files) and a bare BertModel both import."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  folders, hf_models = hf_electra
  folder = tmp_path / "bert_base_style"
  shutil.copytree(folders["bert"], folder)
  saved = _saved_tensors(folders["bert"])
  save_file({k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                     "LayerNorm.beta"): v
             for k, v in saved.items() if k.startswith("bert.")}, str(folder / "model.safetensors"),
            metadata={"format": "pt"})
  config, encoder, tokenizer, special_ids = hf_export.finetune_start(str(folder))
  assert special_ids == tokenizer.special_ids and config.data.tokenizer == "wordpiece"
  cfg = models.encoder_config_from(config.model)
  ids, segments, mask = ragged_batch(seed=10)
  x = models.Embeddings(cfg).apply({"params": encoder["embeddings"]}, ids, segments, True)
  ours = np.asarray(models.Transformer(cfg).apply({"params": encoder["encoder"]}, x, mask, True))
  with torch.no_grad():
    theirs = hf_models["bert"].bert(input_ids=torch.tensor(ids, dtype=torch.long),
                                    token_type_ids=torch.tensor(segments, dtype=torch.long),
                                    attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  assert_close_where(ours, theirs, mask)
  # This folder has no MLM head: continued pretraining starts one fresh, and says so.
  fresh = jax.device_get(jax.jit(lambda k: models.build_model(config).init(
      k, ids, segments, mask)["params"])(jax.random.key(0)))
  params, report = hf_export.pretraining_params(str(folder), config, fresh)
  assert report[-1] == "initialised fresh: mlm_head, output_bias"
  np.testing.assert_array_equal(params["mlm_head"]["dense"]["kernel"],
                                fresh["mlm_head"]["dense"]["kernel"])
  np.testing.assert_array_equal(params["encoder"]["layer_1"]["ffn_norm"]["scale"],
                                encoder["encoder"]["layer_1"]["ffn_norm"]["scale"])


def test_continued_pretraining_refuses_a_config_that_does_not_match(hf_electra):
  folders, _ = hf_electra
  config = load_config("tiny", objective="electra")  # tiny's sizes, a SentencePiece tokenizer
  with pytest.raises(hf_export.HFFolderError) as error:
    hf_export.check_pretraining_config(f"{folders['disc']},{folders['gen']}", config)
  message = str(error.value)
  for flag in ("--config.model.vocab_size=500", "--config.model.embedding_size=32",
               "--config.model.intermediate_size=128", "--config.model.max_position_embeddings=40",
               "--config.electra.generator_num_layers=1", "--config.data.tokenizer=wordpiece",
               f"--config.data.vocab_file={folders['disc']}/vocab.txt"):
    assert flag in message, (flag, message)
  assert "hidden_size" not in message  # only what differs
  # With those flags it passes, and a scanned layout gets stacked parameters.
  fixed = load_config("tiny", **{
      "objective": "electra", "model.vocab_size": VOCAB, "model.embedding_size": 32,
      "model.hidden_size": 64, "model.intermediate_size": 128, "model.num_heads": 2,
      "model.num_layers": 2, "model.max_position_embeddings": 40, "model.scan_layers": True,
      "electra.generator_hidden_size": 16, "electra.generator_num_heads": 1,
      "electra.generator_intermediate_size": 64, "electra.generator_num_layers": 1,
      "data.tokenizer": "wordpiece", "data.vocab_file": f"{folders['disc']}/vocab.txt",
      "seq_len": 32})
  hf_export.check_pretraining_config(f"{folders['disc']},{folders['gen']}", fixed)
  from script_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  model = models.build_model(fixed)
  fresh = jax.eval_shape(lambda: state_lib.init_params(fixed, model, jax.random.key(0)))
  fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), fresh)
  params, report = hf_export.pretraining_params(folders["disc"], fixed, fresh)  # generator fresh
  assert "layers" in params["discriminator"] and report[-1].startswith("initialised fresh: gen")
  assert params["embeddings"]["word_embeddings"]["embedding"].shape == (512, 32)


def _bad_folder(tmp_path, source, edit_config=None, drop=None):
  folder = tmp_path / "bad"
  shutil.copytree(source, folder)
  if edit_config:
    config = json.loads((folder / "config.json").read_text())
    edit_config(config)
    (folder / "config.json").write_text(json.dumps(config))
  for name in drop or ():
    os.remove(folder / name)
  return str(folder)


@pytest.mark.parametrize("edit,drop,expected", [
    (lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]), None,
     "model_type 'gpt2'"),
    (lambda c: c.update(hidden_act="gelu_new"), None, "hidden_act 'gelu_new'"),
    (lambda c: c.update(position_embedding_type="relative_key"), None, "relative_key"),
    (lambda c: c.update(intermediate_size=96), None,
     "intermediate.dense.weight: the folder has (128, 64), config.json implies (96, 64)"),
    (None, ["model.safetensors"], "has no weights"),
    (None, ["config.json"], "no config.json"),
    (None, ["vocab.txt"], "no vocab.txt"),
])
def test_bad_folders_are_refused_naming_what_differs(hf_electra, tmp_path, edit, drop, expected):
  folders, _ = hf_electra
  folder = _bad_folder(tmp_path, folders["disc"], edit, drop)
  with pytest.raises(hf_folder.cli_errors.UserError, match=expected.replace("(", r"\(").replace(
      ")", r"\)")):
    hf_export.load_hf_folder(folder, objective="electra")


def test_untied_output_layer_is_refused(hf_electra, tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  folders, _ = hf_electra
  folder = _bad_folder(tmp_path, folders["gen"])
  saved = _saved_tensors(folders["gen"])
  saved["generator_lm_head.weight"] = saved["electra.embeddings.word_embeddings.weight"] + 1.0
  save_file(saved, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(hf_export.HFFolderError, match="not tied"):
    hf_export.load_hf_folder(folder, objective="mlm")


def test_export_refuses_what_it_cannot_do(tmp_path):
  with pytest.raises(hf_export.ExportError, match="does not exist"):
    hf_export.export_pretrained(str(tmp_path / "missing"), str(tmp_path / "hf"))
  with pytest.raises(hf_export.ExportError, match="save_model=True"):
    hf_export.export_finetuned(str(tmp_path / "out" / "rte" / "seed_0"), str(tmp_path / "hf"))
  (tmp_path / "out" / "xyz" / "seed_0" / "params").mkdir(parents=True)
  with pytest.raises(hf_export.ExportError, match="pass --task"):
    hf_export.export_finetuned(str(tmp_path / "out" / "xyz" / "seed_0"), str(tmp_path / "hf"))
