"""The table scripts/gpu_check.sh prints: one row per check (ok, FAILED with its line, skipped, timed out,
not run, cut by the budget) and one per benchmark case (tokens/s, MFU, peak memory), read from the folder
the script filled.

    python -m scripts.gpu_check_report OUT_DIR                 # after a run on a GPU
    python -m scripts.gpu_check_report OUT_DIR --skip REASON   # no GPU: every GPU step reads skipped

The folder holds, per step ID, ID.log (its output) and ID.rc ("<exit code> <seconds> <limit> <its own
timeout>", or "not-run 0 <limit>" when the run's time was spent). A step killed by its timeout (exit 124 or
137), or output that is not what it should be, is a row of the table, never a crash of the report; killed
at a limit below its own timeout (the time the run had left), it is cut by the budget, not failed. Exit
status: 1 if any check failed or timed out, else 0 (skipped, not-run and cut rows are not failures).
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path too: this checkout's packages first

from utils.errors import ArgumentParser, UserError, require_stdout, run_cli

# (step id, what it measures), in the order gpu_check.sh runs them
BENCHMARKS = [("bench_default", "default 32x512, bf16"), ("bench_default_compiled", "default 32x512, bf16, compiled"),
              ("bench_gpt2", "GPT-2 small 16x1024, bf16"), ("bench_gpt2_compiled", "GPT-2 small 16x1024, bf16, compiled")]
TIMED_OUT = ("124", "137")  # timeout(1)'s exit code, and SIGKILL's after --kill-after
CUT = "cut by the budget"  # killed when the whole run's time ran out, before its own timeout
PYTEST_LINE = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")


@dataclass
class Step:
    code: str  # the exit code, "not-run", or "missing" when the step left no record
    seconds: int
    limit: int  # the timeout it ran under: its own, or less when the run had less time left
    log: str
    asked: int = 0  # its own timeout (0: as limit)

    @property
    def timed_out(self) -> bool:
        return self.code in TIMED_OUT

    @property
    def cut(self) -> bool:
        """Killed at the run's deadline before its own timeout: out of time, not failed."""
        return self.timed_out and self.limit < self.asked


def read_step(out: Path, step_id: str) -> Step:
    try:
        code, seconds, limit, *asked = (out / f"{step_id}.rc").read_text().split()
        log = (out / f"{step_id}.log").read_text(errors="replace") if (out / f"{step_id}.log").exists() else ""
        return Step(code, int(seconds), int(limit), log, int(asked[0]) if asked else int(limit))
    except (OSError, ValueError):
        return Step("missing", 0, 0, "")


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


def step_row(name: str, step: Step) -> tuple[str, str, str]:
    """A step that is one check: ok, or why not."""
    if step.code == "0":
        return name, "ok", f"{step.seconds} s"
    if step.code == "not-run":
        return name, "not run", "no time left in the 8-minute budget"
    if step.cut:
        return name, CUT, f"stopped at {step.limit} s of its {step.asked} s: {last_line(step.log)}"
    if step.timed_out:
        return name, "FAILED", f"timed out after {step.limit} s: {last_line(step.log)}"
    return name, "FAILED", f"exit {step.code}: {last_line(step.log)}"


def junit_rows(xml: Path) -> list[tuple[str, str, str]] | None:
    """One row per test from pytest's JUnit XML (exact names, skip reasons and failure messages); None if
    pytest wrote none (it was killed)."""
    try:
        cases = ElementTree.parse(xml).getroot().iter("testcase")
    except (OSError, ElementTree.ParseError):
        return None
    rows = []
    for case in cases:
        outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            rows.append((case.get("name"), "ok", f"{float(case.get('time', 0)):.0f} s"))
        else:
            message = (outcome.get("message") or outcome.text or outcome.tag).strip().splitlines()
            status = "skipped" if outcome.tag == "skipped" else "FAILED"
            rows.append((case.get("name"), status, (message[0] if message else outcome.tag)[:200]))
    return rows


def cuda_test_rows(step: Step, xml: Path) -> list[tuple[str, str, str]]:
    """One row per test; when pytest was killed, the -v lines it printed, and the test it was running
    reads timed out."""
    rows = junit_rows(xml)
    if rows is None:
        rows, running = [], None
        for line in step.log.splitlines():
            match = PYTEST_LINE.match(line)
            if match:
                name = match.group(1).split("::", 1)[1]
                rows.append((name, {"PASSED": "ok", "SKIPPED": "skipped"}.get(match.group(2), "FAILED"), ""))
            elif line.startswith("tests/") and "::" in line:
                running = line.split()[0].split("::", 1)[1]
        if step.cut:
            rows.append((running or "tests/test_cuda.py", CUT,
                         f"stopped at {step.limit} s of the tests' {step.asked} s"))
        elif step.timed_out:
            rows.append((running or "tests/test_cuda.py", "FAILED", f"timed out (the tests' {step.limit} s were spent)"))
    if step.code not in ("0", "5") and not any(status in ("FAILED", CUT) for _, status, _ in rows):
        rows.append(step_row("tests/test_cuda.py", step))  # pytest itself failed (collection, import) or not run
    return rows


