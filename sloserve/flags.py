"""Command-line flags built from the config dataclasses (sloserve/config.py), so every
command (`serve`, `generate`, `profile`, `sim`) offers the same flags with the same defaults,
and a policy's own knobs come from the policy (its `cli_options`)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from sloserve.config import EngineConfig, SchedulerConfig
from sloserve.core.policies import policy_class, policy_names, prices_steps
from sloserve.errors import UsageError

_TYPES = {"int": int, "float": float, "str": str}


def add_dataclass_flags(p: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()
                        ) -> None:
    """--field-name for each field of `cls` that has help text (config.setting)."""
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta or f.name in skip or meta.get("cli") is False:
            continue
        flags = [f"--{f.name.replace('_', '-')}", *meta.get("aliases", ())]
        if f.type == "bool":
            p.add_argument(*flags, dest=f.name, default=f.default, help=meta["help"],
                           action=argparse.BooleanOptionalAction)
            continue
        kind = _TYPES.get(f.type.split(" | ")[0], str)
        p.add_argument(*flags, dest=f.name, type=kind, default=f.default, help=meta["help"],
                       choices=meta.get("choices"))


def from_flags(cls: type, args: argparse.Namespace, **extra: Any):
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return cls(**{**values, **extra})


def add_scheduler_flags(p: argparse.ArgumentParser) -> None:
    add_dataclass_flags(p, SchedulerConfig)
    seen: dict[str, str] = {}
    for name in policy_names():
        for flag, (option, kind, text) in policy_class(name).cli_options.items():
            if flag not in seen:
                p.add_argument(f"--{flag}", dest=_dest(flag), type=kind, default=None,
                               help=f"{name}: {text}")
            seen[flag] = name
    p.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE",
                   help="any knob of the policy, by its argument name (repeatable)")
    p.add_argument("--latency-profile", default=None,
                   help="JSON from `sloserve profile`: the step-time model of policies that "
                        "price steps (slice) and of tropical routing; in `sim`, the hardware")


def scheduler_config(args: argparse.Namespace) -> SchedulerConfig:
    """The scheduler settings of these flags; a bad policy or knob is a UsageError."""
    try:
        cls = policy_class(args.policy)
        options = _policy_options(args, cls)
        config = from_flags(SchedulerConfig, args, policy_options=options)
        cls(**options)  # bad knob values fail here, as one line
    except (TypeError, ValueError, OSError) as e:
        raise UsageError(f"policy {args.policy}: {e}") from None
    return config


def _policy_options(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name in policy_names():
        for flag, (option, _, _) in policy_class(name).cli_options.items():
            value = getattr(args, _dest(flag))
            if value is None:
                continue
            if flag not in cls.cli_options:
                raise UsageError(f"--{flag} does not apply to --policy {args.policy}")
            options[option] = value
    for item in args.policy_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--policy-option takes KEY=VALUE, got {item!r}")
        options[key] = _number_or_text(value)
    if args.latency_profile and prices_steps(args.policy):
        options.setdefault("latency", args.latency_profile)
    return options


ROLE_LIMITS = ("max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization")


def add_role_limit_flags(p: argparse.ArgumentParser) -> None:
    """--prefill-max-num-seqs ... --decode-gpu-memory-utilization: one role's instances."""
    for role in ("prefill", "decode"):
        for name in ROLE_LIMITS:
            p.add_argument(f"--{role}-{name.replace('_', '-')}", default=None,
                           type=float if name == "gpu_memory_utilization" else int,
                           help=f"{role} instances only")


def role_overrides(args: argparse.Namespace, role: str) -> dict[str, Any]:
    """The limits given for one role's instances."""
    return {n: v for n in ROLE_LIMITS if (v := getattr(args, f"{role}_{n}")) is not None}


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML/JSON of settings (flag names with underscores, e.g. what "
                        "`sloserve tune` writes); flags given override it")
    add_dataclass_flags(p, EngineConfig)
    add_scheduler_flags(p)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    try:
        return from_flags(EngineConfig, args, scheduler=scheduler_config(args))
    except ValueError as e:
        raise UsageError(str(e)) from None


def _dest(flag: str) -> str:
    return "policy_" + flag.replace("-", "_")


def _number_or_text(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
