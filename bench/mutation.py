"""Mutation testing of the code behind the three promises, with cosmic-ray.

    python bench/mutation.py [--rev HEAD] [--sample 60] [--seed 8] [--timeout 600]

It mutates relay/store/, relay/intake.py, relay/delivery.py, relay/keys.py and
relay/decision.py (when the revision has it) one mutant at a time and runs the
suite against each; a mutant the suite does not notice "survived". The score is
killed / (killed + survived), over a seeded random sample of the mutants: the
whole set runs for many hours on two shared cores, a sample of 60 in well under
one. The same seed picks comparable samples from two revisions.

It works on a snapshot of `--rev` (git archive) in a temporary folder, never in
the checkout: cosmic-ray edits the files it mutates. Needs `pip install cosmic-ray`
and whatever the suite needs. Not part of CI: like the other scripts here, it
prints figures.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCOPE = (
    "relay/store",
    "relay/intake.py",
    "relay/delivery.py",
    "relay/keys.py",
    "relay/decision.py",
)
# Tests of parsing, config and the harness itself cannot kill a mutant in SCOPE; leaving them
# out keeps each surviving mutant's run short.
IGNORED_TESTS = ("tests/test_fingerprint.py", "tests/test_config.py", "tests/test_mta_harness.py")


def snapshot(rev: str, folder: Path) -> None:
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev], cwd=ROOT, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    node = ROOT / "tests" / "node" / "node_modules"
    if node.is_dir():  # nodemailer, installed by .ci/system-deps; not in git
        (folder / "tests" / "node" / "node_modules").symlink_to(node)


def config_text(folder: Path, timeout: float) -> str:
    paths = [p for p in SCOPE if (folder / p).exists()]
    ignore = " ".join(f"--ignore={t}" for t in IGNORED_TESTS)
    command = f"{sys.executable} -m pytest -x -q -p no:randomly -p no:cacheprovider {ignore} tests"
    return "\n".join(
        [
            "[cosmic-ray]",
            f"module-path = {paths!r}".replace("'", '"'),
            f"timeout = {timeout}",
            "excluded-modules = []",
            f'test-command = "{command}"',
            "",
            "[cosmic-ray.distributor]",
            'name = "local"',
            "",
        ]
    )


def annotation_spans(path: Path) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Where the type annotations are: under `from __future__ import annotations` they are
    never evaluated, so a mutant inside one is equivalent and no test can kill it."""
    spans = []
    for node in ast.walk(ast.parse(path.read_text())):
        found: list[ast.expr | None] = []
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            found.append(node.returns)
            found += [x.annotation for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
            found += [x.annotation for x in (a.vararg, a.kwarg) if x is not None]
        elif isinstance(node, ast.AnnAssign):
            found.append(node.annotation)
        for n in found:
            if n is not None and n.end_lineno is not None and n.end_col_offset is not None:
                spans.append(((n.lineno, n.col_offset), (n.end_lineno, n.end_col_offset)))
    return spans


def in_annotation(root: Path, mutation: object, cache: dict[str, list[Any]]) -> bool:
    name = str(mutation.module_path)  # type: ignore[attr-defined]
    if name not in cache:
        cache[name] = annotation_spans(root / name)
    at = tuple(mutation.start_pos)  # type: ignore[attr-defined]
    return any(start <= at < end for start, end in cache[name])


def keep_sample(session: Path, size: int, seed: int) -> tuple[int, int]:
    """Mark all but a seeded sample as skipped; returns (sampled, total).

    Mutants inside annotations are left out before sampling (see annotation_spans)."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    with use_db(str(session), WorkDB.Mode.open) as db:
        items = sorted(db.work_items, key=lambda w: w.job_id)
        spans: dict[str, list[Any]] = {}
        keys = sorted(
            (w for w in items if not in_annotation(session.parent, w.mutations[0], spans)),
            key=lambda w: (
                str(w.mutations[0].module_path),
                w.mutations[0].operator_name,
                w.mutations[0].start_pos,
                w.mutations[0].occurrence,
            ),
        )
        chosen = set(random.Random(seed).sample(range(len(keys)), min(size, len(keys))))
        kept = {w.job_id for i, w in enumerate(keys) if i in chosen}
        skipped = [w.job_id for w in items if w.job_id not in kept]
        db.set_multiple_results(skipped, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))
        return len(items) - len(skipped), len(items)


def report(session: Path) -> int:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    outcomes: Counter[str] = Counter()
    per_file: dict[str, Counter[str]] = {}
    survivors: list[str] = []
    spans: dict[str, list[Any]] = {}
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome is WorkerOutcome.SKIPPED:
                continue
            mutation = item.mutations[0]
            name = str(mutation.module_path)
            if in_annotation(session.parent, mutation, spans):
                outcomes["in an annotation (equivalent)"] += 1
                continue
            outcome = (result.test_outcome or result.worker_outcome).value
            outcomes[outcome] += 1
            per_file.setdefault(name, Counter())[outcome] += 1
            if result.test_outcome is TestOutcome.SURVIVED:
                line = mutation.start_pos[0]
                changed = [
                    d[1:].strip()
                    for d in (result.diff or "").splitlines()
                    if d.startswith("+") and not d.startswith("+++")
                ]
                survivors.append(
                    f"  {name}:{line}  {mutation.operator_name}  -> {' / '.join(changed)[:90]}"
                )
    killed, survived = outcomes["killed"], outcomes["survived"]
    tested = killed + survived
    print(f"mutants tested {tested}: killed {killed}, survived {survived}", end="")
    print(f", incompetent {outcomes['incompetent']}", end="")
    print(f"; left out, in an annotation: {outcomes['in an annotation (equivalent)']}")
    if tested:
        print(f"mutation score {killed / tested:.1%}")
    for name, counts in sorted(per_file.items()):
        killed_here, survived_here = counts["killed"], counts["survived"]
        print(f"  {name}: {killed_here} killed, {survived_here} survived")
    if survivors:
        print("survivors:")
        print("\n".join(sorted(survivors)))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default="HEAD", help="git revision to mutate (default HEAD)")
    parser.add_argument("--sample", type=int, default=60, help="mutants to run (0: all)")
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant's run")
    parser.add_argument("--keep", metavar="DIR", help="work here and keep it (default: temp)")
    parser.add_argument("--report", metavar="DIR", help="only print the report of a kept run")
    args = parser.parse_args()
    if args.report:
        return report(Path(args.report) / "session.sqlite")
    folder = Path(args.keep or tempfile.mkdtemp(prefix="mutation-"))
    folder.mkdir(parents=True, exist_ok=True)
    snapshot(args.rev, folder)
    (folder / "cosmic-ray.toml").write_text(config_text(folder, args.timeout))
    session = folder / "session.sqlite"
    env = dict(os.environ, PYTHONPATH=str(folder))
    cosmic = [sys.executable, "-m", "cosmic_ray.cli"]
    subprocess.run(
        [*cosmic, "init", "cosmic-ray.toml", session.name], cwd=folder, env=env, check=True
    )
    if args.sample:
        sampled, total = keep_sample(session, args.sample, args.seed)
    else:
        from cosmic_ray.work_db import WorkDB, use_db

        with use_db(str(session), WorkDB.Mode.open) as db:
            sampled = total = db.num_work_items
    print(f"{args.rev} in {folder}: {total} mutants, running {sampled} (seed {args.seed})")
    began = time.monotonic()
    subprocess.run(
        [*cosmic, "exec", "cosmic-ray.toml", session.name], cwd=folder, env=env, check=True
    )
    print(f"ran in {time.monotonic() - began:.0f}s")
    return report(session)


if __name__ == "__main__":
    sys.exit(main())
