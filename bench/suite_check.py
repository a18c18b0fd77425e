"""Dry check of one GPU-suite stage on any machine: the script imports, its command line parses, and the presets
it names exist. `bash bench/gpu_suite.sh --check` runs this for every stage, so a lent GPU's minutes are not lost
to a typo; nothing is measured and no GPU is needed.

    python bench/suite_check.py bench/bench_cross_entropy.py --sizes gpu-quick

How: the script is imported as a module (its imports run), then its `main()` is called with the stage's arguments
and argparse stopped right after parsing (an unknown option or a bad choice exits 2 with argparse's message).
A string argument naming a preset is looked up in the module's `PRESETS`, and each entry of a preset is passed
to the module's own parser of entries (`parse_config`) where it has one.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRESET_ARGUMENTS = ("sizes", "preset")


class _Parsed(Exception):
    """Raised in place of running the benchmark once its arguments parsed."""

    def __init__(self, namespace):
        super().__init__("parsed")
        self.namespace = namespace


def _load(script: Path):
    sys.path[:0] = [str(REPO), str(script.parent)]
    spec = importlib.util.spec_from_file_location(f"suite_check_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parsed_arguments(module, argv: list[str]) -> argparse.Namespace:
    """Run module.main() with `argv` until its ArgumentParser has parsed them; return the namespace."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    saved_argv = sys.argv
    sys.argv = [module.__file__, *argv]
    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        module.main()
    except _Parsed as parsed:
        return parsed.namespace
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = saved_argv
    raise SystemExit(f"{module.__file__}: main() returned without parsing a command line")


def check_presets(module, namespace: argparse.Namespace) -> list[str]:
    """Names of the presets the arguments use, each checked to exist with entries the module can parse."""
    presets = getattr(module, "PRESETS", {})
    checked = []
    for name in PRESET_ARGUMENTS:
        value = getattr(namespace, name, None)
        if not isinstance(value, str) or not value[:1].isalpha():
            continue  # unset, or literal sizes (NxdxV)
        if value not in presets:
            raise SystemExit(f"{module.__file__}: --{name} {value!r} is not a preset ({sorted(presets)})")
        if hasattr(module, "parse_config"):
            for entry in presets[value]:
                module.parse_config(entry)
        checked.append(value)
    return checked


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit("usage: suite_check.py SCRIPT [ARGS...]")
    script = Path(argv[0])
    module = _load(script if script.is_absolute() else REPO / script)
    namespace = parsed_arguments(module, argv[1:])
    presets = check_presets(module, namespace)
    print(f"ok: {script} {' '.join(argv[1:])}" + (f" (presets {', '.join(presets)} exist)" if presets else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
