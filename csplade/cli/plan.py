"""`csplade plan RECIPE --accelerate-config CFG --gpu-memory 80GB`: will it fit, how long will it take.

Prints the per-GPU memory breakdown of csplade.plan, the time estimate, and "fits" / "does not fit" with
the knobs that would make it fit (`--json` for the same as JSON). `--key value` pairs after the recipe
override its keys, as for `csplade train`, so a knob can be tried before editing the recipe.
"""

from __future__ import annotations

import argparse
import json

from csplade.cli.common import fraction, positive, positive_float

GIB = 1024**3


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "plan",
        help="memory per GPU and time of a recipe on a cluster; does it fit?",
        description="Plan a training or adaptation recipe on GPUs without running it. Extra "
        "`--key value` pairs override recipe keys.",
    )
    parser.add_argument("recipe", help="recipe YAML (training or adaptation)")
    parser.add_argument(
        "--accelerate-config", required=True, help="accelerate config YAML (accelerate_configs/…)"
    )
    parser.add_argument(
        "--nodes", type=positive, default=None, help="machines (default: the config's)"
    )
    parser.add_argument(
        "--gpus-per-node",
        type=positive,
        default=None,
        help="GPUs per machine (default: the config's)",
    )
    parser.add_argument(
        "--gpu-memory",
        type=memory_size,
        default="80GB",
        help="memory of one GPU: 80GB, 79GiB, 24000MB (default 80GB)",
    )
    parser.add_argument(
        "--tflops",
        type=positive_float,
        default=400.0,
        help="dense bf16 TFLOPS of one GPU (default 400; give your CPU's figure with --device cpu)",
    )
    parser.add_argument("--mfu", type=fraction, default=0.4, help="model FLOPs utilisation (0-1)")
    parser.add_argument(
        "--num-queries",
        type=positive,
        default=None,
        help="training queries per epoch (texts for an adaptation recipe); default: counted in a "
        "local data set",
    )
    parser.add_argument(
        "--architecture",
        default=None,
        help="a known architecture (e.g. meta-llama/Llama-3.1-8B) or a folder with config.json, "
        "when model_name_or_path does not tell",
    )
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="plan a GPU run or a CPU run"
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(func=_plan, accepts_overrides=True)


