"""The tables of docs/evaluations/digits_strongest/summary.md, from the runs' own files (results.json, samples.csv).

    python docs/evaluations/summarize.py --study RUN [RUN ...] --lee-kim RUN --out summary.md

Per defense, attacker gradient and attack, on the diagnostic images (the first `diag_images`, which every stage of
the cascade attacks, so each row's numbers there are unconditional): Worst-of-R, Avg and MV with 95 % intervals, and
the share of the images standing after the clean column that the attack broke per 1,000 attacker gradients per
image (the plan's count, coup_fast.plan.attack_work).  Per defense, on all images: the worst case over the new
attacks, the lee-kim run's worst case, and both together (per image the minimum over every line of both runs'
samples.csv: exact for Worst-of-R; Avg and MV upper bounds where a cascade skipped an image).
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import os

from coup_fast import stats
from coup_fast.attacks import AttackSettings
from coup_fast.plan import attack_work
from coup_fast.table import CLEAN


def load(run: str):
    with open(os.path.join(run, "results.json")) as f:
        results = json.load(f)
    lines = collections.defaultdict(dict)  # (row, attack) -> {image: correct / runs}
    groups, runs = {}, {}
    with open(os.path.join(run, "samples.csv")) as f:
        for line in csv.DictReader(f):
            lines[(line["defense"], line["attack"])][int(line["image"])] = int(line["correct"]) / int(line["runs"])
            groups[line["defense"]], runs[line["defense"]] = line["group"], int(line["runs"])
    return results, lines, groups, runs


def cell(accs: list, runs: int = 10) -> dict:
    n = len(accs)
    worst, mv = sum(a == 1.0 for a in accs), sum(a > 0.5 for a in accs)
    pct = lambda lo_hi: "[{:.1f}, {:.1f}]".format(100 * lo_hi[0], 100 * lo_hi[1])  # noqa: E731
    return {"n": n, "worst": f"{100 * worst / n:.1f} {pct(stats.wilson_interval(worst, n))}",
            "avg": f"{100 * sum(accs) / n:.1f} {pct(stats.mean_interval(accs, runs))}",
            "mv": f"{100 * mv / n:.1f} {pct(stats.wilson_interval(mv, n))}"}


def per_image_worst(lines: dict, groups: dict, group: str) -> dict:
    out = {}
    for (row, attack), images in lines.items():
        if groups[row] != group:
            continue
        for i, a in images.items():
            out[i] = min(out.get(i, 1.0), a)
    return out


def robust(lines: dict, groups: dict, group: str, attacks: list, image: int) -> bool:
    """Whether `image` stays robust under Worst-of-R against `attacks` over every row of `group` (and clean)."""
    keys = [(row, attack) for row in groups if groups[row] == group for attack in [CLEAN, *attacks]]
    return all(lines.get(key, {}).get(image, 1.0) == 1.0 for key in keys)


def gradients_per_image(attack: str, settings: AttackSettings) -> float:
    """The attacker gradients one image costs under `attack` (a straight-through one counts as one too)."""
    return attack_work(attack, settings, 10).gradients


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", nargs="+", required=True)
    p.add_argument("--lee-kim", required=True)
    p.add_argument("--out")
    a = p.parse_args(argv)
    out = []
    new_worst, lk_worst, together = {}, {}, {}
    _, lee_lines, lee_groups, lee_runs = load(a.lee_kim)
    for run in a.study:
        results, lines, groups, runs = load(run)
        meta = results["meta"]
        n_diag, attacks = meta["diag_images"], results["attacks"]
        settings = AttackSettings(**{k: v for k, v in json.load(open(os.path.join(run, "config.json"))).items()
                                     if k in AttackSettings.__dataclass_fields__})
        out += [f"### {os.path.basename(run.rstrip('/'))}: per attacker gradient, on the {n_diag} diagnostic images "
                f"(every stage attacks them)", "",
                "| defense row | attack | gradients / image | Worst-of-R | Avg | MV | broken per 1k gradients |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for row in results["defenses"]:
            group = groups.get(row, row)
            clean = lines.get((row, CLEAN)) or lines.get((group, CLEAN)) or {}
            standing = [i for i in range(n_diag) if clean.get(i) == 1.0]
            for attack in attacks:
                images = lines.get((row, attack))
                if images is None:
                    continue
                accs = [images[i] for i in range(n_diag)]
                c = cell(accs, runs.get(row, 10))
                grads = gradients_per_image(attack, settings)
                broken = sum(images[i] < 1.0 for i in standing) / max(len(standing), 1)
                out.append(f"| {row} | {attack} | {grads:.0f} | {c['worst']} | {c['avg']} | {c['mv']} | "
                           f"{1000 * broken / grads:.2f} |")
        out.append("")
        diag = range(n_diag)
        out += [f"Worst-of-R on the same {n_diag} images, worst case over each defense's rows, per attack and for all "
                "of them; lee-kim: PGD-EOT 200 x 20 (CE) of the lee-kim run on those images", "",
                "| defense | " + " | ".join(attacks) + " | all of them | lee-kim | lee-kim and all of them |",
                "|---|" + "---:|" * (len(attacks) + 3)]
        for group in dict.fromkeys(groups.values()):
            columns = [[attack] for attack in attacks] + [attacks]
            counts = [sum(robust(lines, groups, group, cols, i) for i in diag) for cols in columns]
            if group in lee_groups.values():
                lee = [robust(lee_lines, lee_groups, group, ["pgd-eot"], i) for i in diag]
                counts += [sum(lee), sum(ok and robust(lines, groups, group, attacks, i) for i, ok in zip(diag, lee))]
            else:
                counts += [None, None]
            pct = [f"{100 * c / n_diag:.1f}" if c is not None else "–" for c in counts]
            out.append(f"| {group} | " + " | ".join(pct) + " |")
        out.append("")
        for group in dict.fromkeys(groups.values()):
            mine = per_image_worst(lines, groups, group)
            new_worst[group] = mine
            if group in set(lee_groups.values()):
                lk = per_image_worst(lee_lines, lee_groups, group)
                lk_worst[group] = lk
                together[group] = {i: min(mine[i], lk.get(i, 1.0)) for i in mine}
    out += ["### The worst case on all images: the new attacks, lee-kim's PGD-EOT 200 x 20 (CE), and both", "",
            "| defense | new attacks: Worst-of-R | lee-kim: Worst-of-R | both: Worst-of-R | both: Avg (upper bound) "
            "| both: MV (upper bound) |", "|---|---:|---:|---:|---:|---:|"]
    for group, mine in new_worst.items():
        r = 1 if group == "none" else 10  # a bare classifier is evaluated once
        accs = [mine[i] for i in sorted(mine)]
        lk = lk_worst.get(group)
        both = together.get(group)
        lk_cell = cell([lk[i] for i in sorted(lk)], r)["worst"] if lk else "–"
        both_cell = cell([both[i] for i in sorted(both)], r) if both else None
        out.append(f"| {group} | {cell(accs, r)['worst']} | {lk_cell} | {both_cell['worst'] if both_cell else '–'} | "
                   f"{both_cell['avg'] if both_cell else '–'} | {both_cell['mv'] if both_cell else '–'} |")
    text = "\n".join(out) + "\n"
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
