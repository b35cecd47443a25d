"""`m2u-data`: the dataset tools. `m2u-data summary --config FILE [--config.data.*=...]` prints
the dataset summary (m2u_jax.data.summary); `m2u-data generate --out DIR [...]` writes the
synthetic MVTec-layout dataset (m2u_jax.data.synthetic). `m2u-data COMMAND --help` for options."""

from __future__ import annotations

import sys

COMMANDS = ("summary", "generate")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: m2u-data {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "summary":
        from m2u_jax.data import summary  # each command imports only what it needs

        return summary.main([f"m2u-data {command}", *rest])
    from m2u_jax.data import synthetic

    return synthetic.main(rest)


def run() -> None:
    """Console-script entry point (`m2u-data`)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
