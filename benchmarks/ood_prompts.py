"""Out-of-domain prompts for the retrieval benchmark: code-completion cuts (training/prompt_suite.py's rule: a
file prefix at a line boundary) from the Python sources of installed packages the models never saw (numpy,
scipy, torch), `per_package` files each, chosen by a hash of the path. Deterministic for the same installs.

    python -m benchmarks.ood_prompts            # writes benchmarks/ood_prompts.jsonl
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
from pathlib import Path

from training.prompt_suite import _code_completion

OUT = Path(__file__).resolve().parent / "ood_prompts.jsonl"
MAX_CHARS = 1600  # ~450 tokens: prompt + 128 new tokens stay far from the 1024-token context


def package_dir(name: str) -> Path:
    return Path(importlib.util.find_spec(name).origin).parent


def build(packages=("numpy", "scipy", "torch"), per_package: int = 12) -> list[dict]:
    rows = []
    for pkg in packages:
        root = package_dir(pkg)
        files = sorted((p for p in root.rglob("*.py") if "tests" not in p.parts and p.stat().st_size > 4000),
                       key=lambda p: hashlib.sha256(str(p.relative_to(root)).encode()).hexdigest())
        taken = 0
        for f in files:
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            cuts = _code_completion(str(f), text)
            if not cuts:
                continue
            prefix = cuts[-1][0][-MAX_CHARS:]
            prefix = prefix[prefix.index("\n") + 1:]
            rows.append({"question_id": len(rows), "category": pkg, "source": f"{pkg}/{f.relative_to(root)}",
                         "turns": [prefix]})
            taken += 1
            if taken == per_package:
                break
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-package", type=int, default=12)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    rows = build(per_package=args.per_package)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} prompts -> {args.out}")


if __name__ == "__main__":
    main()
