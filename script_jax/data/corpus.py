"""Pretraining text sources, read as streams of documents.

A document is a list of lines: sentences or paragraphs of one article, in order. Packing
(preparation.py) never lets a sequence span two documents, as in BERT's
create_pretraining_data.py and ELECTRA's build_pretraining_dataset.py.

Sources (`config.data.source`, or `--source` of `python -m script_jax.data.prepare`):

  ""                      the embedded default: the Python standard library's
                          `pydoc_data.topics.topics` (79 topics of the language reference,
                          ~65,000 words of English), one topic per document.
  PATH[,PATH...]          text files, folders (all files below them, sorted) or glob patterns;
                          one sentence or paragraph per line, a blank line between documents;
                          `.gz` files are decompressed.
  tfds:NAME[:SPLIT]       a TFDS text dataset, e.g. `tfds:wikipedia/20230601.en`, `tfds:lm1b`,
                          `tfds:openwebtext` (OpenWebText from its manual download, see
                          `OpenWebText` below). SPLIT defaults to "train" and may be a slice
                          such as `train[:1%]`.

This module imports neither TensorFlow nor TFDS at the top: the tokenizer worker processes of
preparation.py import it, and they should start in a second, not in the seconds TF takes.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
from pydoc_data import topics
import re
import tarfile
from typing import Iterator, Optional

from script_jax import cli_errors
from script_jax import fs
from script_jax.data import tfds_fetch

Document = list[str]

INVALID_UTF8_MODES = ("skip", "error")
DEFAULT_SOURCE_DESCRIPTION = "embedded default: pydoc_data.topics (Python language reference)"

# Sentence-level TFDS datasets (one shuffled sentence per example, no documents): pack this many
# consecutive sentences into one pseudo-document, or every sequence would be one short sentence
# and mostly padding.
_SENTENCES_PER_PSEUDO_DOCUMENT = {"lm1b": 64}

# Lines of only these characters underline headings in the pydoc topics ("*****", "=====").
_UNDERLINE_RE = re.compile(r"^[\s*=\-^~#+]+$")


class DataError(cli_errors.UserError):
  """Bad or missing pretraining data; the message says what to do about it."""


@dataclasses.dataclass
class ReadStats:
  """Counts kept while a source is read; preparation.py reports them and writes them out."""
  documents: int = 0
  lines: int = 0
  skipped_lines: int = 0  # lines dropped because they were not valid UTF-8
  first_skipped: list[str] = dataclasses.field(default_factory=list)  # "file:line", a few
  bytes_read: int = 0  # progress through total_bytes (compressed bytes for .gz files)
  total_bytes: int = 0
  total_documents: int = 0  # when the source knows it up front (TFDS, embedded default)

  def progress(self) -> Optional[float]:
    """The fraction of the source read so far, or None when the source has no known size."""
    if self.total_bytes:
      return min(1.0, self.bytes_read / self.total_bytes)
    if self.total_documents:
      return min(1.0, self.documents / self.total_documents)
    return None

  def summary(self) -> dict:
    return {"documents": self.documents, "lines": self.lines,
            "skipped_lines": self.skipped_lines, "first_skipped": self.first_skipped}


def describe_source(source: str) -> str:
  """A stable, human-readable name for a source, stored in metadata.json and compared on reuse."""
  if not source:
    return DEFAULT_SOURCE_DESCRIPTION
  if source.startswith("tfds:"):
    name, split = _parse_tfds_source(source)
    return f"tfds:{name}:{split}"
  return ",".join(fs.abspath(p) for p in _split_paths(source))


def read_documents(source: str, invalid_utf8: str = "skip", stats: Optional[ReadStats] = None, *,
                   tfds_data_dir: Optional[str] = None,
                   tfds_manual_dir: Optional[str] = None) -> Iterator[Document]:
  """Yields the documents of `source` (see the module docstring for the forms it takes).

  Args:
    source: "" for the embedded default, text paths, or "tfds:NAME[:SPLIT]".
    invalid_utf8: "skip" drops (and counts in `stats`) lines that are not valid UTF-8; "error"
      raises DataError naming the file and line.
    stats: updated while reading (counts and progress); pass one in to read them afterwards.
    tfds_data_dir: TFDS data_dir (default: TFDS's own, $TFDS_DATA_DIR or ~/tensorflow_datasets).
    tfds_manual_dir: where manually downloaded archives are (default: DATA_DIR/downloads/manual).
  """
  if invalid_utf8 not in INVALID_UTF8_MODES:
    raise DataError(f"config.data.invalid_utf8={invalid_utf8!r}; use one of {INVALID_UTF8_MODES}.")
  stats = stats if stats is not None else ReadStats()
  if not source:
    return _default_documents(stats)
  if source.startswith("tfds:"):
    name, split = _parse_tfds_source(source)
    return _tfds_documents(name, split, invalid_utf8, stats, tfds_data_dir, tfds_manual_dir)
  return _text_file_documents(list_text_files(source), invalid_utf8, stats)


# ----------------------------------------------------------------------------------------------
# Text files.


def _split_paths(source: str) -> list[str]:
  return [p.strip() for p in source.split(",") if p.strip()]


def list_text_files(source: str) -> list[str]:
  """The files a comma-separated list of files, folders and glob patterns names, in order."""
  files = []
  for pattern in _split_paths(source):
    path = pattern if fs.is_remote(pattern) else os.path.expanduser(pattern)
    if fs.isdir(path):
      found = []
      for root, dirs, names in fs.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # skip .git and the like
        found += [fs.join(root, n) for n in names if not n.startswith(".")]
      if not found:
        raise DataError(f"Folder {path} holds no files; put text files in it (one sentence or "
                        "paragraph per line, a blank line between documents).")
      files += sorted(found)
    elif fs.isfile(path):
      files.append(path)
    elif fs.has_magic(path):
      matches = sorted(p for p in fs.glob(path) if fs.isfile(p))
      if not matches:
        raise DataError(f"No file matches {pattern!r}; check the pattern given as the source.")
      files += matches
    else:
      raise DataError(f"Text source {pattern!r} does not exist. Pass existing text files or "
                      "folders with --source=PATH[,PATH...] (or --config.data.source), "
                      "'tfds:NAME' for a TFDS dataset, or an empty source for the embedded "
                      "default corpus.")
  if not files:
    raise DataError(f"Source {source!r} names no files.")
  return files


def _text_file_documents(files: list[str], invalid_utf8: str,
                         stats: ReadStats) -> Iterator[Document]:
  stats.total_bytes = sum(fs.getsize(f) for f in files)
  bytes_before = 0
  for path in files:
    yield from _one_text_file(path, invalid_utf8, stats, bytes_before)
    bytes_before += fs.getsize(path)
    stats.bytes_read = bytes_before


def _one_text_file(path: str, invalid_utf8: str, stats: ReadStats,
                   bytes_before: int) -> Iterator[Document]:
  """One file's documents; BERT's format: blank lines end documents, every other line is text."""
  lines_before, skipped_before = stats.lines, stats.skipped_lines
  with fs.open(path, "rb") as raw:
    # Progress is measured on the raw file, so it is right for compressed files too.
    f = gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw
    document = []
    try:
      for line_number, line_bytes in enumerate(f, start=1):
        line = _decode_line(line_bytes, invalid_utf8, stats, f"{path}:{line_number}")
        if line is None:
          continue
        if line_number == 1:
          line = line.lstrip("\ufeff")  # a UTF-8 byte order mark is not text
        line = line.strip()
        if not line:
          if document:
            stats.documents += 1
            yield document
            document = []
          continue
        document.append(line)
        stats.lines += 1
        if line_number % 4096 == 0:
          stats.bytes_read = bytes_before + raw.tell()
    except (OSError, EOFError) as e:  # e.g. a truncated or corrupt .gz file
      raise DataError(f"Could not read {path}: {e}. Check (or re-download) the file.") from e
    if document:
      stats.documents += 1
      yield document
  if stats.lines == lines_before:
    skipped = stats.skipped_lines - skipped_before
    why = (f"all its {skipped} lines were skipped as invalid UTF-8" if skipped
           else "it has no text lines")
    raise DataError(f"Text file {path} is empty ({why}). Remove it from the source or fill it "
                    "with text: one sentence or paragraph per line, a blank line between "
                    "documents.")


def _decode_line(line_bytes: bytes, invalid_utf8: str, stats: ReadStats,
                 where: str) -> Optional[str]:
  """The line as text, or None when it is not UTF-8 and invalid_utf8 == "skip"."""
  try:
    return line_bytes.decode("utf-8")
  except UnicodeDecodeError as e:
    if invalid_utf8 == "error":
      raise DataError(
          f"{where}: not valid UTF-8 ({e.reason} at byte {e.start}: {line_bytes[:60]!r}). "
          "Fix or re-encode the file (e.g. `iconv -f latin1 -t utf-8`), or set "
          "--config.data.invalid_utf8=skip to skip such lines.") from None
    stats.skipped_lines += 1
    if len(stats.first_skipped) < 5:
      stats.first_skipped.append(where)
    return None


# ----------------------------------------------------------------------------------------------
# The embedded default.


def _topic_paragraphs(text: str) -> Document:
  """A pydoc topic as paragraphs: blank lines separate them, hard-wrapped lines are joined."""
  paragraphs = []
  for block in re.split(r"\n\s*\n", text):
    lines = [l for l in block.splitlines() if l.strip() and not _UNDERLINE_RE.match(l)]
    # Table rows ("| '<' | Forces the field to be left-aligned |"): the bars are not text.
    lines = [l.replace("|", " ") if l.lstrip().startswith("|") else l for l in lines]
    paragraph = " ".join(" ".join(lines).split())
    if paragraph:
      paragraphs.append(paragraph)
  return paragraphs


def default_documents() -> list[Document]:
  """The embedded default corpus: each pydoc topic (sorted by name) as one document."""
  documents = [_topic_paragraphs(topics.topics[name]) for name in sorted(topics.topics)]
  return [d for d in documents if d]


def _default_documents(stats: ReadStats) -> Iterator[Document]:
  documents = default_documents()
  stats.total_documents = len(documents)
  for document in documents:
    stats.documents += 1
    stats.lines += len(document)
    yield document


# ----------------------------------------------------------------------------------------------
# TFDS.


def _parse_tfds_source(source: str) -> tuple[str, str]:
  rest = source[len("tfds:"):]
  name, _, split = rest.partition(":")
  if not name:
    raise DataError(f"Source {source!r} names no dataset; use tfds:NAME[:SPLIT], e.g. tfds:lm1b.")
  return name, split or "train"


def _tfds_documents(name: str, split: str, invalid_utf8: str, stats: ReadStats,
                    data_dir: Optional[str], manual_dir: Optional[str]) -> Iterator[Document]:
  """Documents of a TFDS text dataset: each example's text feature, split into lines."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy: tensorflow_datasets)
  if name.split("/")[0].split(":")[0] == OPENWEBTEXT_NAME:
    openwebtext_builder_class()  # registers the builder with TFDS
  builder = tfds_fetch.builder(name, data_dir)
  tfds_fetch.prepare(builder, name, "Or give --config.data.source a local or gs:// text file.",
                     tfds.download.DownloadConfig(manual_dir=manual_dir))
  text_key = _text_feature(builder.info.features, name)
  try:
    stats.total_documents = builder.info.splits[split].num_examples
  except (KeyError, ValueError):
    stats.total_documents = 0
  group_size = _SENTENCES_PER_PSEUDO_DOCUMENT.get(name.split("/")[0], 1)
  stats.total_documents //= group_size
  dataset = builder.as_dataset(split=split, shuffle_files=False)
  document = []
  for index, example in enumerate(tfds.as_numpy(dataset)):
    raw_text = example[text_key]
    for line_number, line_bytes in enumerate(raw_text.split(b"\n"), start=1):
      line = _decode_line(line_bytes, invalid_utf8, stats,
                          f"tfds:{name}:{split} example {index} line {line_number}")
      line = (line or "").strip()
      if line:
        document.append(line)
        stats.lines += 1
    if document and (index + 1) % group_size == 0:
      stats.documents += 1
      yield document
      document = []
  if document:
    stats.documents += 1
    yield document


def _text_feature(features, name: str) -> str:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy: tensorflow_datasets)
  if "text" in features:
    return "text"
  for key, feature in features.items():
    if isinstance(feature, tfds.features.Text):
      return key
  raise DataError(f"TFDS dataset {name!r} has no text feature (features: {list(features)}).")


