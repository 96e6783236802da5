"""`coup-fast` command line: `eval` (robustness grid, this file) and `paper` (coup_fast.paper.cli).

    coup-fast eval                                  # embedded digits models, small seeded subset
    coup-fast eval --config run.toml --n-images 128 # settings from TOML/YAML, flags override
    coup-fast eval --data cifar10 --cifar-dir D --score-ckpt checkpoint_8.pth --classifier-ckpt wrn.pt
    coup-fast eval ... --dry-run | --pilot 16       # price it first: upper bound, or from measured survival
    torchrun --nproc_per_node=K -m coup_fast.cli eval ...   # chains of batches sharded over ranks

Every setting is a field of `coup_fast.config.EvalConfig` (its presets, protocols and validation live there);
a config file uses the same names (dashes or underscores).  Bad settings fail before any work with a message
naming the flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
import time
from dataclasses import fields

import torch

from . import data, plan
from ._files import atomic_write_text
from .attacks import is_randomized
from .config import (DATASETS, NUM_CLASSES, PRESETS, ConfigError, EvalConfig, check_out, flag,  # noqa: F401
                     read_config_file, validate)
from .engines import EngineChoice, choose_engine
from .evaluate import LM_DEFENSES, SDE_DEFENSES, Defense, build_defense, evaluate, solve_steps
from .lm import index_eps_model
from .models import ddpm, digits, ncsnpp, wideresnet
from .paper.cli import register as register_paper
from .pricing import dry_run, pilot, pilot_batches
from .solver import LM_MODE

# ----------------------------------------------------------------------------------------------- building

def _device(cfg):
    if cfg.device != "auto":
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", _local_cuda_index())
    return torch.device("cpu")


def _local_cuda_index() -> int:
    """This process's GPU: torchrun's LOCAL_RANK (0 without torchrun)."""
    local, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if local >= count:
        raise ConfigError("device", f"torchrun's local rank {local} has no GPU of its own: this node has {count} "
                                    f"CUDA device(s); start at most {count} processes per node "
                                    f"(--nproc_per_node) or pass --device cpu")
    return local


def load_everything(cfg: EvalConfig, device):
    """(score_model, eps_model, classifier, x, y); checkpoint problems become ConfigErrors naming the field.

    score_model: the SDE defenses' score (None when none is evaluated on CIFAR); eps_model: the LM defenses'
    eps-network on the DDPM index (digits: the shipped score model through coup_fast.lm.index_eps_model)."""
    names = cfg.defense_names()
    score_model = eps_model = None
    if cfg.data == "digits":
        try:
            score_model, classifier = digits.load_digits_models(device=device, weights_dir=cfg.weights_dir)
        except Exception as e:
            raise ConfigError("weights_dir", f"cannot load the digits models from {cfg.weights_dir or 'the shipped weights'}: {e}") from None
        eps_model = index_eps_model(score_model)
        try:
            x, y = data.load_digits("test", n=cfg.n_images, seed=cfg.seed)
        except ValueError as e:
            raise ConfigError("n_images", str(e).removeprefix("n_images: ")) from None
    else:
        if names & set(SDE_DEFENSES):
            try:
                score_model = ncsnpp.load_ncsnpp(cfg.score_ckpt, device=device)
            except Exception as e:
                raise ConfigError("score_ckpt", f"cannot load {cfg.score_ckpt!r} as the NCSN++ score model: {e}") from None
        if names & set(LM_DEFENSES):
            try:
                eps_model = ddpm.load_ddpm(cfg.ddpm_ckpt, device=device)
            except Exception as e:
                raise ConfigError("ddpm_ckpt", f"cannot load {cfg.ddpm_ckpt!r} as the DDPM U-Net: {e}") from None
        try:
            classifier = wideresnet.load_wideresnet(cfg.classifier_ckpt, cfg.wrn_depth, cfg.wrn_widen, device=device,
                                         layout=cfg.classifier_layout, num_classes=NUM_CLASSES[cfg.data])
        except Exception as e:
            raise ConfigError("classifier_ckpt", f"cannot load {cfg.classifier_ckpt!r} as a {NUM_CLASSES[cfg.data]}-class "
                                                 f"WideResNet-{cfg.wrn_depth}-{cfg.wrn_widen}: {e}") from None
        try:
            x, y = data.load_cifar(cfg.cifar_dir, "test", n=cfg.n_images, seed=cfg.seed, dataset=cfg.data, subset=cfg.subset)
        except Exception as e:
            raise ConfigError("cifar_dir", str(e)) from None
        if cfg.n_images > x.shape[0]:
            raise ConfigError("n_images", f"the test split has {x.shape[0]} images, got {cfg.n_images}")
        for m in (score_model, eps_model, classifier):
            if m is not None:
                m.to(device).eval().requires_grad_(False)
    x, y = x.to(device), y.to(device)
    check_networks(cfg, score_model, eps_model, classifier, x)
    return score_model, eps_model, classifier, x, y


def _non_finite_weights(model) -> str | None:
    """The first parameter or buffer of `model` holding NaN or Inf, or a batch-norm's negative running variance:
    its name and what is wrong; None when the weights are sound."""
    if not isinstance(model, torch.nn.Module):
        return None
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"{name} holds NaN or Inf"
    for name, m in model.named_modules():
        var = getattr(m, "running_var", None)
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and var is not None and bool((var < 0).any()):
            return f"{name}.running_var is negative (a batch-norm variance; its output would be NaN)"
    return None


def check_networks(cfg: EvalConfig, score_model, eps_model, classifier, x):
    """Every network is sound before any work: finite weights (no NaN/Inf, no negative batch-norm variance) and, for
    one image, finite outputs of the right shape: the score and eps have the image's shape, the logits one entry
    per class.  Without this a NaN classifier reads as class 0 everywhere and evaluates to a plausible accuracy."""
    probe = x[:1]
    with torch.no_grad():
        t_score = torch.full((1,), 0.05, dtype=x.dtype, device=x.device)
        nets = [("classifier", classifier, "classifier_ckpt", lambda m: m(probe), (1, NUM_CLASSES[cfg.data])),
                ("score model", score_model, "score_ckpt", lambda m: m(probe * 2 - 1, t_score), tuple(probe.shape)),
                ("eps-network", eps_model, "ddpm_ckpt",
                 lambda m: m(probe * 2 - 1, torch.full((1,), 100, device=x.device)), tuple(probe.shape))]
        for what, model, name, run, shape in nets:
            if model is None:
                continue
            name = "weights_dir" if cfg.data == "digits" else name  # the digits networks come from --weights-dir
            bad = _non_finite_weights(model)
            if bad is not None:
                raise ConfigError(name, f"the {what}'s weights are not usable: {bad}")
            out = run(model)
            if tuple(out.shape) != shape:
                raise ConfigError(name, f"the {what} gives an output of shape {tuple(out.shape)} for an image of shape "
                                        f"{tuple(probe.shape)}, expected {shape}"
                                  + (f" ({cfg.data} has {NUM_CLASSES[cfg.data]} classes)" if model is classifier else ""))
            if not bool(torch.isfinite(out).all()):
                raise ConfigError(name, f"the {what} gives NaN or Inf for a test image"
                                  + (" (argmax would read NaN logits as class 0)" if model is classifier else ""))


def build_models(cfg: EvalConfig, score_model, classifier, eps_model=None, sde_engine: str | None = None
                 ) -> tuple[dict, dict]:
    """{label: {threat: model}} and the specs they stand for (folded into the resume hash).  sde_engine: the
    engine of the SDE defenses when it is not cfg.engine (`choose_eval_engine`; LM runs eagerly anyway)."""
    t_star = {"Linf": cfg.t_star_linf, "L2": cfg.t_star_l2}
    models, specs = {}, {}
    for spec in cfg.defenses:
        per_threat = {}
        for threat in cfg.threats:
            d = Defense.parse(spec, t_star=t_star[threat], lam=cfg.lam, dt=cfg.dt, gradient=cfg.gradient,
                              diffusion=cfg.diffusion, lm=cfg.lm_config())
            if d.name == "diffpure":  # clamped or not (NVlabs' default); the other defenses clamp as their code does
                d = dataclasses.replace(d, clamp=cfg.diffpure_clamp)
            engine = sde_engine if sde_engine is not None and d.name in SDE_DEFENSES else cfg.engine
            per_threat[threat] = build_defense(d, score_model, classifier, engine=engine, eps_model=eps_model)
            # What each model depends on: the bare classifier on nothing of these, LM not on t*, dt, diffusion;
            # clamp only where set (diffpure), so the other rows keep their resume folders.
            if d.name == "none":
                what = {"name": "none"}
            elif d.name in LM_DEFENSES:
                unused = ("t_star", "dt", "diffusion", "clamp")
                what = {k: v for k, v in dataclasses.asdict(d).items() if k not in unused}
                what["lam"] = d.lam if d.name == "coup-lm" else 0.0
            else:
                what = {k: v for k, v in dataclasses.asdict(d).items() if k != "lm" and (k != "clamp" or v is not None)}
            specs.setdefault(d.label, {})[threat] = what
        models[d.label] = per_threat
    return models, specs


# ----------------------------------------------------------------------------------------------- commands

def _shown(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def default_help(f) -> str:
    """What --help says a field defaults to: its own default, or the data sets' presets (digits first)."""
    if f.name in ("progress", "diagnostics"):  # --no-X flags: their help says what the default does
        return ""
    if f.default is not None:
        return f"default: {_shown(f.default)}"
    per_data = {d: PRESETS[d].get(f.name) for d in DATASETS}
    if all(v is None for v in per_data.values()):
        return "default: unset"
    text = f"default on digits: {_shown(per_data['digits']) if per_data['digits'] is not None else 'unset'}"
    cifar = {d: v for d, v in per_data.items() if d != "digits"}
    if len({repr(v) for v in cifar.values()}) == 1:
        return text + f"; CIFAR: {_shown(per_data['cifar10'])}"
    return text + "".join(f"; {d}: {_shown(v)}" for d, v in cifar.items())


