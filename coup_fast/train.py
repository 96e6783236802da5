"""Train the embedded digits models (the ones shipped in ``coup_fast/weights/`` were made this way).

    python -m coup_fast.train digits [--out DIR] [--steps N] [--clf-steps M] [--seed S] [--restart]

- Classifier: :class:`~coup_fast.models.digits.DigitsClassifier`, cross-entropy, AdamW,
  on the fixed 1497-image train split of sklearn's digits (``coup_fast.data.load_digits``).
- Score model: :class:`~coup_fast.models.digits.DigitsEpsNet`, denoising score matching
  on the VP-SDE (beta_min = 0.1, beta_max = 20, docs/design.md §1):  x0 = 2u - 1 in [-1, 1],
  x_t = alpha(t) x0 + sigma(t) eps,  loss = mean ||eps_hat(x_t, 999 t) - eps||^2.
  Purification only visits t <= t* (0.1 in the paper), so half of each batch draws
  t ~ U(1e-3, 0.2) and half t ~ U(1e-3, 1).  The saved weights are an EMA of the iterates.

Everything is seeded; about 12 minutes on 2 CPU cores.  Writes ``digits_score.safetensors``,
``digits_classifier.safetensors`` and ``digits.json`` (configs + measured metrics) to ``--out``,
by default ``./coup_fast_weights`` (never the installed package: use them with
``coup-fast eval --weights-dir DIR`` or ``load_digits_models(weights_dir=DIR)``; to replace the
shipped ones, pass ``--out coup_fast/weights`` in a source checkout).  An interrupted run resumes
when the same command is run again (checkpoints in ``OUT/.train_checkpoints``, removed at the end).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from ._files import atomic_write, atomic_write_text, load_state_dict_strict, load_weights_file
from .data import DIGITS_SPLIT, load_digits
from .models.digits import CLASSIFIER_FILE, META_FILE, SCORE_FILE, DigitsClassifier, DigitsEpsNet, _read_meta
from .sde import vp_alpha, vp_sigma

T_EPS = 1e-3
CHECKPOINT_DIR = ".train_checkpoints"  # under --out; removed once the final weights are written
# A folder of the user's, where they ran the command: visible, easy to pass to --weights-dir, and
# never the installed package, whose shipped weights a test run would otherwise overwrite.  (Not
# a cache directory: 12 minutes of training is not something to be cleaned away silently.)
DEFAULT_OUT = "coup_fast_weights"
MAX_THREADS = 1024  # more than any machine's cores; torch.set_num_threads overflows on huge ints


class TrainingCheckpoint:
    """A training loop's whole state every `every` steps, so a killed run resumes where it was.

    The state (the modules, optimizer, schedule, data generator and losses) is restored exactly,
    so a resumed run ends with the same weights, bit for bit, as one that was never interrupted.
    `config` is stored with it; resuming under another config is refused.  path=None: no-op.
    """

    def __init__(self, path: str | None, config: dict, every: int, *, generator, opt, sched, **modules):
        if every < 1:
            raise ValueError(f"checkpoint_every: expected an int >= 1, got {every!r}")
        self.path, self.config, self.every = path, config, every
        self.generator, self.opt, self.sched, self.modules = generator, opt, sched, modules

    def resume(self) -> tuple[int, list]:
        """Restore the saved state if there is one: (first step to run, losses so far).

        A checkpoint that cannot be read, or whose fields do not fit this run (a forged or damaged
        one), is a ValueError saying to rerun with --restart; nothing of it is kept."""
        if self.path is None or not os.path.exists(self.path):
            return 0, []
        try:
            # the checked reader: nothing in the file runs, and its declared sizes are bounded
            state = load_weights_file(self.path)
            if not isinstance(state, dict) or not {"config", "step", "losses", "generator", "opt", "sched",
                                                    *self.modules} <= set(state):
                raise ValueError("not a training checkpoint of coup_fast.train")
        except Exception as e:  # truncated, forged (a refused global), not a checkpoint, ...
            self._refuse(e)
        if state["config"] != self.config:
            raise ValueError(f"{self.path}: a checkpoint of another run ({str(state['config'])[:300]}, now "
                             f"{self.config}); delete it or pass --restart")
        try:
            step, losses = state["step"], state["losses"]
            if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= self.config.get("steps", step):
                raise ValueError(f"step {str(step)[:40]} is not a step of this run")
            if not isinstance(losses, list) or len(losses) != step or not all(type(v) is float for v in losses):
                raise ValueError(f"losses: expected a list of {step} floats")
            self.generator.set_state(state["generator"])
            self.opt.load_state_dict(state["opt"])
            self.sched.load_state_dict(state["sched"])
            for name, module in self.modules.items():
                module.load_state_dict(state[name])
        except Exception as e:  # a forged field: wrong types (TypeError), keys (KeyError), shapes (RuntimeError)
            self._refuse(e)
        return step, list(losses)

    def _refuse(self, error: Exception):
        reason = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
        raise ValueError(f"{self.path}: unreadable training checkpoint ({reason}); rerun with --restart "
                         "to discard it and train from the start") from None

    def maybe_save(self, step: int, last: int, losses: list):
        if self.path is None or (step % self.every and step != last):
            return
        state = {"config": self.config, "step": step, "losses": losses, "generator": self.generator.get_state(),
                 "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                 **{name: module.state_dict() for name, module in self.modules.items()}}
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))


def sample_t(n: int, generator: torch.Generator) -> torch.Tensor:
    """t for training: 50/50 mixture of U(1e-3, 1) and U(1e-3, 0.2), shape (n,)."""
    u = torch.rand(n, generator=generator)
    top = torch.where(torch.rand(n, generator=generator) < 0.5, 1.0, 0.2)
    return T_EPS + u * (top - T_EPS)


def dsm_loss(eps_net, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Denoising loss mean ||eps_net(x_t, 999 t) - eps||^2 per dimension.

    x0 (B, C, H, W) in [-1, 1]; t (B,); eps ~ N(0, I) like x0.  The trivial predictor
    eps_hat = 0 scores 1.0.
    """
    a = vp_alpha(t).view(-1, 1, 1, 1)
    s = vp_sigma(t).view(-1, 1, 1, 1)
    return (eps_net(a * x0 + s * eps, 999.0 * t) - eps).pow(2).mean()


