"""Statistics of a dump-mode folder (the seed's epoch files), beside the seed's figures in DESIGN.md.

    bertstream-producer --train_corpus /tmp/corpus_4mb.txt --bert_model MODEL --do_lower_case \
        --output_dir /tmp/dump --epochs_to_generate 3 [--do_whole_word_mask]
    python benchmarks/dump_stats.py /tmp/dump

Prints one line per epoch and a final JSON line; checks each metrics file's count against its lines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SEED_FIGURES = {"random_next": 0.55, "mean_length": 118, "mean_masked": 17.6}


def epoch_stats(path: Path) -> dict:
    count = random_next = length = masked = 0
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            count += 1
            random_next += record["is_random_next"]
            length += len(record["tokens"])
            masked += len(record["masked_lm_positions"])
    return {"instances": count, "random_next": random_next, "length": length, "masked": masked}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dump_dir", type=Path)
    args = parser.parse_args()
    totals = {"instances": 0, "random_next": 0, "length": 0, "masked": 0}
    epochs = sorted(args.dump_dir.glob("epoch_*_metrics.json"), key=lambda p: int(p.name.split("_")[1]))
    for metrics_path in epochs:
        epoch = int(metrics_path.name.split("_")[1])
        stats = epoch_stats(args.dump_dir / f"epoch_{epoch}.json")
        announced = json.loads(metrics_path.read_text())["num_training_examples"]
        if announced != stats["instances"]:
            raise SystemExit(f"{metrics_path}: num_training_examples {announced} but {stats['instances']} lines")
        n = stats["instances"]
        print(f"epoch {epoch}: {n} instances, random next {stats['random_next'] / n:.1%}, "
              f"mean length {stats['length'] / n:.1f}, masked {stats['masked'] / n:.2f}")
        for key in totals:
            totals[key] += stats[key]
    n = totals["instances"]
    result = {"epochs": len(epochs), "instances": n, "random_next": round(totals["random_next"] / n, 4),
              "mean_length": round(totals["length"] / n, 2), "mean_masked": round(totals["masked"] / n, 2),
              "seed": SEED_FIGURES}
    print(f"all: {n} instances, random next {result['random_next']:.1%} (seed ~55%), mean length "
          f"{result['mean_length']} (~118), masked {result['mean_masked']} (~17.6)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
