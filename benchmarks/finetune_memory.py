"""Peak memory of the shipped-model command (``contourcl finetune --refit``), stage by stage.

Usage::

    python benchmarks/finetune_memory.py --data ../shared/data/openkbp/train-pats --spacing 3
    CONTOURCL_OPENKBP=../shared/data/openkbp python benchmarks/finetune_memory.py --spacing 3

``--data`` names the training cases; without it, ``train-pats/`` of the OpenKBP folder that
``CONTOURCL_OPENKBP`` names.

Runs the README's ``oar`` command with its data settings (every training case cached, the inner
split scored through the served path and the moving average compared with the raw weights, then
the refit's cache of every case; flip TTA is not compared: one more scoring pass like these) but
one epoch of a few steps per stage, in a child process, and samples the child's resident set size
(``VmRSS``) every half second. Prints the peak of each stage (stage 1 ends when ``selection.json``
is written): what decides whether the full command fits a machine's memory (before the stages
returned their freed memory, the full 3 mm command peaked at 17.9 GB where this printed 17.1 GB).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from contourcl.data.datasets import openkbp_root
from contourcl.errors import DataNotFoundError
from contourcl.testing import proc_status_kb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="the training cases (default: train-pats/ of $CONTOURCL_OPENKBP)")
    parser.add_argument("--model", default="oar", choices=["oar", "gtv"])
    parser.add_argument("--spacing", type=float, default=3.0)
    parser.add_argument("--max-cases", type=int, help="only this many cases (default: all, as the command)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per stage (default %(default)s)")
    args = parser.parse_args()
    if not Path("/proc/self/status").is_file():
        sys.exit("this benchmark reads /proc (Linux)")
    if args.data is None:
        try:
            args.data = str(openkbp_root(option="--data (the training cases)") / "train-pats")
        except DataNotFoundError as err:
            parser.error(str(err))

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{args.model}.pt"
        command = [sys.executable, "-m", "contourcl.cli", "finetune", "--model", args.model, "--data", args.data,
                   "--val-fraction", "0.12", "--seed", "0", "--encoder", "resnet18", "--width", "32", "--roi", "96",
                   "--epochs", "1", "--steps-per-epoch", str(args.steps), "--batch-size", "16", "--samples-per-volume", "4",
                   "--deep-supervision", "2", "--ema", "0.999", "--spacing", str(args.spacing), "--refit", "--half",
                   "--out", str(out)]
        if args.max_cases:
            command += ["--max-cases", str(args.max_cases)]
        print(" ".join(command[1:]), flush=True)
        with open(Path(tmp) / "log", "w+") as log:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
            peaks, stage, t0 = [0.0, 0.0], 0, time.perf_counter()
            while child.poll() is None:
                rss = proc_status_kb(child.pid, "VmRSS")
                if stage == 0 and (Path(f"{out}.state") / "selection.json").is_file():
                    stage = 1
                if rss is not None:
                    peaks[stage] = max(peaks[stage], rss / 1e6)
                time.sleep(0.5)
            seconds = time.perf_counter() - t0
            log.seek(0)
            text = log.read()
        if child.returncode != 0:
            sys.exit(f"the command failed ({child.returncode}):\n{text[-3000:]}")
    print(f"{args.model} at {args.spacing:g} mm, {seconds:.0f} s")
    print("| stage | peak RSS |")
    print("| --- | --- |")
    print(f"| 1: select (cache of the training cases, inner split scored) | {peaks[0]:.2f} GB |")
    print(f"| 2: refit (cache of every case) | {peaks[1]:.2f} GB |")


if __name__ == "__main__":
    main()