def add_eval_parser(subparsers):
    p = subparsers.add_parser("eval", help="robust accuracy: defenses x attacks x threat models",
                              description="Robust accuracy of COUP and baselines (paper Tables 1-3). "
                                          "Without arguments: embedded digits models on a small seeded subset. "
                                          "Defaults marked 'on digits' / 'CIFAR' come from the data set's preset "
                                          "(--data); a --protocol overrides them, flags override both.")
    p.add_argument("--config", help="TOML or YAML file of settings (field names as below); flags override it "
                                    "(default: unset)")
    for f in fields(EvalConfig):
        help = f.metadata["help"] + (f" ({default_help(f)})" if default_help(f) else "")
        help = help.replace("%", "%%")  # argparse formats help strings
        if f.name in ("progress", "diagnostics"):  # on by default: the flag turns it off
            p.add_argument(f"--no-{f.name}", dest=f.name, action="store_const", const=False, default=None, help=help)
        elif f.type == "bool":
            p.add_argument(flag(f.name), dest=f.name, action="store_const", const=True, default=None, help=help)
        elif f.type == "bool | None":
            p.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            kind = {"int | None": int, "int": int, "float | None": float, "float": float}.get(str(f.type), str)
            p.add_argument(flag(f.name), dest=f.name, type=kind, default=None, help=help)
    p.set_defaults(func=run_eval)
    return p


