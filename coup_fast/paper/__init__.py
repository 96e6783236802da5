"""Reproductions of the paper's analyses (arXiv 2408.05900, Sec. 4.3, 5.3, 5.4).

- :mod:`.toy`: the 2-Gaussian label-flip study (Sec. 5.3.2, Fig. 3b) and a numerical check
  of Proposition 2 (Eq. 8).
- :mod:`.trajectory`: classifier confidence along the purification path (Sec. 5.3.1, Fig. 2a).
- :mod:`.sweep`: clean and robust accuracy against t* and lam (Sec. 5.4, Fig. 4).
- :mod:`.cli`: ``coup-fast paper {toy,trajectory,sweep}``.

Every analysis runs through the engine's own solver (`coup_fast.purify.solve` / `purify`).
"""
