"""Print what a run measured: for each tracked property, predicted against realised change.

    python show.py runs/corridor
"""

import json
import sys
from pathlib import Path

import numpy as np

from ntrl.records import read_records

run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/corridor")
records = read_records(run)
names = sorted({k.split("/")[0] for r in records for k in r if k.endswith("/real_delta")})
print(f"{run}: {len(records)} tracked updates")
for name in names:
    pred = np.array([np.mean(r[f"{name}/pred_delta"]) for r in records])
    real = np.array([np.mean(r[f"{name}/real_delta"]) for r in records])
    first, last = np.mean(records[0][f"{name}/value"]), np.mean(records[-1][f"{name}/value"]) + real[-1]
    agree = float(np.mean(np.sign(pred) == np.sign(real)))
    r2 = 1 - np.sum((real - pred) ** 2) / max(np.sum((real - real.mean()) ** 2), 1e-300)
    print(f"  {name:24s} {first:8.4f} -> {last:8.4f}   Price's prediction: R² = {r2:.4f}, same sign in {agree:.0%} of updates")
summary = json.loads((run / "summary.json").read_text())
print(f"  status: {summary['status']}; W&B: {summary.get('wandb_dir')}")