def memory_size(text: str) -> str:
    """A memory size argparse accepts only when `parse_memory` reads it (80GB, 79GiB, 24000MB)."""
    from csplade.plan import parse_memory

    try:
        parse_memory(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _plan(args: argparse.Namespace) -> int:
    from csplade.plan import plan_recipe

    plan = plan_recipe(
        args.recipe,
        args.accelerate_config,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        gpu_memory=args.gpu_memory,
        tflops=args.tflops,
        mfu=args.mfu,
        num_queries=args.num_queries,
        architecture=args.architecture,
        overrides=getattr(args, "overrides", None) or [],
        device=args.device,
    )
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        overrides = " ".join(getattr(args, "overrides", None) or [])
        print(render(plan, f"{args.recipe} {overrides}".strip()))
    return 0


def _gib(value: float) -> str:
    return f"{value / GIB:8.2f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 86400:.1f} days"


def render(plan, recipe: str = "") -> str:
    """The plan as the text `csplade plan` prints."""
    lines = [f"csplade plan: {recipe} ({plan.phase})"]
    lines += _model_lines(plan)
    lines.append("")
    lines.append(f"memory per GPU ({plan.device})      GiB   what")
    for part in plan.parts:
        lines.append(f"  {part.name:22s} {_gib(part.bytes)}   {part.detail}")
    share = "" if plan.gpu_memory is None else f"   of {plan.gpu_memory / GIB:.2f} GiB "
    if plan.gpu_memory:
        share += f"({100 * plan.total_bytes / plan.gpu_memory:.0f}%)"
    lines.append(f"  {'total':22s} {_gib(plan.total_bytes)}{share}")
    if plan.cpu_offload_bytes:
        lines.append(f"  (offloaded to CPU RAM: {plan.cpu_offload_bytes / GIB:.2f} GiB per GPU)")
    lines.append("")
    lines += _time_lines(plan.time)
    lines.append("")
    lines += _verdict_lines(plan)
    return "\n".join(lines)


def _model_lines(plan) -> list[str]:
    """The model, the cluster and the per-GPU batch."""
    arch, params, shapes = plan.architecture, plan.parameters, plan.shapes
    trainable = f"{params['trainable'] / 1e6:.1f} M trainable"
    if params["lora"]:
        trainable += " (LoRA)"
    lines = [f"  model    {plan.model}: {params['total'] / 1e9:.3f} B parameters, {trainable}"]
    lines.append(
        f"           hidden {arch.hidden}, {arch.layers} layers, {arch.heads} heads / "
        f"{arch.kv_heads} kv, intermediate {arch.intermediate}, vocab {arch.vocab}"
        f"{', tied head' if arch.tied else ''}"
    )
    memory = "" if plan.gpu_memory is None else f", {plan.gpu_memory / GIB:.1f} GiB each"
    lines.append(f"  cluster  {plan.cluster.describe()} [{plan.cluster.source}]{memory}")
    if plan.phase == "train":
        batch = (
            f"{shapes['micro_batch']} queries x {shapes['query_tokens']} tokens + "
            f"{shapes['micro_batch'] * shapes['group_size']} docs x {shapes['doc_tokens']} tokens"
        )
    else:
        batch = f"{shapes['micro_batch']} texts x {shapes['seq_tokens']} tokens"
    flags = [shapes["mixed_precision"] if shapes["mixed_precision"] != "no" else "fp32/model dtype"]
    if shapes["gradient_checkpointing"]:
        flags.append("gradient checkpointing")
    lines.append(
        f"  batch    {batch} = {shapes['tokens_per_step']:,} tokens per GPU per micro-step "
        f"({', '.join(flags)}); global batch {shapes['global_batch']}"
    )
    return lines


def _time_lines(t) -> list[str]:
    lines = [f"time at {t.tflops:g} TFLOPS x {t.mfu:g} MFU per GPU"]
    parts = ", ".join(f"{k} {v:.2e}" for k, v in t.flops_per_step.items() if v)
    lines.append(f"  FLOPs per micro-step per GPU   {sum(t.flops_per_step.values()):.3e} ({parts})")
    lines.append(f"  micro-step                     {_duration(t.seconds_per_step)}")
    if t.seconds_per_epoch is not None:
        lines.append(
            f"  epoch                          {_duration(t.seconds_per_epoch)} "
            f"({t.examples_per_epoch:,} examples, {t.steps_per_epoch:,} micro-steps, "
            f"{t.optimizer_steps_per_epoch:,} optimizer steps)"
        )
    if t.seconds_total is not None:
        lines.append(
            f"  run                            {_duration(t.seconds_total)} "
            f"({t.optimizer_steps:,} optimizer steps)"
        )
    return lines


def _verdict_lines(plan) -> list[str]:
    verdict = plan.verdict()
    if plan.gpu_memory is not None and not plan.fits:
        verdict += f" ({plan.total_bytes / GIB:.1f} GiB > {plan.gpu_memory / GIB:.1f} GiB)"
    lines = [f"verdict: {verdict}"]
    if plan.suggestions:
        lines.append("knobs (estimated total per GPU):")
        for s in plan.suggestions:
            status = "fits" if s.fits else "does not fit"
            caveat = f"  [{s.caveat}]" if s.caveat else ""
            lines.append(f"  {s.knob}\n      -> {s.total_bytes / GIB:.1f} GiB, {status}{caveat}")
    if plan.notes:
        lines.append("notes:")
        lines.extend(f"  - {note}" for note in plan.notes)
    return lines