def benchmark_result(step: Step) -> dict | None:
    """The benchmark's JSON line (its last line), or None."""
    try:
        result = json.loads(step.log.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return None
    return result if isinstance(result, dict) and "tokens_per_sec" in result else None


def benchmark_rows(out: Path) -> tuple[list[tuple[str, str, str]], list[str]]:
    checks, speed = [], []
    for step_id, case in BENCHMARKS:
        step = read_step(out, step_id)
        result = benchmark_result(step) if step.code == "0" else None
        if step.code == "0" and result is None:
            checks.append((f"benchmark: {case}", "FAILED", f"no result line: {last_line(step.log)}"))
            continue
        if result is None:
            checks.append(step_row(f"benchmark: {case}", step))
            continue
        compiled_ok = "compiled" not in case or result["compile"].startswith("on")
        checks.append((f"benchmark: {case}", "ok" if compiled_ok else "FAILED",
                       f"{step.seconds} s" if compiled_ok else f"compile {result['compile']}"))
        mfu = "n/a" if result.get("mfu") is None else f"{100 * result['mfu']:.1f}%"
        speed.append(f"| {case} | {result['precision']} | {result['compile']} | {result['ms_per_step']} | "
                     f"{result['tokens_per_sec']:,.0f} | {mfu} | {result['peak_memory_mib']:,.0f} |")
    return checks, speed


PLAN = "planner: predicted vs measured peak, default 16x512 bf16"
PLAN_TOLERANCE = 0.15  # the planner's promise (docs/planning.md)


def plan_row(step: Step) -> tuple[str, str, str]:
    """dev/plan_check.py's JSON line: ok when the predicted peak is within the tolerance of the measured."""
    if step.code != "0":
        return step_row(PLAN, step)
    try:
        r = json.loads(step.log.strip().splitlines()[-1])
        ratio, detail = r["ratio"], f"predicted {r['predicted_mib']:,.0f} MiB, measured {r['measured_mib']:,.0f} MiB"
    except (ValueError, KeyError, IndexError, TypeError):
        return PLAN, "FAILED", f"no result line: {last_line(step.log)}"
    return PLAN, "ok" if abs(ratio - 1) <= PLAN_TOLERANCE else "FAILED", f"{detail} (ratio {ratio:.2f})"


def report(out: Path, skip: str | None) -> int:
    """Print the table; 1 if anything failed or timed out."""
    if not out.is_dir():
        raise UserError(f"{out} is not a folder; pass the one scripts/gpu_check.sh wrote its step logs to")
    if skip:
        checks = [("data: data/default/train-00000.bin", "skipped", skip)]
        checks += cuda_test_rows(read_step(out, "tests"), out / "tests.xml")
        checks += [(f"benchmark: {case}", "skipped", skip) for _, case in BENCHMARKS]
        checks.append((PLAN, "skipped", skip))
        speed: list[str] = []
    else:
        checks = [step_row("data: data/default/train-00000.bin", read_step(out, "data"))]
        checks += cuda_test_rows(read_step(out, "tests"), out / "tests.xml")
        bench_checks, speed = benchmark_rows(out)
        checks += bench_checks
        checks.append(plan_row(read_step(out, "plan")))
    print(f"\n## {time.strftime('%Y-%m-%d')} · scripts/gpu_check.sh" + (f" · {skip}" if skip else "") + "\n")
    print("| check | result | detail |\n|---|---|---|")
    for name, status, detail in checks:
        print(f"| {name} | {status} | {detail} |")
    print("\nNot covered on one GPU: NCCL between ranks (the NCCL row is a group of one: NCCL starts and all-reduces "
          "on this GPU alone; DDP's and FSDP's NCCL collectives, their speed and a dead NCCL peer need a GPU per "
          "rank); DDP and FSDP with CUDA tensors ran as 2 processes sharing the GPU over gloo; several nodes.")
    if speed:
        print("\n| case | precision | compile | ms/step | tokens/s | MFU (datasheet peak) | peak memory MiB |")
        print("|---|---|---|---:|---:|---:|---:|")
        print("\n".join(speed))
    failed = [name for name, status, _ in checks if status == "FAILED"]
    cut = [name for name, status, _ in checks if status == CUT]
    verdict = f"FAILED: {', '.join(failed)}" if failed else "nothing ran on a GPU" if skip else \
        f"no check failed; cut by the budget: {', '.join(cut)}" if cut else "every check that ran passed"
    print(f"\ngpu_check: {verdict}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="Print scripts/gpu_check.sh's table from its output folder.")
    parser.add_argument("out", type=Path, help="the folder gpu_check.sh wrote its step logs to")
    parser.add_argument("--skip", default=None, help="no GPU: the reason, shown on every GPU step")

    def body() -> int:
        args = parser.parse_args(argv)
        require_stdout("the table")
        return report(args.out, args.skip)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
