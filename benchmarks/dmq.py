"""DMQ balancing benchmark: MobileNetV2 INT8 with and without dmq_balance, same calibration.

    python benchmarks/dmq.py                      # markdown + JSON on stdout
    python benchmarks/dmq.py --json dmq.json

Data as benchmarks/ptq.py: the first 100 ImageNet dev images calibrate, the other 150 evaluate.
Per variant, for the fake-quant and the QDQ model: output SQNR against the float model (dB),
top-1 agreement with it and top-1 accuracy. Variants: IFMR + ARQ (no balancing); the same after
dmq_balance on every layer; after dmq_balance on the layers reading a residual Add output only
(where MobileNetV2's outlier channels are). Quality figures are valid on a loaded machine.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ptq  # noqa: E402  (data loading and scoring shared with the PTQ benchmark)

STEPS = "calibrate{algorithm=ifmr},quantize_weights{algorithm=arq}"


def residual_readers(model_path: Path) -> list[str]:
    """Conv layers whose input is an Add output (MobileNetV2's residual stream)."""
    graph = onnx.load(str(model_path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    return [n.name for n in graph.node
            if n.op_type == "Conv" and n.input[0] in producer and producer[n.input[0]].op_type == "Add"]


def variants(case) -> dict[str, str]:
    layers = " ".join(residual_readers(case.model))
    return {"IFMR + ARQ": STEPS,
            "+ dmq_balance (every layer, a=0.5)": f"dmq_balance{{migration_strength=0.5}},{STEPS}",
            "+ dmq_balance (residual readers, a=0.5)": f"dmq_balance{{migration_strength=0.5 layers=[{layers}]}},{STEPS}"}


def run(case, label: str, steps: str, reference) -> list[dict]:
    import amct_pipeline as ap
    session = ap.Session(load_entrypoints=False)
    pipeline = session.build(f"fuse_bn,match_layers,{steps},lower{{targets=[fakequant,qdq]}}", datasets=["calib"])
    result = pipeline.run(str(case.model), datasets={"calib": ptq.batches(case.calib, case.batch, case.input_name)})
    rows = []
    for target in ("fakequant", "qdq"):
        got = ptq.score(reference, ptq.predict(result.artifacts["lowered"][target], case), case.labels)
        rows.append({"variant": label, "target": target, **{k: round(v, 4) for k, v in got.items()}})
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| variant | model | output SQNR dB | top-1 agreement % | top-1 % (float) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['target']} | {r['sqnr_db']:.2f} | {100 * r['agreement']:.1f} | "
                     f"{100 * r['top1']:.1f} ({100 * r['top1_float']:.1f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    try:
        case = ptq.load_cases(["mobilenetv2"])[0]
    except FileNotFoundError as exc:
        print(f"skipping MobileNetV2: {exc}", file=sys.stderr)
        return 0
    reference = ptq.predict(case.model, case)
    rows = [row for label, steps in variants(case).items() for row in run(case, label, steps, reference)]
    print(markdown(rows))
    print(json.dumps(rows, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