# ----------------------------------------------------------------------------------------------
# OpenWebText from its official archive.

OPENWEBTEXT_NAME = "openwebtext"
OPENWEBTEXT_ARCHIVE = "openwebtext.tar.xz"
OPENWEBTEXT_INSTRUCTIONS = f"""\
Download the OpenWebText corpus (Gokaslan & Cohen, 2019) from
https://skylion007.github.io/OpenWebTextCorpus/ : the file {OPENWEBTEXT_ARCHIVE} (12 GB). It holds
openwebtext/urlsf_subset*.xz archives, each a tar.xz of web pages as .txt files. Put
{OPENWEBTEXT_ARCHIVE} (not unpacked) in the manual download folder: TFDS_DATA_DIR/downloads/manual/
(by default ~/tensorflow_datasets/downloads/manual/), or pass --tfds_manual_dir=FOLDER to
script_jax.data.prepare.
"""


def iter_openwebtext_archive(archive_path: str) -> Iterator[tuple[str, bytes]]:
  """(key, text bytes) of every .txt page in openwebtext.tar.xz, streamed, in archive order."""
  # Streaming modes ("r|xz") read each nested archive once, front to back, without unpacking
  # 40 GB to disk or seeking in xz streams (which would decompress them again and again).
  with tarfile.open(archive_path, mode="r|xz") as outer:
    for subset in outer:
      if not (subset.isfile() and subset.name.endswith(".xz")):
        continue
      with tarfile.open(fileobj=outer.extractfile(subset), mode="r|xz") as inner:
        for page in inner:
          if page.isfile() and page.name.endswith(".txt"):
            text = inner.extractfile(page).read()
            # As the Hugging Face loader does: collapse runs of blank lines.
            yield f"{subset.name}/{page.name}", re.sub(rb"\n\n\n+", b"\n\n", text.strip())


