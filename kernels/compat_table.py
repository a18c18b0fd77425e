"""docs/kernels.md's compatibility table (Liger-Kernel 0.8.5 and TRL 1.16 options -> computed / accepted / refused),
generated from the option lists the compatibility layers themselves keep (kernels/liger_compat.py,
kernels/trl_compat.py); tests/test_compat_table.py holds docs/kernels.md's copy equal to `compatibility_markdown()`.
Print it with `python -m kernels.compat_table`."""
from __future__ import annotations

from kernels.liger_compat import CE_OPTIONS, GRPO_OPTIONS
from kernels.trl_compat import TRL_OPTIONS

# Surfaces: Liger's LigerFusedLinearCrossEntropyLoss and liger_fused_linear_cross_entropy ("Liger CE"), Liger's
# LigerFusedLinearGRPOLoss ("Liger GRPO"), TRL's GRPOConfig loss options through grpo_loss_kwargs ("TRL GRPO").
SECTIONS = (("Liger CE", CE_OPTIONS), ("Liger GRPO", GRPO_OPTIONS), ("TRL GRPO", TRL_OPTIONS))


def compatibility_markdown() -> str:
    """One markdown table: surface, option, status, how."""
    lines = ["| surface | option | fastmath | how / why |", "|---|---|---|---|"]
    for title, options in SECTIONS:
        for option, (status, note) in options.items():
            lines.append(f"| {title} | `{option}` | {status} | {note} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(compatibility_markdown())
