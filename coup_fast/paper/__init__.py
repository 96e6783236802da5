"""Reproductions of the paper's analyses (arXiv 2408.05900, Sec. 4.3, 5.3, 5.4).

- :mod:`.toy`: the 2-Gaussian label-flip study (Sec. 5.3.2, Fig. 3b) and a numerical check
  of Proposition 2 (Eq. 8).
- :mod:`.trajectory`: classifier confidence along the purification path (Sec. 5.3.1, Fig. 2a).
- :mod:`.sweep`: clean and robust accuracy against t* and lam (Sec. 5.4, Fig. 4).
- :mod:`.cli`: ``coup-fast paper {toy,trajectory,sweep}``.

Every analysis runs through the engine's own solver (`coup_fast.purify.solve` / `purify`).
"""

import csv
import json
import os


def write_outputs(result: dict, out_dir: str, name: str, plot) -> dict:
    """NAME.csv (result['rows']), NAME.json (everything), NAME.png (plot(result, path)) under out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"{name}.{k}") for k in ("csv", "json", "png")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(result["rows"][0]))
        writer.writeheader()
        writer.writerows(result["rows"])
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=2)
    plot(result, paths["png"])
    return paths
