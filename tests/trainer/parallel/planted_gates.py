"""Many runs of the equivalence gates in ONE process (test_gates_fail.py), sharing each recipe's reference replay.

`python -m tests.trainer.parallel.planted_gates --cache C --out O GATE:CANDIDATE:FAULT ... [--real GATE ...]` runs,
with one `trainer.equivalence.run.Runner`, each named gate on its candidate with the fault of faults.py planted in
the candidate's ranks (`GATE:CANDIDATE:` without a fault: the real code), and writes `O/<GATE>-<FAULT or real>/`:
verdict.json and verdict.md as the gate writes them, table.txt (the printed table), or error.txt when a rank failed.

What is shared is what `nox -s equivalence` shares too: the Runner replays a recipe's reference layout once per
process, in memory, and every gate of that recipe compares with it. Every candidate is a fresh multi-process launch;
nothing is read from an earlier process except the prepared rollout (the Runner's own disk cache). The CLI spends
the same reference replay once per planted fault.
"""

from __future__ import annotations

import argparse
import io
import warnings
from pathlib import Path

from rich.console import Console

from matrix import load_matrix
from trainer.equivalence.run import Runner, run_gate, variant
from trainer.parallel.launcher import RankFailed

FAULTS = Path(__file__).with_name("faults.py")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.trainer.parallel.planted_gates")
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "runs", nargs="+", metavar="GATE:CANDIDATE:FAULT", help="an empty FAULT runs the real code"
    )
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    m = load_matrix()
    runner = Runner(m, Path(args.cache))
    # the real code first: no planted fault has run in this process yet
    for name, candidate, fault in sorted((run.split(":") for run in args.runs), key=lambda run: bool(run[2])):
        gate, index = m.gates[name], int(candidate)
        if fault and variant(m, gate.recipe, gate.candidates[index]).recipe.gpus == 1:
            # a one-process layout runs in this process: the fault would stay planted for every later run
            raise SystemExit(f"{name} candidate {index} is one process: plant {fault} with the CLI instead")
        runner.plant = f"{FAULTS}:{fault}" if fault else None
        out = Path(args.out) / f"{name}-{fault or 'real'}"
        printed = io.StringIO()
        try:
            run_gate(runner, name, gate, out, Console(file=printed, width=200), only=[index])
        except RankFailed as exc:
            out.mkdir(parents=True, exist_ok=True)
            (out / "error.txt").write_text(str(exc))
        (out / "table.txt").write_text(printed.getvalue())
        print(
            f"{name} candidate {index}, {fault or 'real code'}: {printed.getvalue().count('FAIL')} FAIL",
            flush=True,
        )


if __name__ == "__main__":
    main()
