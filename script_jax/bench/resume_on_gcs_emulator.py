"""What a resume downloads from gs://, for each data.order: bench.resume_data run through
TensorFlow's own GCS client against a local emulator, counting the bytes it is served.

  python script_jax/bench/resume_on_gcs_emulator.py --config=configs/mini.py --data_dir=PREPARED \
      [--fractions=0.1,0.5,0.9] [--output=resume_gcs.json]

The prepared folder is uploaded to gs://bench/data on gcp-storage-emulator, reached through the
TLS proxy of tests/gcs_tls_proxy.py (a development tool: it needs the test extra). Then, for each
fraction and order, `python -m script_jax.bench.resume_data` runs in its own process (a cold
client) and the proxy counts the response bytes and requests. Bytes are the storage-independent
figure; the seconds are a localhost emulator's, not Google's service.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import gcs_tls_proxy  # pylint: disable=g-import-not-at-top,wrong-import-position

from script_jax import fs  # pylint: disable=g-import-not-at-top,wrong-import-position


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
  result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
  if result.returncode:
    raise SystemExit(f"error: {' '.join(args[:3])} failed:\n{result.stderr[-2000:]}")
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--data_dir", required=True, help="a local prepared folder")
  parser.add_argument("--fractions", default="0.1,0.5,0.9")
  parser.add_argument("--output", default="")
  args = parser.parse_args()
  remote = "gs://bench/data"
  with tempfile.TemporaryDirectory() as tls_dir, gcs_tls_proxy.served_emulator(
      tls_dir, "bench") as (env, proxy):
    env.update(XLA_FLAGS="")
    _run(["-c", "import sys, tensorflow as tf\n"
          "src, dst = sys.argv[1], sys.argv[2]\n"
          "for name in tf.io.gfile.listdir(src):\n"
          "  tf.io.gfile.copy(src + '/' + name, dst + '/' + name, overwrite=True)\n",
          args.data_dir, remote], env)
    rows = []
    for fraction in args.fractions.split(","):
      for order in ("buffer", "windows"):
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
          before, requests = proxy.bytes_served, len(proxy.requests)
          _run(["-m", "script_jax.bench.resume_data", f"--config={args.config}",
                f"--data_dir={remote}", f"--fractions={fraction}", f"--orders={order}",
                f"--output={out.name}"], env)
          row = fs.read_json(out.name)["rows"][0]
        rows.append({"fraction": float(fraction), "start_step": row["start_step"],
                     "order": order, "seconds": row[f"{order}_seconds"],
                     "bytes": proxy.bytes_served - before,
                     "requests": len(proxy.requests) - requests})
        print(f"{float(fraction):.0%} {order:8s} step {row['start_step']:,}: "
              f"{rows[-1]['bytes'] / 2**20:.1f} MiB in {rows[-1]['requests']} requests, "
              f"{rows[-1]['seconds']:.2f} s", flush=True)
  if args.output:
    fs.write_json_atomically(args.output, {"rows": rows, "config": args.config})


if __name__ == "__main__":
  main()
