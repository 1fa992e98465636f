"""Official SQuAD 1.1 / 2.0 evaluation from the command line, as the official scripts (plus
--version, read from the data file when omitted):

  python -m script_jax.finetune.squad_eval DATA_FILE PRED_FILE [--na-prob-file F]
      [--na-prob-thresh T] [--out-file F] [--version {1.1,2.0}]

prints {"exact_match": ..., "f1": ...} for 1.1, or the 2.0 dict indented by 2; with --out-file
the JSON goes to that file instead. Files may be local or gs:// (script_jax.fs). Input that is
missing, not JSON, or not shaped like SQuAD ends in `error: ...` on stderr and exit status 2.
The rules, rewritten from the official scripts, are finetune/squad_official.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from script_jax import cli_errors
from script_jax.finetune import squad_official


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line (see the module docstring); returns the exit status."""
  parser = argparse.ArgumentParser(
      prog="python -m script_jax.finetune.squad_eval",
      description="Official SQuAD 1.1 / 2.0 evaluation.")
  parser.add_argument("data_file", metavar="DATA_FILE", help="SQuAD dataset JSON")
  parser.add_argument("pred_file", metavar="PRED_FILE",
                      help="JSON object: question id -> predicted answer text")
  parser.add_argument("--na-prob-file", "-n", help="JSON object: question id -> P(no answer)")
  parser.add_argument("--na-prob-thresh", "-t", type=float, default=1.0,
                      help='predict "" when P(no answer) exceeds this (default 1.0)')
  parser.add_argument("--out-file", "-o", help="write the JSON here instead of printing it")
  parser.add_argument("--version", choices=squad_official.VERSIONS,
                      help="evaluation rules (default: the data file's version)")
  args = parser.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's start-up chatter is not for users
  try:
    version, result = squad_official.run(args.data_file, args.pred_file, args.na_prob_file,
                                         args.na_prob_thresh, args.version)
    if args.out_file:
      squad_official.write_json(args.out_file, result)
  except (squad_official.SquadDataError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # pylint: disable=broad-except
    problem = cli_errors.remote_storage_problem(e)  # TensorFlow's errors on a gs:// path
    if problem is None:
      raise
    print(f"error: {problem}", file=sys.stderr)
    return 2
  if not args.out_file:
    # The official 1.1 script prints one line, the 2.0 script indents by 2.
    print(json.dumps(result) if version == "1.1" else json.dumps(result, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
