"""README states what the code writes: samples.csv's header and the default --out (issue 26, item 16)."""
import re
from pathlib import Path

import torch

from coup_fast.cli import EvalConfig
from coup_fast.evaluate import Table, Verdicts

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_gives_samples_csv_header_as_written():
    table = Table(["coup"], [], ["Linf"], {"Linf": 0.1}, labels=[3],
                  samples={("coup", "clean", "Linf"): Verdicts(torch.ones(2, 1, dtype=torch.bool), ["clean"])})
    header = table.samples_csv().splitlines()[0]
    documented = re.search(r"`OUT/samples\.csv`, with the header\s+`([^`]+)`", README)
    assert documented is not None, "README no longer documents samples.csv's header"
    assert documented.group(1) == header


def test_readme_documents_the_default_out():
    assert f"by default `./{EvalConfig().out}`" in README