def config_from_args(args) -> EvalConfig:
    values = read_config_file(args.config) if args.config else {}
    for f in fields(EvalConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    try:
        return EvalConfig(**values)
    except TypeError as e:
        raise ConfigError("config", str(e)) from None


def _init_distributed(device) -> bool:
    """Join torchrun's process group: NCCL when this run computes on a GPU, gloo on the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device if device.index is not None else _local_cuda_index())
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return True
    return False


def choose_eval_engine(cfg: EvalConfig, models: dict, x, y) -> EngineChoice | None:
    """engine 'auto' on a CPU: the engine the SDE defenses should run (engines.choose_engine), from how often the
    run calls each batch shape (the plan's upper-bound counts) and one measured step of an exact gradient; None
    where there is nothing to choose (an explicit --engine, CUDA, no SDE defense)."""
    if cfg.engine != "auto" or x.device.type != "cpu":
        return None
    settings, n_batches = cfg.attack_settings(), -(-x.shape[0] // cfg.batch_size)
    calls = draws = 0.0  # batched calls, and the draws they run (a batched EOT call of K draws costs K rows)
    probe = None
    for label, per_threat in models.items():
        for model in per_threat.values():
            kw = getattr(model, "purify_kwargs", None)
            if kw is None or kw["mode"] == LM_MODE:  # LM's optimizer steps never compile
                continue
            probe = model if probe is None else probe
            randomized = is_randomized(model)
            for attack in ["clean", *cfg.attacks]:
                work = plan.attack_work(attack, settings, cfg.n_eval, randomized, model)
                calls += n_batches * sum(count / samples for (_, samples), count in work.calls)
                draws += n_batches * plan.solver_steps(model) * sum(count for _, count in work.calls)
    if probe is None or not calls:
        return None
    batch = min(cfg.batch_size, x.shape[0]) if cfg.data == "digits" else min(cfg.batch_size, x.shape[0], 2)
    per_row_step = plan.measure_step_seconds(probe, x[:batch], y[:batch], ["exact"], steps=1,
                                             warmup=cfg.data == "digits")["exact"]
    seconds_per_call = per_row_step * min(cfg.batch_size, x.shape[0]) * draws / calls  # the mean call
    return choose_engine(x.device, int(calls), seconds_per_call)


# What an allocator says when a batched call does not fit (CPU, CUDA): --eot-chunk is the lever
_OUT_OF_MEMORY = ("can't allocate memory", "DefaultCPUAllocator", "out of memory", "CUDA out of memory")
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _largest_batched_call(cfg: EvalConfig) -> int:
    """The most samples one batched purify call asks for: EOT draws or R evaluations (before --eot-chunk)."""
    draws = [cfg.n_eval, cfg.diag_draws]
    draws += [cfg.eot] if any(a in ("aa", "aa-rand") for a in cfg.attacks) else []
    draws += [cfg.pgd_eot] if "pgd-eot" in cfg.attacks or cfg.diagnostics else []
    draws += [cfg.bpda_eot] if "bpda-eot" in cfg.attacks else []
    draws += [cfg.apgd_eot] if "apgd-ce" in cfg.attacks else []
    return max(draws)


def _evaluate_kwargs(cfg: EvalConfig, specs: dict) -> dict:
    return dict(attacks=cfg.attacks, threats=cfg.threats, eps={"Linf": cfg.eps_linf, "L2": cfg.eps_l2},
                settings=cfg.attack_settings(), n_eval=cfg.n_eval, batch_size=cfg.batch_size, seed=cfg.seed,
                out_dir=cfg.out, tag={"data": cfg.data}, specs=specs, progress=cfg.progress,
                diagnostics=cfg.diagnostics, diag_images=cfg.diag_images, diag_draws=cfg.diag_draws,
                schedule_name=cfg.schedule)


def run_eval(args) -> int:
    cfg = validate(config_from_args(args))
    check_out(cfg, create=False)  # before any work: a run whose results cannot be saved is not worth starting
    try:
        return _run_eval(cfg)
    except ValueError as e:  # another run holds --out (coup_fast.records.RunLock)
        if str(e).startswith(f"out {cfg.out!r}: another run"):
            raise ConfigError("out", str(e).removeprefix("out ")) from None
        raise
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise ConfigError("out", f"{cfg.out!r}: the disk is full ({e.strerror}: {e.filename}); finished batches "
                                     "are kept: free some space and run the same command to resume") from None
        raise
    except (RuntimeError, MemoryError) as e:
        if isinstance(e, MemoryError) or any(m in str(e) for m in _OUT_OF_MEMORY):
            k = _largest_batched_call(cfg)
            chunk = max(1, min(k, cfg.eot_chunk or k) // 4)
            raise ConfigError("eot_chunk", f"a batched purification ran out of memory ({str(e).splitlines()[0][:160]}); "
                                           f"the largest asks for {k} samples x {cfg.batch_size} images at once"
                                           f"{'' if cfg.eot_chunk is None else f' in chunks of {cfg.eot_chunk}'}: "
                                           f"set --eot-chunk {chunk} (same draws, fewer at a time) or lower "
                                           "--batch-size; finished batches are kept") from None
        raise


def _run_eval(cfg: EvalConfig) -> int:
    device = _device(cfg)
    torch.set_num_threads(cfg.threads)
    started = _init_distributed(device)
    try:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        t0 = time.perf_counter()
        score_model, eps_model, classifier, x, y = load_everything(cfg, device)
        models, specs = build_models(cfg, score_model, classifier, eps_model)
        choice = choose_eval_engine(cfg, models, x, y)
        if rank == 0 and choice is not None and (cfg.progress or cfg.dry_run):
            print(f"coup-fast eval: {choice.reason}" + ("; the dry run prices the eager engine (an upper bound)"
                                                         if cfg.dry_run and choice.compiles else ""), file=sys.stderr)
        if choice is not None and choice.engine != "eager" and not cfg.dry_run:  # engine 'auto' is eager on a CPU
            models, specs = build_models(cfg, score_model, classifier, eps_model, sde_engine=choice.engine)
        if cfg.dry_run:
            if rank == 0:
                print(dry_run(cfg, models, x, y))
            return 0
        check_out(cfg, create=True)
        if rank == 0 and cfg.progress:
            steps = {label: solve_steps(per_threat[t]) for label, per_threat in models.items() for t in cfg.threats}
            what = (f"a pilot on batches {pilot_batches(cfg, x.shape[0])} of " if cfg.pilot else "")
            print(f"coup-fast eval: {what}{cfg.data}, n = {x.shape[0]} images, R = {cfg.n_eval}, {len(models)} defense "
                  f"rows x {1 + len(cfg.attacks)} columns x {len(cfg.threats)} threat(s), schedule {cfg.schedule}; "
                  + ", ".join(f"{label}: {n}" for label, n in steps.items() if n), file=sys.stderr)
        if cfg.pilot:
            report = pilot(cfg, models, x, y, _evaluate_kwargs(cfg, specs))
            if rank == 0:
                print(report)
            return 0
        table = evaluate(models, x, y, **_evaluate_kwargs(cfg, specs))
        if rank == 0:
            wall = time.perf_counter() - t0
            print()
            print(table.to_markdown())
            print(f"\n{cfg.data}: n = {x.shape[0]}, defense rows {len(models)}, attacks {len(cfg.attacks)}, "
                  f"threats {len(cfg.threats)}, R = {cfg.n_eval}, schedule {cfg.schedule}; wall {wall:.0f} s, "
                  f"{table.meta['gradients']:.0f} gradients and {table.meta['purifications']:.0f} purifications planned "
                  f"for the images attacked; results in {os.path.join(cfg.out, 'results.{json,md,csv}')}, per-image "
                  f"verdicts in {os.path.join(cfg.out, 'samples.csv')}")
            for line in table.warnings():
                print(f"warning: gradient-masking check fired: {line}", file=sys.stderr)
            atomic_write_text(os.path.join(cfg.out, "config.json"), json.dumps(dataclasses.asdict(cfg), indent=1))
    finally:
        if started:
            torch.distributed.destroy_process_group()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coup-fast", description="COUP purification: evaluation and paper runs")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    register_paper(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"coup-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"coup-fast {args.command}: interrupted; finished batches are kept, run the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
