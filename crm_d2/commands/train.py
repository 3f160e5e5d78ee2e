"""`crm-d2 train`: train CRM from a YAML config (the released recipe or a smaller one).

    crm-d2 train --config configs/training/crm_tiny_cpu.yaml [--output DIR] [--resume] [KEY=VALUE ...]

Multi-GPU: `torchrun --nproc_per_node=N -m crm_d2.cli train --config ...` (DDP is picked up from the env vars).
"""
NAME = "train"
HELP = "train CRM from a YAML config (released recipe, resumable, multi-GPU via torchrun)"


def add_arguments(parser):
    parser.add_argument("--config", "--config-file", dest="config", required=True,
                        help="YAML config, e.g. configs/training/crm_tiny_cpu.yaml")
    parser.add_argument("--output", default=None, help="output folder (default: the config's output_dir)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in the output folder (model, optimizer, RNG, data)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. solver.max_iter=500 data.crop_size=64")


def run(args):
    # Imported here so `crm-d2 --help` does not pay for the trainer's imports.
    from crm_d2.train.trainer import train_from_args

    return train_from_args(args)
