"""Copy the benchmark files the project ships from a development data folder into src/probekd/data/builtin.

Run once by a developer (`python scripts/vendor_data.py ../shared/data`); the package never reads the source folder.
Unused fields are dropped (ARC's per-choice retrieval `para`); AQuA keeps its `rationale` (the worked solutions of
the generative track); GSM8K is copied as it is; license notes are kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

DEST = Path(__file__).resolve().parents[1] / "src" / "probekd" / "data" / "builtin"


def _write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def vendor(src: Path) -> None:
    for name, folder in (("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge")):
        for split in ("train", "dev", "test"):
            rows = []
            for r in _read_jsonl(src / "arc" / folder / f"{split}.jsonl"):
                choices = [{"text": c["text"], "label": c["label"]} for c in r["question"]["choices"]]
                rows.append(
                    {
                        "id": r["id"],
                        "question": {"stem": r["question"]["stem"], "choices": choices},
                        "answerKey": r["answerKey"],
                    }
                )
            _write_jsonl(rows, DEST / name / f"{split}.jsonl")
    for split in ("dev", "test"):
        rows = [
            {k: r[k] for k in ("question", "options", "rationale", "correct")}
            for r in _read_jsonl(src / "aqua_rat" / f"{split}.json")
        ]
        _write_jsonl(rows, DEST / "aqua_rat" / f"{split}.jsonl")
    shutil.copy(src / "aqua_rat" / "LICENSE", DEST / "aqua_rat" / "LICENSE")
    (DEST / "gsm8k").mkdir(parents=True, exist_ok=True)
    for name in ("train.jsonl", "test.jsonl", "LICENSE"):
        shutil.copy(src / "gsm8k" / name, DEST / "gsm8k" / name)
    for split in ("dev", "test"):
        out = DEST / "mmlu" / split
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted((src / "mmlu" / split).glob("*.csv")):
            shutil.copy(f, out / f.name)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("src", type=Path, help="the development data folder (with arc/, mmlu/, aqua_rat/, gsm8k/)")
    vendor(ap.parse_args().src)
