"""Word count: the "hello world" of a parameter server.

Every word is a parameter with a string id, kept on the shard that owns it;
each occurrence pushes 1 and the shards add the pushes up (init `const:0`,
update `add`). The worker never pulls: the counts are the final model.

As a script, it counts the words of a file (or of a small built-in text) on
2 workers and 2 shards and prints the most common ones:

    python examples/wordcount.py [FILE] [--top N]

As a worker plugin, one line per record:

    psworker --logic examples.wordcount:WordCount --format lines --input FILE ...
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from psclient import Left, Right, transform
from psworker import ParameterServerClient, WorkerLogic

# Lowercase words; an inner apostrophe stays part of the word ("don't").
WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")

SAMPLE_TEXT = """\
The parameter server keeps the model; the workers keep the data.
A worker reads its records, pulls the parameters it needs, and pushes back what it learned.
The server adds the pushes up, so every worker sees the work of every other worker.
When the input ends, the workers finish, and the model is what the servers hold.
"""


def words(line: str) -> list[str]:
    return WORD.findall(line.lower())


class WordCount(WorkerLogic[str, int, dict[str, int]]):
    """Push 1 per word of each line; output one summary per worker at the end."""

    def __init__(self) -> None:
        self.lines = 0
        self.words = 0

    def on_recv(self, data: str, ps: ParameterServerClient[int, dict[str, int]]) -> None:
        self.lines += 1
        for word in words(data):
            ps.push(word, 1)
            self.words += 1

    def on_pull_recv(self, param_id: Any, param_value: int, ps: ParameterServerClient[int, dict[str, int]]) -> None:
        pass  # word count never pulls

    def on_input_end(self, ps: ParameterServerClient[int, dict[str, int]]) -> None:
        ps.output({"worker": ps.worker_index, "lines": self.lines, "words": self.words})


def count_words(lines: list[str], workers: int = 2, shards: int = 2) -> tuple[dict[str, int], list[Any]]:
    """Run WordCount on an embedded cluster; return the counts and the workers' summaries."""
    counts: dict[str, int] = {}
    summaries: list[Any] = []
    for item in transform(lines, WordCount, "const:0", "add", worker_parallelism=workers, ps_parallelism=shards):
        match item:
            case Left(summary):
                summaries.append(summary)
            case Right((word, count)):
                counts[str(word)] = int(count)
    return counts, summaries


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Count words on 2 workers x 2 shards.")
    parser.add_argument("file", nargs="?", help="a text file (default: a small built-in text)")
    parser.add_argument("--top", type=int, default=10, help="how many words to print")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args(argv)

    text = Path(args.file).read_text(encoding="utf-8") if args.file else SAMPLE_TEXT
    counts, summaries = count_words(text.splitlines(), args.workers, args.shards)
    for summary in sorted(summaries, key=lambda s: s["worker"]):
        print(f"worker {summary['worker']}: {summary['lines']} lines, {summary['words']} words")
    print(f"{len(counts)} distinct words, {sum(counts.values())} in all; top {args.top}:")
    for word, count in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))[: args.top]:
        print(f"{count:8d}  {word}")


if __name__ == "__main__":
    main()
