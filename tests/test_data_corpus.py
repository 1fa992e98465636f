"""Tests of script_jax/data/corpus.py: text files, the embedded default, TFDS and OpenWebText."""

import gzip
import io
import lzma
import tarfile

import pytest

from script_jax.data import corpus
from script_jax.data import tfds_fetch
from script_jax.data.corpus import DataError


def _write(path, text: str, compress: bool = False):
  data = text.encode("utf-8")
  path.write_bytes(gzip.compress(data) if compress else data)
  return path


def test_text_files_blank_lines_separate_documents(tmp_path):
  _write(tmp_path / "a.txt", "First line.\nSecond line.\n\n\nOther doc.\n")
  _write(tmp_path / "b.txt.gz", "\ufeffZipped doc, line 1.\n  line 2 \n", compress=True)
  stats = corpus.ReadStats()
  docs = list(corpus.read_documents(f"{tmp_path}/a.txt,{tmp_path}/b.txt.gz", stats=stats))
  assert docs == [["First line.", "Second line."], ["Other doc."],
                  ["Zipped doc, line 1.", "line 2"]]
  assert (stats.documents, stats.lines, stats.skipped_lines) == (3, 5, 0)
  assert stats.progress() == 1.0


def test_folder_is_read_recursively_in_sorted_order(tmp_path):
  (tmp_path / "sub").mkdir()
  _write(tmp_path / "sub" / "2.txt", "two\n")
  _write(tmp_path / "1.txt", "one\n")
  _write(tmp_path / ".hidden", "never\n")
  assert list(corpus.read_documents(str(tmp_path))) == [["one"], ["two"]]
  assert corpus.describe_source(str(tmp_path)) == str(tmp_path)


def test_missing_file_is_a_clear_error(tmp_path):
  with pytest.raises(DataError, match="does not exist.*--source"):
    corpus.read_documents(str(tmp_path / "nope.txt"))
  with pytest.raises(DataError, match="No file matches"):
    corpus.read_documents(str(tmp_path / "*.txt"))


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file_is_a_clear_error(tmp_path, text):
  path = _write(tmp_path / "empty.txt", text)
  with pytest.raises(DataError, match=f"{path} is empty"):
    list(corpus.read_documents(str(path)))


def test_invalid_utf8_skip_counts_lines(tmp_path):
  path = tmp_path / "bad.txt"
  path.write_bytes(b"good one\nbad \xff\xfe line\ngood two\n\n\xc3\x28\nlast\n")
  stats = corpus.ReadStats()
  docs = list(corpus.read_documents(str(path), "skip", stats))
  assert docs == [["good one", "good two"], ["last"]]
  assert stats.skipped_lines == 2
  assert stats.first_skipped == [f"{path}:2", f"{path}:5"]


def test_invalid_utf8_error_names_file_and_line(tmp_path):
  path = tmp_path / "bad.txt"
  path.write_bytes(b"good\nbad \xff line\n")
  with pytest.raises(DataError, match=rf"{path}:2: not valid UTF-8.*invalid_utf8=skip"):
    list(corpus.read_documents(str(path), "error"))


def test_only_invalid_lines_is_an_empty_file(tmp_path):
  path = tmp_path / "bad.txt"
  path.write_bytes(b"\xff\n\xfe\n")
  with pytest.raises(DataError, match="all its 2 lines were skipped"):
    list(corpus.read_documents(str(path), "skip"))


def test_unknown_invalid_utf8_mode():
  with pytest.raises(DataError, match="invalid_utf8"):
    corpus.read_documents("", "ignore")


def test_embedded_default_is_the_pydoc_topics():
  from pydoc_data import topics
  stats = corpus.ReadStats()
  docs = list(corpus.read_documents("", stats=stats))
  assert len(docs) == len(topics.topics) == stats.documents
  words = sum(len(line.split()) for doc in docs for line in doc)
  assert 55_000 < words < 75_000
  # Paragraphs: wrapped lines joined, heading underlines and table bars gone.
  assert docs[0][0] == 'The "assert" statement'
  assert docs[0][1].startswith("Assert statements are a convenient way to insert debugging "
                               "assertions into a program:")
  assert not any(set(line) <= set("*=-+| ") for doc in docs for line in doc)
  assert corpus.describe_source("") == corpus.DEFAULT_SOURCE_DESCRIPTION


def _tar_xz(members: dict[str, bytes]) -> bytes:
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buffer.getvalue()


def _fake_openwebtext(manual_dir):
  """openwebtext.tar.xz as published: openwebtext/urlsf_subset*.xz, each a tar.xz of .txt."""
  subset0 = _tar_xz({"0001-aaa.txt": b"Page one, paragraph one.\n\n\n\nParagraph two.\n",
                     "0002-bbb.txt": b"Page two.\n"})
  subset1 = _tar_xz({"0003-ccc.txt": b"Page three \xff bad.\nStill page three.\n"})
  manual_dir.mkdir(parents=True)
  (manual_dir / corpus.OPENWEBTEXT_ARCHIVE).write_bytes(_tar_xz({
      "openwebtext/urlsf_subset00-1_data.xz": subset0,
      "openwebtext/urlsf_subset01-1_data.xz": subset1,
  }))
  assert lzma.decompress(subset0)  # the inner archives really are xz


def test_openwebtext_archive_reader(tmp_path):
  _fake_openwebtext(tmp_path / "manual")
  pages = list(corpus.iter_openwebtext_archive(str(tmp_path / "manual" /
                                                   corpus.OPENWEBTEXT_ARCHIVE)))
  assert [key for key, _ in pages] == [
      "openwebtext/urlsf_subset00-1_data.xz/0001-aaa.txt",
      "openwebtext/urlsf_subset00-1_data.xz/0002-bbb.txt",
      "openwebtext/urlsf_subset01-1_data.xz/0003-ccc.txt"]
  assert pages[0][1] == b"Page one, paragraph one.\n\nParagraph two."


def test_openwebtext_tfds_builder_from_manual_download(tmp_path):
  _fake_openwebtext(tmp_path / "manual")
  stats = corpus.ReadStats()
  docs = list(corpus.read_documents("tfds:openwebtext", "skip", stats,
                                    tfds_data_dir=str(tmp_path / "tfds"),
                                    tfds_manual_dir=str(tmp_path / "manual")))
  assert sorted(docs) == [["Page one, paragraph one.", "Paragraph two."], ["Page two."],
                          ["Still page three."]]
  assert stats.skipped_lines == 1 and "tfds:openwebtext:train example" in stats.first_skipped[0]
  assert corpus.OpenWebText.name == "openwebtext"
  assert "openwebtext.tar.xz" in corpus.OpenWebText.MANUAL_DOWNLOAD_INSTRUCTIONS
  assert corpus.describe_source("tfds:openwebtext") == "tfds:openwebtext:train"


def test_openwebtext_without_download_says_what_to_do(tmp_path):
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "unrelated.txt").write_text("x")
  with pytest.raises(Exception, match="skylion007"):
    list(corpus.read_documents("tfds:openwebtext", tfds_data_dir=str(tmp_path / "tfds"),
                               tfds_manual_dir=str(tmp_path / "manual")))


def test_unknown_tfds_dataset(tmp_path):
  with pytest.raises(tfds_fetch.TfdsFetchError, match="no dataset 'no_such_dataset_xyz'"):
    list(corpus.read_documents("tfds:no_such_dataset_xyz", tfds_data_dir=str(tmp_path)))