@torch.no_grad()
def eval_dsm(eps_net, x0: torch.Tensor, t_values=(0.01, 0.05, 0.1, 0.5), seed: int = 1234) -> dict:
    """Denoising loss on x0 ([-1, 1]) at fixed t values and on the training t-mixture.

    Seeded, so the numbers are reproducible.  Returns {"t=0.01": ..., "mix": ...}.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for tv in t_values:
        t = torch.full((x0.shape[0],), float(tv))
        out[f"t={tv}"] = dsm_loss(eps_net, x0, t, torch.randn(x0.shape, generator=g)).item()
    t = sample_t(x0.shape[0], g)
    out["mix"] = dsm_loss(eps_net, x0, t, torch.randn(x0.shape, generator=g)).item()
    return out


def train_score(net: DigitsEpsNet, x0: torch.Tensor, steps: int, *, batch: int = 128,
                lr: float = 2e-3, ema_decay: float = 0.999, seed: int = 0,
                progress: bool = True, checkpoint: str | None = None,
                checkpoint_every: int = 100) -> tuple[DigitsEpsNet, list]:
    """DSM training of ``net`` on x0 (N, 1, 8, 8) in [-1, 1].

    Adam with cosine learning-rate decay.  Returns (EMA copy of the net, per-step losses).
    With ``checkpoint`` (a file path) the loop saves its state every ``checkpoint_every``
    steps and resumes from the file when it exists.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / max(steps, 1))))
    ema = copy.deepcopy(net).requires_grad_(False)
    ckpt = TrainingCheckpoint(checkpoint, {"model": "score", "steps": steps, "batch": batch, "lr": lr,
                                           "ema_decay": ema_decay, "seed": seed}, checkpoint_every,
                              generator=g, opt=opt, sched=sched, net=net, ema=ema)
    start, losses = ckpt.resume()
    net.train()
    for i in tqdm(range(start, steps), desc="score", disable=not progress, initial=start, total=steps):
        idx = torch.randint(0, x0.shape[0], (batch,), generator=g)
        xb = x0[idx]
        loss = dsm_loss(net, xb, sample_t(batch, g), torch.randn(xb.shape, generator=g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        # Warm-up the EMA: average from the start instead of trusting early iterates.
        d = min(ema_decay, (1 + i) / (10 + i))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - d)
        losses.append(loss.item())
        ckpt.maybe_save(i + 1, steps, losses)
    net.eval()
    return ema.eval(), losses


def random_shift(u: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to max_shift pixels (zero fill); u (B, C, H, W)."""
    B, C, H, W = u.shape
    p = F.pad(u, (max_shift,) * 4)
    oy = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator)
    ox = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator)
    rows = (oy[:, None] + torch.arange(H))[:, None, :, None].expand(B, C, H, W)
    cols = (ox[:, None] + torch.arange(W))[:, None, None, :].expand(B, C, H, W)
    bi = torch.arange(B)[:, None, None, None]
    ci = torch.arange(C)[None, :, None, None]
    return p[bi, ci, rows, cols]


def train_classifier(clf: DigitsClassifier, u: torch.Tensor, y: torch.Tensor, steps: int, *,
                     batch: int = 128, lr: float = 2e-3, weight_decay: float = 1e-3,
                     shift: bool = True, noise: float = 0.0, seed: int = 0,
                     progress: bool = True, checkpoint: str | None = None,
                     checkpoint_every: int = 100) -> list:
    """Cross-entropy training on u (N, 1, 8, 8) in [0, 1]; returns per-step losses.

    Augmentation: random +-1 pixel shifts (``shift``) and, with ``noise`` > 0, additive
    Gaussian noise of per-image std ~ U(0, noise) (purified images are slightly noisy).
    ``checkpoint``: as in :func:`train_score`.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / max(steps, 1))))
    ckpt = TrainingCheckpoint(checkpoint, {"model": "classifier", "steps": steps, "batch": batch, "lr": lr,
                                           "weight_decay": weight_decay, "shift": shift, "noise": noise,
                                           "seed": seed}, checkpoint_every, generator=g, opt=opt, sched=sched, clf=clf)
    start, losses = ckpt.resume()
    clf.train()
    for i in tqdm(range(start, steps), desc="classifier", disable=not progress, initial=start, total=steps):
        idx = torch.randint(0, u.shape[0], (batch,), generator=g)
        ub = u[idx]
        if shift:
            ub = random_shift(ub, g)
        if noise > 0:
            std = noise * torch.rand(batch, 1, 1, 1, generator=g)
            ub = (ub + std * torch.randn(ub.shape, generator=g)).clamp(0.0, 1.0)
        loss = F.cross_entropy(clf(ub), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        ckpt.maybe_save(i + 1, steps, losses)
    clf.eval()
    return losses


@torch.no_grad()
def accuracy(clf, u: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of clf on u (N, C, H, W) in [0, 1]."""
    return (clf(u).argmax(1) == y).float().mean().item()


CLF_AUG = {"shift": True, "noise": 0.2}


def _kept_metadata(out_dir: str, only: str) -> dict:
    """digits.json of the model that ``only`` keeps, checked: the sections train_digits reads."""
    path = os.path.join(out_dir, META_FILE)
    meta = _read_meta(path)  # a ValueError naming the file for bad JSON or a section of the wrong type
    kept = "score" if only == "classifier" else "classifier"
    if not isinstance(meta.get("training", {}).get(kept), dict) or "metrics" not in meta:
        raise ValueError(f"{path}: --only {only} keeps the {kept} model, but the file has no training.{kept} "
                         "section or no metrics (it is not one coup_fast.train wrote): train both models")
    return meta


def _load_kept(model, name: str, out_dir: str):
    """The weights of the model ``only`` keeps, read and checked like every loader's (a ValueError
    naming the file for a damaged file, other shapes or non-finite weights)."""
    path = os.path.join(out_dir, name)
    load_state_dict_strict(model, load_weights_file(path), path, f"the default {type(model).__name__}")
    return model.eval()


def train_digits(out_dir: str = DEFAULT_OUT, steps: int = 2000, clf_steps: int = 1000,
                 seed: int = 0, only: str | None = None, progress: bool = True,
                 checkpoint_every: int = 100, restart: bool = False) -> dict:
    """Train the digits models, save them under ``out_dir``, return the metadata dict.

    ``out_dir`` defaults to ``./coup_fast_weights``, never the package's shipped ``weights/``.

    ``only="classifier"`` / ``"score"`` retrains one model and reloads the other from
    ``out_dir`` (initialisation order is kept, so a full run gives the same nets).
    Both loops checkpoint to ``out_dir/.train_checkpoints`` every ``checkpoint_every`` steps: rerun
    the same command after an interruption and it resumes (``restart=True`` starts over).
    The final files are written atomically and the checkpoints removed.
    """
    for name, value in (("steps", steps), ("clf_steps", clf_steps), ("checkpoint_every", checkpoint_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:  # 0 steps would save untrained weights
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    try:  # now, not at the first checkpoint minutes in: an --out that is a regular file fails here
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"out_dir (--out) {out_dir!r}: cannot create the output directory ({e.strerror or e})") from None
    if only is not None and not os.path.isfile(os.path.join(out_dir, META_FILE)):
        raise ValueError(f"only={only!r} keeps the other model from out_dir, but {out_dir!r} holds no {META_FILE}: "
                         "train both first")
    ckpt_dir = os.path.join(out_dir, CHECKPOINT_DIR)
    if restart:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    resumable = {"checkpoint_every": checkpoint_every, "progress": progress}

    torch.manual_seed(seed)  # parameter initialisation: classifier first, then score net
    u_tr, y_tr = load_digits("train")
    u_te, y_te = load_digits("test")
    clf, net = DigitsClassifier(), DigitsEpsNet()
    old = {}
    if only is not None:  # the kept model and its record, checked before minutes of training
        old = _kept_metadata(out_dir, only)
        _load_kept(*((net, SCORE_FILE) if only == "classifier" else (clf, CLASSIFIER_FILE)), out_dir)
    timing = {}

    if only in (None, "classifier"):
        t0 = time.time()
        train_classifier(clf, u_tr, y_tr, clf_steps, seed=seed, checkpoint=os.path.join(ckpt_dir, "classifier.pt"),
                         **resumable, **CLF_AUG)
        timing["classifier_seconds"] = round(time.time() - t0, 1)
        clf_train = {"clf_steps": clf_steps, "seed": seed, "batch": 128, "augmentation": CLF_AUG,
                     "torch": torch.__version__}
    else:
        clf_train = old["training"]["classifier"]
        timing["classifier_seconds"] = old["metrics"].get("classifier_seconds")

    if only in (None, "score"):
        t0 = time.time()
        ema, losses = train_score(net, 2 * u_tr - 1, steps, seed=seed + 1,
                                  checkpoint=os.path.join(ckpt_dir, "score.pt"), **resumable)
        timing["score_seconds"] = round(time.time() - t0, 1)
        score_train = {"steps": steps, "seed": seed, "batch": 128, "torch": torch.__version__,
                       "final_batch_loss_avg100": sum(losses[-100:]) / max(len(losses[-100:]), 1)}
    else:
        ema = net
        score_train = old["training"]["score"]
        timing["score_seconds"] = old["metrics"].get("score_seconds")

    metrics = {
        "classifier_train_acc": accuracy(clf, u_tr, y_tr),
        "classifier_test_acc": accuracy(clf, u_te, y_te),
        "score_test_loss": eval_dsm(ema, 2 * u_te - 1),
        "score_train_loss": eval_dsm(ema, 2 * u_tr - 1),
        **timing,
    }
    meta = {
        "dataset": "sklearn.datasets.load_digits, 8x8, values/16 in [0, 1]",
        "split": {**DIGITS_SPLIT, "n_train": len(y_tr)},
        "score_config": net.config,
        "classifier_config": clf.config,
        "sde": {"type": "VP", "beta_min": 0.1, "beta_max": 20.0, "time_label": "999*t",
                "t_sampling": "50/50 U(1e-3,1) and U(1e-3,0.2)", "weights": "EMA 0.999"},
        "training": {"score": score_train, "classifier": clf_train},
        "metrics": metrics,
    }
    os.makedirs(out_dir, exist_ok=True)
    for name, model in ((SCORE_FILE, ema), (CLASSIFIER_FILE, clf)):
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        atomic_write(os.path.join(out_dir, name), lambda tmp: save_file(tensors, tmp))
        os.chmod(os.path.join(out_dir, name), 0o644)  # safetensors writes 0600
    atomic_write_text(os.path.join(out_dir, META_FILE), json.dumps(meta, indent=2))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return meta


def _int_in(lo: int, hi: int | None = None):
    """An argparse type: an integer in [lo, hi]; argparse names the flag in its error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}], got {text!r}" if hi is not None
                                             else f"expected an integer >= {lo}, got {text!r}")
        return value
    return parse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m coup_fast.train", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["digits"], help="which embedded model set to train")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"output directory (default ./{DEFAULT_OUT}; the package's own weights/ is never the default)")
    p.add_argument("--steps", type=_int_in(1), default=2000, help="score-model training steps (default 2000)")
    p.add_argument("--clf-steps", type=_int_in(1), default=1000, help="classifier training steps (default 1000)")
    p.add_argument("--only", choices=["classifier", "score"], default=None,
                   help="retrain one model, keep the other from --out")
    p.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0,
                   help="seed of the initialisation and the batches (default 0)")
    p.add_argument("--checkpoint-every", type=_int_in(1), default=100,
                   help="save the training state every this many steps (rerun the command to resume; default 100)")
    p.add_argument("--restart", action="store_true", help="discard the checkpoints of an interrupted run")
    p.add_argument("--threads", type=_int_in(1, MAX_THREADS), default=None,
                   help="torch CPU threads (default: torch's; 1 is faster on a busy machine)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        meta = train_digits(a.out, steps=a.steps, clf_steps=a.clf_steps, seed=a.seed, only=a.only,
                            checkpoint_every=a.checkpoint_every, restart=a.restart)
    except (ValueError, OSError) as e:  # a corrupt checkpoint, --only without earlier weights in --out, ...
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(json.dumps(meta["metrics"], indent=2))
    out = os.path.abspath(a.out)
    print(f"wrote {os.path.join(out, SCORE_FILE)}, {CLASSIFIER_FILE}, {META_FILE}\n"
          f"use them with:  coup-fast eval --weights-dir {out}\n"
          f"          or:   coup_fast.models.load_digits_models(weights_dir={out!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
