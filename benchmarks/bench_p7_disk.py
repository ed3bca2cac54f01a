"""P7: bytes written to disk per streamed epoch, against the seed's way (an epoch written as JSON first).

- streamed: a real `python -m producer --epochs 1 --connect` streams one epoch of the 40 MB corpus (index warm)
  into a PULL socket in this process, which decodes every message to the trainer's tensors. The producer's
  output goes to a pipe, not a file. Counted: `write_bytes` (bytes the processes caused to be written to
  storage, from /proc/PID/io) of the producer and every process it started, as the kernel adds a reaped
  child's I/O to its parent's: this process's own counters, before and after (it writes nothing itself).
  The trainer is not part of the count: what it writes (metrics.jsonl, checkpoints, the final model) it
  would write with the seed's data too.
- the seed's way: `pregenerate_training_data.py` writes `epoch_0.json` before training can start; the same
  file, in the seed's format, written by `python -m producer --output_dir` (its size is what the seed
  writes; write_bytes shows ours, which writes each worker's part and then joins them).

    .venv/bin/python benchmarks/bench_p7_disk.py        # ~1 min

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import support  # noqa: E402


def own_io() -> dict[str, int]:
    return support.proc_io(__import__("os").getpid())


def written(before: dict, after: dict) -> int:
    return (after["write_bytes"] - before["write_bytes"]) - (after["cancelled_write_bytes"]
                                                             - before["cancelled_write_bytes"])


def streamed_epoch(args) -> dict:
    import zmq

    from common.wire import decode
    from trainer.source import to_tensors

    endpoint = support.free_endpoint()
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.bind(endpoint)
    command = support.producer_command(args.corpus, support.minilm_dir(), args.cache_dir, endpoint, "--epochs", "1")
    before = own_io()
    producer = subprocess.Popen(command, cwd=support.REPO, env=support.ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.append(producer.stdout.read()), daemon=True)
    reader.start()
    instances, start = 0, time.monotonic()
    try:
        while producer.poll() is None or pull.poll(0):
            if pull.poll(200):
                message = decode(pull.recv(copy=False).buffer)
                to_tensors(message.batch, pin_memory=False)
                instances += message.batch.size
    finally:
        code = support.stop(producer)
        reader.join()
        pull.close(linger=0)
        context.term()
    after = own_io()
    if code != 0:
        raise SystemExit(f"producer exited {code}:\n{b''.join(output).decode(errors='replace')[-2000:]}")
    return {"bytes_written": written(before, after), "instances": instances, "seconds": time.monotonic() - start,
            "wchar": after["wchar"] - before["wchar"]}


def seed_epoch(args, out: Path) -> dict:
    command = [sys.executable, "-m", "producer", "--train_corpus", args.corpus, "--bert_model",
               str(support.minilm_dir()), "--do_lower_case", "--cache_dir", args.cache_dir, "--output_dir", str(out),
               "--epochs_to_generate", "1"]
    before = own_io()
    start = time.monotonic()
    subprocess.run(command, cwd=support.REPO, env=support.ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    seconds = time.monotonic() - start
    after = own_io()
    size = (out / "epoch_0.json").stat().st_size
    with open(out / "epoch_0.json", "rb") as f:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    return {"file_bytes": size, "instances": lines, "bytes_written": written(before, after), "seconds": seconds}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=support.CORPUS_40MB)
    parser.add_argument("--cache_dir", default=str(Path(tempfile.gettempdir()) / "bertstream-bench-cache"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not own_io():
        raise SystemExit("/proc/self/io is not readable here: cannot count bytes written")

    support.ensure_corpus(args.corpus, 40)
    support.build_index(args.corpus, support.minilm_dir(), args.cache_dir)  # warm
    streams = []
    for repeat in range(args.repeats):
        streams.append(streamed_epoch(args))
        support.log(f"P7 repeat {repeat + 1}/{args.repeats}: streamed epoch of {streams[-1]['instances']} instances "
                    f"wrote {streams[-1]['bytes_written']} bytes")
    with tempfile.TemporaryDirectory(prefix="bench_p7-", dir=args.cache_dir) as tmp:
        seed = seed_epoch(args, Path(tmp))
    support.log(f"P7 the seed's way: epoch_0.json {seed['file_bytes'] / 1e6:.1f} MB ({seed['instances']} instances)")
    ours = max(s["bytes_written"] for s in streams)
    rows = [("seed's way: epoch_0.json before training", f"{seed['file_bytes']:,}", seed["instances"]),
            ("(our --output_dir writing it: bytes written)", f"{seed['bytes_written']:,}", seed["instances"]),
            ("streamed epoch (producer and its workers)", f"{ours:,}", streams[0]["instances"])]
    print(f"P7: bytes written to disk per epoch of {args.corpus}, index warm; the largest of {args.repeats} streamed "
          "epochs")
    result = {"target": "0", "metric": "bytes written to disk per streamed epoch", "baseline": seed["file_bytes"],
              "ours": ours, "ratio": None, "met": ours == 0, "streams": streams, "seed": seed, "corpus": args.corpus}
    support.report("P7", rows, ("", "bytes", "instances"), result)
    return result


if __name__ == "__main__":
    main()
