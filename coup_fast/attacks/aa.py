"""AutoAttack (Croce & Hein, ICML 2020) through pyautoattack, unpatched: the 'standard' version (APGD-CE, APGD-T,
FAB-T, Square) and the 'rand' version (APGD-CE, APGD-DLR with EOT), whose EOT calls are served batched.

Candidates: each version's output, as pyautoattack returns it (the clean image where its single-purification check
found no adversarial example).  'aa' is the COUP paper's protocol: a sample is robust only if it survives both.
"""
from __future__ import annotations

from .apgd import quiet_autoattack_logs, set_apgd_iterations
from .common import AttackSettings, BatchedEOT, eot_model

AA_VERSIONS = {"aa": ("standard", "rand"), "aa-standard": ("standard",), "aa-rand": ("rand",)}


def build_autoattack(model, *, version="rand", norm="Linf", eps=8 / 255, seed=0, settings=AttackSettings(),
                     device=None):
    """pyautoattack's AutoAttack (unpatched) for one version, budgets from settings; the 'rand' version's EOT
    calls are served batched (BatchedEOT)."""
    from pyautoattack import AutoAttack

    quiet_autoattack_logs()
    if version == "rand":
        model = eot_model(model, settings.eot, settings.eot_chunk)
    adversary = AutoAttack(model, norm=norm, eps=eps, version=version, seed=seed, device=device)
    set_apgd_iterations(adversary.apgd, settings.n_iter)
    adversary.apgd.n_restarts = settings.n_restarts
    if version == "rand":
        adversary.apgd.eot_iter = settings.eot
    else:
        set_apgd_iterations(adversary.apgd_targeted, settings.n_iter)
        adversary.apgd_targeted.n_target_classes = settings.n_target_classes
        adversary.fab.n_iter = settings.fab_iter
        adversary.fab.n_target_classes = settings.n_target_classes
        adversary.square.n_queries = settings.square_queries
    return adversary


def autoattack(model, x, y, *, version="rand", norm="Linf", eps=8 / 255, seed=0, settings=AttackSettings()):
    """One AutoAttack version through the unpatched pyautoattack package, budgets from settings."""
    adversary = build_autoattack(model, version=version, norm=norm, eps=eps, seed=seed, settings=settings,
                                 device=x.device)
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=x.shape[0])
    if isinstance(adversary.model, BatchedEOT):
        adversary.model.check_finished()
    return x_adv


def runner(versions: tuple):
    """The registry's entry for the AutoAttack versions `versions`: {version: its output}."""
    def run(model, x, y, *, norm, eps, seed, settings: AttackSettings, draws=None) -> dict:
        # draws unused: AutoAttack's own flow draws by the subsets it forms (coup_fast.schedule)
        return {v: autoattack(model, x, y, version=v, norm=norm, eps=eps, seed=seed, settings=settings)
                for v in versions}
    return run
