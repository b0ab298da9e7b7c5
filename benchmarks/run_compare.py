"""Run `softprompt compare` as a user would (the CLI, a subprocess) and keep its result with the command and machine.

    python benchmarks/run_compare.py configs/compare_rotten_tomatoes.yaml benchmarks/results/compare_rotten_tomatoes.json
    python benchmarks/run_compare.py configs/compare_reuters_r8.yaml benchmarks/results/compare_reuters_r8.json \
        --baselines zero_shot,linear_probe,prompt_tuning,residual,p_tuning,prefix_tuning,p_tuning_v2,lora,fine_tune

Every row of the table (zero-shot, few-shot, linear probe, the five prompt methods, LoRA, full fine-tuning) on the
config's model, task and step budget; each trained row's learning rate chosen on validation. Extra arguments go to
`softprompt compare` (--baselines replaces the rows; --resume continues a stopped run, keeping its finished rows).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from run_demo import PROBE

ROWS = "zero_shot,few_shot,linear_probe,prompt_tuning,residual,p_tuning,prefix_tuning,p_tuning_v2,lora,fine_tune"


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    config, out, extra = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    machine = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                                        check=True).stdout.strip().splitlines()[-1])
    folder = Path("runs") / out.stem
    rows = [] if "--baselines" in extra else ["--baselines", ROWS]
    keep = [] if "--resume" in extra else ["--overwrite"]
    cmd = ["softprompt", "compare", config, *rows, "--out", str(folder), *keep, *extra]
    cli = Path(sys.executable).with_name("softprompt")
    subprocess.run([str(cli), *cmd[1:]], check=True)
    result = json.loads((folder / "compare.json").read_text())
    result.update(command=" ".join(cmd), machine=machine)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