@functools.cache
def openwebtext_builder_class():
  """The TFDS builder of OpenWebText, defined (and registered with TFDS) on first use.

  Defined lazily, not at the top of the module, so that importing this module does not import
  TensorFlow (see the module docstring). `corpus.OpenWebText` returns the same class.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy: tensorflow_datasets)

  class OpenWebText(tfds.core.GeneratorBasedBuilder):
    """OpenWebText (Gokaslan & Cohen, 2019) built from the official openwebtext.tar.xz."""
    name = OPENWEBTEXT_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "From openwebtext.tar.xz, one example per web page."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = OPENWEBTEXT_INSTRUCTIONS
    # Where TFDS looks for a checksums.tsv of downloads; a manual download has none. Setting it
    # also spares TFDS's lookup of the code's path, which needs the package importlib_resources.
    code_path = None

    def _info(self):
      return self.dataset_info_from_configs(
          description="OpenWebText: an open reproduction of OpenAI's WebText corpus.",
          features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
          homepage="https://skylion007.github.io/OpenWebTextCorpus/",
          citation="@misc{Gokaslan2019OpenWeb, title={OpenWebText Corpus}, author={Aaron "
                   "Gokaslan and Vanya Cohen}, year={2019}}")

    def _split_generators(self, dl_manager):
      archive_path = fs.join(dl_manager.manual_dir, OPENWEBTEXT_ARCHIVE)
      if not fs.isfile(archive_path):
        raise DataError(f"{archive_path} does not exist.\n{OPENWEBTEXT_INSTRUCTIONS}")
      return {"train": self._generate_examples(archive_path)}

    def _generate_examples(self, archive_path):
      for key, text in iter_openwebtext_archive(archive_path):
        # Raw bytes: invalid UTF-8 is dealt with when reading (config.data.invalid_utf8).
        yield key, {"text": text}

  return OpenWebText


def __getattr__(name):  # PEP 562: `corpus.OpenWebText` without importing TF up front.
  if name == "OpenWebText":
    return openwebtext_builder_class()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
