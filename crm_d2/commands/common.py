"""The model options every refining command shares, and the one place that turns them into a Refiner."""


def add_model_arguments(parser, weights_default="demo"):
    """--weights, --device, --memory-budget-mb, --fast (weights_default None makes --weights required)."""
    parser.add_argument("--weights", default=weights_default, required=weights_default is None,
                        help="CRM weights: 'demo', a crm_d2 checkpoint or the authors' released state_dict")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--memory-budget-mb", type=int, default=512,
                        help="decoder memory per step; the encoder runs in row tiles above 4x this")
    parser.add_argument("--fast", action="store_true",
                        help="fast mode: re-decode only a band around each scale's boundary (not bit-exact; "
                             "docs/benchmark.md)")


def build_refiner(args):
    from ..refiner import Refiner

    return Refiner(weights=args.weights, device=args.device, scales=getattr(args, "scales", None),
                   memory_budget=args.memory_budget_mb << 20, mode="fast" if getattr(args, "fast", False) else "exact")
