"""`moekit <command>`: the one command-line entry point.

Each subcommand registers itself in `COMMANDS` with a function `(args) -> int` and an argparse
configurator. Subcommands that take a config accept a preset name or a JSON file plus
`--a.b=value` overrides, print the resolved config and save it beside their outputs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


def command(name: str, help_text: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register a subcommand."""

    def register(fn: Handler) -> Handler:
        COMMANDS[name] = (help_text, configure, fn)
        return fn

    return register


def _layer_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=None)


@command(
    "layer-demo",
    "route a random batch through one MoE layer and print its expert load",
    _layer_demo_args,
)
def layer_demo(args: argparse.Namespace) -> int:
    import torch

    from moekit import MoEConfig, MoELayer
    from moekit.analysis.tables import load_table

    torch.manual_seed(0)
    cfg = MoEConfig(
        d_model=256,
        d_expert=512,
        n_experts=args.experts,
        top_k=args.top_k,
        capacity_factor=args.capacity_factor,
        aux_loss_coef=1e-2,
    )
    print(cfg.to_json())
    layer = MoELayer(cfg)
    x = torch.randn(args.tokens, cfg.d_model)
    y, aux = layer(x)
    print(
        f"\nrouted {args.tokens} tokens, top-{cfg.top_k} of {cfg.n_experts} experts -> {tuple(y.shape)}"
    )
    print(load_table(aux.routed_counts, aux.counts))
    print(
        f"balance loss {aux.balance_loss.item():.4f} (1.0 = uniform)   MaxVio {aux.max_vio.item():.3f}   "
        f"dropped {aux.dropped_fraction.item():.1%}   entropy {aux.entropy.item():.3f} nats"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, configure, _) in COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command][2](args)


if __name__ == "__main__":
    sys.exit(main())
