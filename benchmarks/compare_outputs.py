"""Behaviour check for refactorings: every shipped pipeline on every real model, two source trees, same output bytes.

    python benchmarks/compare_outputs.py                          # 1bb51eb against the working tree
    python benchmarks/compare_outputs.py --ref HEAD~3 --against /path/to/other/checkout --jobs 2
    python benchmarks/compare_outputs.py --pipelines ptq_int8,convert_qat_ascend --models mnist-8 --keep /tmp/cmp
    python benchmarks/compare_outputs.py --json result.json

Sides: `--ref REV` is exported with `git archive` into a temporary folder under the system temp
directory (removed afterwards; the repository's .git is not touched); `--against PATH` is a source
tree used in place (default: the working tree of the repository this script lives in), or a
revision, exported the same way (handy while the working tree is mid-edit). Each side
runs in its own subprocess as `python -m amct_pipeline --no-plugins run <tree>/amct_pipeline/
pipelines/P.yaml --model M --data NAME=X.npy --output-dir DIR` with PYTHONPATH=<tree> only (and
a bytecode cache outside the tree), so each side imports its own package and uses its own
pipeline files; before anything runs the script checks that each side's interpreter imports
`amct_pipeline` from that side's tree.

Cases: every `amct_pipeline/pipelines/*.yaml` of either tree x every model in ../shared/models
(relative to the project root) that has a known preprocessing (MODELS below, from
../shared/models/README.md). A pipeline that declares datasets gets each of them bound to the
model's calibration file: the first --samples images/samples (default 32) of its data set, written
once as float32 .npy into the work folder and shared by both sides. A pipeline containing the
`convert_qat` pass takes a QDQ model instead: the `<model>_qdq_model.onnx` that `ptq_int8` wrote for
that model on the same side (ptq_int8 is run for that even when --pipelines leaves it out). A model
or data file that is missing is skipped with a message naming it.

Comparison, per case:
  - both sides succeed: the same file names; each file byte for byte. An .onnx file whose bytes
    differ is loaded (with its external data) and its structured difference is listed: model
    fields, opset imports, metadata_props, graph inputs/outputs/value_info, nodes (op, name,
    inputs, outputs, attributes; matched by name), initializers (dtype, shape, values via numpy:
    how many elements differ and by how much), functions. Text files (record.txt, JSON, ...) get a
    unified-diff excerpt; other files their sizes and first differing offset. The CLI's own output
    (the files it lists on stdout and each pass's "done (stats)" line, times masked, paths made
    relative to the side) is compared too: pass statistics are behaviour.
  - both sides fail: the same exit code and the same error lines (`amct-pipeline: error: ...`, or
    the last stderr line), with each side's tree and work folder replaced by <tree>/<work>:
    "both-failed-identically".
  - otherwise "differs", saying what.

Output: a markdown table (pipeline x model: identical / differs (what) / both-failed-identically /
skipped), notes and details for every cell that is not identical, each side's total run time, and
`--json FILE` with everything (per-run exit codes, seconds, files, details).
Exit status: 0 when every case that ran is identical or failed identically on both sides (and at
least one ran), 1 when any case differs, 2 on a setup error (bad revision, tree without
amct_pipeline, nothing to compare).

Nothing is hidden: PYTHONHASHSEED, thread counts and the rest of the environment are left as they
are, so run-to-run nondeterminism shows up as a difference (compare a revision with itself to
look for it: `--ref HEAD` on a clean working tree).
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import difflib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEFAULT_REF = "1bb51eb"
QDQ_SOURCE = "ptq_int8"          # the pipeline whose <model>_qdq_model.onnx feeds convert_qat pipelines
DETAIL_LINES = 30                # per file, in the printed details (the JSON has up to 4x as many)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIDES = ("ref", "against")


# -------------------------------------------------------------------------------------------
# models and their calibration data (preprocessing per ../shared/models/README.md)

def _imagenet_rgb(z: Any, n: int) -> np.ndarray:         # mobilenetv2: RGB / 255, mean/std, NCHW
    x = z["images_nhwc_uint8"][:n].astype(np.float32) / 255.0
    x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return x.transpose(0, 3, 1, 2)


def _imagenet_y(z: Any, n: int) -> np.ndarray:           # super_resolution: BT.601 Y channel in [0, 1]
    rgb = z["images_nhwc_uint8"][:n].astype(np.float32) / 255.0
    y = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return y[:, None]


def _cifar(z: Any, n: int) -> np.ndarray:                # resnet8: raw 0..255, NCHW
    return z["images_nchw_float_0_255"][:n].astype(np.float32)


def _mnist(z: Any, n: int) -> np.ndarray:                # mnist-8: raw 0..255, [N, 1, 28, 28]
    return z["images_uint8"][:n, None].astype(np.float32)


def _x(z: Any, n: int) -> np.ndarray:                    # already preprocessed (faces24, digits)
    return z["x"][:n].astype(np.float32)


MODELS: dict[str, tuple[str, Callable[[Any, int], np.ndarray]]] = {
    "mobilenetv2_fp32": ("imagenet_dev250_224_uint8.npz", _imagenet_rgb),
    "resnet8_cifar10_bn": ("cifar_like212_32_uint8.npz", _cifar),
    "ultraface_rfb320_bn": ("faces24_240x320_f32.npz", _x),
    "super_resolution_op15": ("imagenet_dev250_224_uint8.npz", _imagenet_y),
    "mnist-8": ("mnist_test10k_uint8.npz", _mnist),
    "digits_cnn_bn": ("digits_test_split.npz", _x),
    "digits_cnn_bn_opset18": ("digits_test_split.npz", _x),
}


@dataclass
class Model:
    name: str
    path: Path
    data: Path | None = None       # calibration .npy, once written
    skip: str | None = None


def discover_models(selected: list[str] | None, work: Path, samples: int) -> list[Model]:
    """Every model in ../shared/models (or those --models names), its calibration .npy written once."""
    models_dir = SHARED / "models"
    names = sorted(p.stem for p in models_dir.glob("*.onnx")) if models_dir.is_dir() else []
    for name in MODELS:                         # the known ones appear (as skipped) even when absent
        if name not in names:
            names.append(name)
    if selected:
        wanted = [s[:-5] if s.endswith(".onnx") else s for s in selected]
        unknown = [s for s in wanted if s not in names]
        if unknown:
            raise SystemExit(f"compare_outputs: error: --models: unknown model(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(names))}")
        names = [n for n in names if n in wanted]
    out: list[Model] = []
    cache: dict[tuple[str, str], Path] = {}
    (work / "data").mkdir(parents=True, exist_ok=True)
    for name in sorted(names):
        m = Model(name, models_dir / f"{name}.onnx")
        if not m.path.is_file():
            m.skip = f"missing {_rel(m.path)}"
        elif name not in MODELS:
            m.skip = f"no preprocessing known for {m.path.name} (add it to MODELS in {Path(__file__).name})"
        else:
            missing = _missing_external_data(m.path)
            data_file, prep = MODELS[name]
            if missing:
                m.skip = f"missing {_rel(missing)} (external data of {m.path.name})"
            elif not (SHARED / "data" / data_file).is_file():
                m.skip = f"missing {_rel(SHARED / 'data' / data_file)}"
            else:
                key = (data_file, prep.__name__)
                if key not in cache:
                    with np.load(SHARED / "data" / data_file) as z:
                        x = np.ascontiguousarray(prep(z, samples), dtype=np.float32)
                    path = work / "data" / f"{Path(data_file).stem}{prep.__name__}_{len(x)}.npy"
                    np.save(path, x)
                    cache[key] = path
                m.data = cache[key]
        out.append(m)
    return out


def _missing_external_data(path: Path) -> Path | None:
    model = onnx.load(str(path), load_external_data=False)
    tensors = list(model.graph.initializer)
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc and not (path.parent / loc).is_file():
                return path.parent / loc
    return None


def _rel(p: Path) -> str:
    try:
        return os.path.relpath(p, ROOT)
    except ValueError:
        return str(p)


# -------------------------------------------------------------------------------------------
# source trees

@dataclass
class Tree:
    side: str
    path: Path
    label: str                   # what the user named (revision or path)
    commit: str | None = None
    note: str = ""
    pipelines: dict[str, dict] = field(default_factory=dict)    # name -> {file, datasets, passes}


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def export_ref(rev: str, dest: Path) -> str:
    """`git archive REV | tar -x` into dest (the repository's .git and work tree are not touched)."""
    try:
        sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"compare_outputs: error: {rev}: neither a folder nor a commit in {ROOT} ({exc.stderr.strip()})")
    dest.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", "--format=tar", sha], stdout=subprocess.PIPE)
    untar = subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, capture_output=True)
    archive.stdout.close()
    if archive.wait() != 0 or untar.returncode != 0:
        raise SystemExit(f"compare_outputs: error: git archive {sha} | tar failed: {untar.stderr.decode()}")
    return sha


def describe_against(path: Path) -> tuple[str | None, str]:
    try:
        top = Path(git("rev-parse", "--show-toplevel", cwd=path)).resolve()
        head = git("rev-parse", "HEAD", cwd=path)
        dirty = git("status", "--porcelain", "--untracked-files=no", cwd=top)
        return head, f"HEAD {head[:10]}" + (", with uncommitted changes" if dirty else ", clean")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None, "not a git checkout"


def side_env(tree: Tree, work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree.path)                      # this tree only, whatever the caller had
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache" / tree.side)   # no __pycache__ written into the tree
    env.pop("PYTHONSTARTUP", None)
    return env


def inspect_tree(tree: Tree, python: str, work: Path) -> None:
    """Check the side imports its own package; read its pipeline files with its own PyYAML."""
    if not (tree.path / "amct_pipeline" / "__init__.py").is_file():
        raise SystemExit(f"compare_outputs: error: {tree.side} tree {tree.path} has no amct_pipeline/__init__.py")
    files = sorted((tree.path / "amct_pipeline" / "pipelines").glob("*.yaml"))
    probe = ("import json, sys, yaml, amct_pipeline\n"
             "docs = {p: yaml.safe_load(open(p, encoding='utf-8')) for p in sys.argv[1:]}\n"
             "print(json.dumps({'package': amct_pipeline.__file__, 'docs': docs}))\n")
    cwd = work / tree.side
    cwd.mkdir(parents=True, exist_ok=True)
    res = subprocess.run([python, "-c", probe, *map(str, files)], cwd=cwd, env=side_env(tree, work),
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"compare_outputs: error: {tree.side} tree {tree.path}: {python} cannot import "
                         f"amct_pipeline/yaml: {res.stderr.strip().splitlines()[-1:]}")
    info = json.loads(res.stdout)
    package = Path(info["package"]).resolve()
    if tree.path.resolve() not in package.parents:
        raise SystemExit(f"compare_outputs: error: {tree.side} side imports amct_pipeline from {package}, "
                         f"not from {tree.path}")
    for file in files:
        doc = info["docs"][str(file)] or {}
        passes = [p.get("pass") for p in doc.get("passes") or [] if isinstance(p, dict)]
        tree.pipelines[file.stem] = {"file": file, "datasets": list(doc.get("datasets") or {}),
                                     "passes": passes, "qdq_input": "convert_qat" in passes}


# -------------------------------------------------------------------------------------------
# running

@dataclass
class Run:
    side: str
    pipeline: str
    model: str
    root: Path                       # case folder: out/, stdout.txt, stderr.txt, input/
    rc: int | str | None = None      # exit code, "timeout", or None when not run
    seconds: float = 0.0
    not_run: str | None = None       # why this side did not run the case
    stdout: str = ""
    stderr: str = ""

    @property
    def out(self) -> Path:
        return self.root / "out"

    def files(self) -> list[str]:
        if not self.out.is_dir():
            return []
        return sorted(str(p.relative_to(self.out)) for p in self.out.rglob("*") if p.is_file())


def run_one(run: Run, tree: Tree, model_path: Path, data: Path | None, python: str, work: Path,
            timeout: float) -> Run:
    spec = tree.pipelines[run.pipeline]
    cmd = [python, "-m", "amct_pipeline", "--no-plugins", "run", str(spec["file"]),
           "--model", str(model_path), "--output-dir", str(run.out)]
    for name in spec["datasets"]:
        cmd += ["--data", f"{name}={data}"]
    run.root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=run.root, env=side_env(tree, work), capture_output=True, text=True,
                             timeout=timeout)
        run.rc, run.stdout, run.stderr = res.returncode, res.stdout, res.stderr
    except subprocess.TimeoutExpired as exc:
        run.rc = "timeout"
        run.stdout = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        run.stderr = (exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")) \
            + f"\ncompare_outputs: timed out after {timeout:.0f} s"
    run.seconds = time.perf_counter() - start
    (run.root / "command.txt").write_text(" ".join(cmd) + "\n")
    (run.root / "stdout.txt").write_text(run.stdout)
    (run.root / "stderr.txt").write_text(run.stderr)
    return run


def qdq_input(dep: Run, run: Run, model: str) -> Path | None:
    """Copy the QDQ model ptq_int8 wrote on this side (with its folder, for external data) as the input."""
    if dep.rc != 0:
        run.not_run = f"{QDQ_SOURCE} {'failed' if dep.rc is not None else 'did not run'} (exit {dep.rc})"
        return None
    src = dep.out / f"{model}_qdq_model.onnx"
    if not src.is_file():
        run.not_run = f"{QDQ_SOURCE} wrote no {src.name}"
        return None
    dest = run.root / "input"
    shutil.copytree(dep.out, dest)
    return dest / src.name


# -------------------------------------------------------------------------------------------
# comparing

class Report:
    """Difference lines of one file, by category (the table shows the counts)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.counts: dict[str, int] = {}

    def add(self, category: str, line: str) -> None:
        self.counts[category] = self.counts.get(category, 0) + 1
        self.lines.append(line)

    def summary(self) -> str:
        return ", ".join(f"{n} {c}" for c, n in self.counts.items())


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _attr_value(attr: onnx.AttributeProto) -> Any:
    value = helper.get_attribute_value(attr)

    def canon(v: Any) -> Any:
        if isinstance(v, onnx.TensorProto):
            a = numpy_helper.to_array(v)
            return ("tensor", str(a.dtype), a.shape, a.tobytes())
        if isinstance(v, (onnx.GraphProto, onnx.SparseTensorProto, onnx.TypeProto)):
            return (type(v).__name__, v.SerializeToString(deterministic=True))
        if isinstance(v, float):
            return ("float", np.float32(v).tobytes())        # bitwise: -0.0 and NaN payloads count
        if isinstance(v, bytes):
            return ("bytes", v)
        return v

    if isinstance(value, list):
        return [canon(v) for v in value]
    return canon(value)


def _attr_text(attr: onnx.AttributeProto) -> str:
    value = helper.get_attribute_value(attr)
    if isinstance(value, onnx.TensorProto):
        a = numpy_helper.to_array(value)
        return f"tensor {a.dtype}{list(a.shape)} {_short(a.ravel()[:6].tolist(), 60)}"
    if isinstance(value, onnx.GraphProto):
        return f"graph '{value.name}' ({len(value.node)} nodes)"
    return _short(value, 80)


def _array_diff(a: np.ndarray, b: np.ndarray) -> str:
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"{a.dtype}{list(a.shape)} -> {b.dtype}{list(b.shape)}"
    if a.dtype.kind in "fc":
        neq = ~((a == b) | (np.isnan(a) & np.isnan(b)))
    else:
        neq = a != b
    n = int(np.count_nonzero(neq))
    if n == 0:
        return ""
    text = f"{n}/{a.size} elements differ"
    if a.dtype.kind in "fciub":
        fa, fb = a.astype(np.float64), b.astype(np.float64)
        delta = np.abs(fa - fb)[neq]
        scale = np.abs(fa)[neq]
        rel = float(np.max(delta / np.where(scale > 0, scale, 1.0)))
        first = int(np.flatnonzero(neq.ravel())[0])
        text += (f", max |diff| {float(np.max(delta)):.6g} (max rel {rel:.3g}); first at flat index {first}: "
                 f"{a.ravel()[first].item()!r} -> {b.ravel()[first].item()!r}")
    return text


def _node_key_fn(nodes_a: list, nodes_b: list) -> Callable[[onnx.NodeProto], str]:
    def unique(nodes: list) -> bool:
        names = [n.name for n in nodes]
        return all(names) and len(set(names)) == len(names)

    if unique(nodes_a) and unique(nodes_b):
        return lambda n: n.name
    return lambda n: "outputs=" + ",".join(n.output)     # SSA: output names identify a node


def _node_text(n: onnx.NodeProto) -> str:
    dom = f"{n.domain}::" if n.domain else ""
    attrs = ", ".join(f"{a.name}={_attr_text(a)}" for a in n.attribute)
    return f"{dom}{n.op_type} '{n.name}' ({', '.join(n.input)}) -> ({', '.join(n.output)})" + (f" {{{attrs}}}" if attrs else "")


def _encoding(t: onnx.TensorProto) -> str:
    """Where a tensor's values are stored: raw_data, a typed field, or external data (and where)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        ext = {e.key: e.value for e in t.external_data}
        text = f"external data {ext}" if ext else "external data with no location"
        return text + (f" (+{len(t.raw_data)} raw_data bytes inline)" if t.raw_data else "")
    if t.raw_data:
        return "raw_data"
    for fld in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        if len(getattr(t, fld)):
            return fld
    return "empty"


def _tensor_array(t: onnx.TensorProto, base_dir: str) -> np.ndarray | str:
    try:
        return numpy_helper.to_array(t, base_dir=base_dir)
    except Exception as exc:            # noqa: BLE001 - reported as the difference
        return f"unreadable: {type(exc).__name__}: {exc}"


def diff_graph(ga: onnx.GraphProto, gb: onnx.GraphProto, rep: Report, where: str = "graph",
               base: tuple[str, str] = ("", "")) -> None:
    """Graph differences into rep; base: each side's folder, for initializers kept in external data."""
    if ga.name != gb.name:
        rep.add("graph fields", f"{where}.name: {ga.name!r} -> {gb.name!r}")
    if ga.doc_string != gb.doc_string:
        rep.add("graph fields", f"{where}.doc_string: {_short(ga.doc_string)} -> {_short(gb.doc_string)}")
    for kind in ("input", "output", "value_info"):
        la, lb = list(getattr(ga, kind)), list(getattr(gb, kind))
        da, db = {v.name: v for v in la}, {v.name: v for v in lb}
        for name in [n for n in da if n not in db]:
            rep.add(f"{kind}s", f"{where}.{kind} removed: {name} {helper.printable_type(da[name].type)}")
        for name in [n for n in db if n not in da]:
            rep.add(f"{kind}s", f"{where}.{kind} added: {name} {helper.printable_type(db[name].type)}")
        for name in [n for n in da if n in db]:
            if da[name].SerializeToString(deterministic=True) != db[name].SerializeToString(deterministic=True):
                rep.add(f"{kind}s", f"{where}.{kind} {name}: {helper.printable_type(da[name].type)} -> "
                                    f"{helper.printable_type(db[name].type)}")
        if not rep.counts.get(f"{kind}s") and [v.name for v in la] != [v.name for v in lb] and kind != "value_info":
            rep.add(f"{kind}s", f"{where}.{kind} order: {[v.name for v in la]} -> {[v.name for v in lb]}")

    # nodes
    key = _node_key_fn(list(ga.node), list(gb.node))
    na, nb = {key(n): n for n in ga.node}, {key(n): n for n in gb.node}
    for k in [k for k in na if k not in nb]:
        rep.add("nodes", f"{where} node removed: {_node_text(na[k])}")
    for k in [k for k in nb if k not in na]:
        rep.add("nodes", f"{where} node added: {_node_text(nb[k])}")
    for k in [k for k in na if k in nb]:
        a, b = na[k], nb[k]
        if a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True):
            continue
        parts = []
        for fld in ("op_type", "domain", "name", "doc_string"):
            if getattr(a, fld) != getattr(b, fld):
                parts.append(f"{fld} {getattr(a, fld)!r} -> {getattr(b, fld)!r}")
        if list(a.input) != list(b.input):
            parts.append(f"inputs {list(a.input)} -> {list(b.input)}")
        if list(a.output) != list(b.output):
            parts.append(f"outputs {list(a.output)} -> {list(b.output)}")
        aa, ab = {x.name: x for x in a.attribute}, {x.name: x for x in b.attribute}
        for name in sorted(set(aa) | set(ab)):
            if name not in ab:
                parts.append(f"attr {name} removed (was {_attr_text(aa[name])})")
            elif name not in aa:
                parts.append(f"attr {name} added: {_attr_text(ab[name])}")
            elif _attr_value(aa[name]) != _attr_value(ab[name]):
                if aa[name].type == onnx.AttributeProto.GRAPH:
                    sub = Report()
                    diff_graph(aa[name].g, ab[name].g, sub, f"{where}/{a.name}.{name}", base)
                    parts.append(f"attr {name} (subgraph): {sub.summary()}")
                    for line in sub.lines:
                        rep.lines.append("    " + line)
                else:
                    parts.append(f"attr {name}: {_attr_text(aa[name])} -> {_attr_text(ab[name])}")
            elif aa[name].SerializeToString(deterministic=True) != ab[name].SerializeToString(deterministic=True):
                parts.append(f"attr {name}: same value, different encoding")
        if [x.name for x in a.attribute] != [x.name for x in b.attribute] and not parts:
            parts.append(f"attribute order {[x.name for x in a.attribute]} -> {[x.name for x in b.attribute]}")
        rep.add("nodes", f"{where} node {k}: " + "; ".join(parts or ["same fields, different encoding"]))
    common_a = [key(n) for n in ga.node if key(n) in nb]
    common_b = [key(n) for n in gb.node if key(n) in na]
    if common_a != common_b:
        i = next(i for i, (x, y) in enumerate(zip(common_a, common_b)) if x != y)
        rep.add("node order", f"{where} node order differs from position {i}: {common_a[i]} vs {common_b[i]}")

    # initializers
    ia, ib = {t.name: t for t in ga.initializer}, {t.name: t for t in gb.initializer}
    for name in [n for n in ia if n not in ib]:
        rep.add("initializers", f"{where} initializer removed: {name} "
                                f"{onnx.helper.tensor_dtype_to_np_dtype(ia[name].data_type)}{list(ia[name].dims)}")
    for name in [n for n in ib if n not in ia]:
        rep.add("initializers", f"{where} initializer added: {name} "
                                f"{onnx.helper.tensor_dtype_to_np_dtype(ib[name].data_type)}{list(ib[name].dims)}")
    for name in [n for n in ia if n in ib]:
        a, b = ia[name], ib[name]
        if a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True):
            continue
        va, vb = _tensor_array(a, base[0]), _tensor_array(b, base[1])
        if isinstance(va, str) or isinstance(vb, str):     # unreadable on a side: say how each is stored
            text = f"{_encoding(a)}{f' ({va})' if isinstance(va, str) else ''} -> " \
                   f"{_encoding(b)}{f' ({vb})' if isinstance(vb, str) else ''}"
        else:
            text = _array_diff(va, vb)
        if not text:
            text = f"same values, different encoding ({_encoding(a)} -> {_encoding(b)})"
            if _encoding(a) == _encoding(b):
                text = text[:-1] + ("; doc_string" if a.doc_string != b.doc_string else "; field order") + ")"
        rep.add("initializers", f"{where} initializer {name}: {text}")
    if not rep.counts.get("initializers") and [t.name for t in ga.initializer] != [t.name for t in gb.initializer]:
        rep.add("initializer order", f"{where} initializer order differs")
    sa = [s.SerializeToString(deterministic=True) for s in ga.sparse_initializer]
    sb = [s.SerializeToString(deterministic=True) for s in gb.sparse_initializer]
    if sa != sb:
        rep.add("sparse initializers", f"{where} sparse initializers differ ({len(sa)} -> {len(sb)})")


def diff_onnx(pa: Path, pb: Path) -> Report:
    rep = Report()
    models = []
    for side, path in (("ref", pa), ("against", pb)):
        try:
            models.append(onnx.load(str(path)))
        except Exception as exc:    # noqa: BLE001 - a file onnx.load refuses is itself a finding
            rep.add("onnx.load failures", f"{side}: onnx.load fails: {type(exc).__name__}: {exc}")
            try:                    # still compare what is there
                models.append(onnx.load(str(path), load_external_data=False))
            except Exception as exc2:  # noqa: BLE001
                rep.add("onnx.load failures", f"{side}: not an ONNX model: {type(exc2).__name__}: {exc2}")
                return rep
    a, b = models
    for fld in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if getattr(a, fld) != getattr(b, fld):
            rep.add("model fields", f"model.{fld}: {_short(getattr(a, fld))} -> {_short(getattr(b, fld))}")
    oa = {o.domain: o.version for o in a.opset_import}
    ob = {o.domain: o.version for o in b.opset_import}
    if oa != ob:
        rep.add("opset imports", f"opset_import: {oa} -> {ob}")
    ma = {p.key: p.value for p in a.metadata_props}
    mb = {p.key: p.value for p in b.metadata_props}
    for k in sorted(set(ma) | set(mb)):
        if ma.get(k) != mb.get(k):
            rep.add("metadata_props", f"metadata_props[{k!r}]: {_short(ma.get(k), 300)} -> {_short(mb.get(k), 300)}")
    if ma == mb and [p.key for p in a.metadata_props] != [p.key for p in b.metadata_props]:
        rep.add("metadata_props", "metadata_props order differs")
    fa = {(f.domain, f.name): f.SerializeToString(deterministic=True) for f in a.functions}
    fb = {(f.domain, f.name): f.SerializeToString(deterministic=True) for f in b.functions}
    for k in sorted(set(fa) | set(fb)):
        if fa.get(k) != fb.get(k):
            rep.add("functions", f"function {k[0]}::{k[1]}: "
                                 f"{'added' if k not in fa else 'removed' if k not in fb else 'differs'}")
    diff_graph(a.graph, b.graph, rep, base=(str(pa.parent), str(pb.parent)))
    if not rep.lines:
        rep.add("encoding", "no structural difference after loading (external-data layout, field order or "
                            "tensor encoding differs)")
    return rep


def _is_text(data: bytes) -> bool:
    if b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def diff_file(name: str, pa: Path, pb: Path) -> Report | None:
    da, db = pa.read_bytes(), pb.read_bytes()
    if da == db:
        return None
    if name.endswith(".onnx"):
        return diff_onnx(pa, pb)
    rep = Report()
    if _is_text(da) and _is_text(db):
        la, lb = da.decode().splitlines(keepends=True), db.decode().splitlines(keepends=True)
        changed = sum(1 for line in difflib.ndiff(la, lb) if line[:1] in "+-")
        rep.counts["lines changed"] = changed
        for line in difflib.unified_diff(la, lb, f"ref/{name}", f"against/{name}", n=2):
            rep.lines.append(line.rstrip("\n"))
        if not rep.lines:       # same lines, other line endings or trailing newline
            rep.lines.append("same lines, different line endings / final newline")
        return rep
    first = next((i for i, (x, y) in enumerate(zip(da, db)) if x != y), min(len(da), len(db)))
    rep.add("bytes", f"binary: {len(da)} -> {len(db)} bytes, sha256 {hashlib.sha256(da).hexdigest()[:12]} -> "
                     f"{hashlib.sha256(db).hexdigest()[:12]}, first difference at byte {first}")
    return rep


_TIME = re.compile(r"\bin \d+(\.\d+)?(e[-+]?\d+)?\s?(s|ms|us)\b")
_PASS_DONE = re.compile(r"^\[\d+/\d+\] \S+ (done|failed)\b")


def _normalize(text: str, tree: Tree, run: Run, work: Path) -> str:
    for path, label in ((run.root, "<case>"), (work / run.side, "<work>"), (tree.path, "<tree>")):
        for variant in {str(path), str(path.resolve())}:
            text = text.replace(variant, label)
    return text


def cli_log(run: Run, tree: Tree, work: Path) -> list[str]:
    """What the CLI said that is behaviour: the files it lists and each pass's stats line (times masked)."""
    lines = [_normalize(line, tree, run, work) for line in run.stdout.splitlines() if line.strip()]
    for chunk in re.split(r"[\r\n]", run.stderr):
        if _PASS_DONE.match(chunk):
            lines.append(_TIME.sub("in <t>", _normalize(chunk.strip(), tree, run, work)))
    return lines


def error_lines(run: Run, tree: Tree, work: Path) -> list[str]:
    if run.not_run:
        return [f"not run: {run.not_run}"]
    chunks = [c.strip() for c in re.split(r"[\r\n]", run.stderr) if c.strip()]
    errors = [c for c in chunks if c.startswith("amct-pipeline: error")]
    if not errors:
        errors = [c for c in chunks if not _PASS_DONE.match(c) and "|" not in c][-1:]
    return [_normalize(c, tree, run, work) for c in errors]


@dataclass
class Case:
    pipeline: str
    model: str
    status: str = "skipped"          # identical | differs | both-failed-identically | skipped
    what: str = ""                   # short, for the table
    details: list[str] = field(default_factory=list)
    runs: dict[str, Run] = field(default_factory=dict)


def compare_case(case: Case, trees: dict[str, Tree], work: Path) -> None:
    ra, rb = case.runs["ref"], case.runs["against"]
    ta, tb = trees["ref"], trees["against"]
    if ra.not_run and rb.not_run and ra.not_run == rb.not_run:
        case.status, case.what = "skipped", ra.not_run
        return
    ok_a, ok_b = ra.rc == 0 and not ra.not_run, rb.rc == 0 and not rb.not_run
    if not ok_a or not ok_b:
        ea, eb = error_lines(ra, ta, work), error_lines(rb, tb, work)
        if not ok_a and not ok_b and ra.rc == rb.rc and ea == eb:
            case.status = "both-failed-identically"
            case.what = f"exit {ra.rc}: " + " | ".join(ea)
            extra = sorted(set(ra.files()) ^ set(rb.files()))
            if extra:
                case.status, case.what = "differs", f"both failed, but left different files: {extra}"
            return
        case.status = "differs"
        state = lambda r: "not run" if r.not_run else f"exit {r.rc}"   # noqa: E731
        case.what = f"{state(ra)} vs {state(rb)}" if state(ra) != state(rb) else "different error"
        case.details = [f"ref: {state(ra)}: " + (" | ".join(ea) if not ok_a else "(ok)"),
                        f"against: {state(rb)}: " + (" | ".join(eb) if not ok_b else "(ok)")]
        case.what += ": " + "; ".join(case.details)
        return
    fa, fb = ra.files(), rb.files()
    whats: list[str] = []
    if fa != fb:
        only_a, only_b = sorted(set(fa) - set(fb)), sorted(set(fb) - set(fa))
        if only_a:
            whats.append(f"only in ref: {', '.join(only_a)}")
        if only_b:
            whats.append(f"only in against: {', '.join(only_b)}")
        case.details.append("files: " + "; ".join(whats))
    for name in [f for f in fa if f in fb]:
        rep = diff_file(name, ra.out / name, rb.out / name)
        if rep is None:
            continue
        whats.append(f"{name}: {rep.summary()}")
        case.details.append(f"{name}: {rep.summary()}")
        case.details += ["    " + line for line in rep.lines[: DETAIL_LINES * 4]]
        if len(rep.lines) > DETAIL_LINES * 4:
            case.details.append(f"    ... {len(rep.lines) - DETAIL_LINES * 4} more lines")
    la, lb = cli_log(ra, ta, work), cli_log(rb, tb, work)
    if la != lb:
        whats.append("CLI output (files listed / pass stats)")
        case.details.append("CLI output (files listed / pass stats):")
        case.details += ["    " + line.rstrip("\n") for line in difflib.unified_diff(la, lb, "ref", "against", n=1, lineterm="")]
    case.status = "differs" if whats else "identical"
    case.what = "; ".join(whats)


# -------------------------------------------------------------------------------------------
# main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:6]))
    parser.add_argument("--ref", default=DEFAULT_REF, help=f"git revision of the reference side (default {DEFAULT_REF})")
    parser.add_argument("--against", default=str(ROOT),
                        help=f"source tree compared with the reference (default: this working tree, {ROOT}); "
                             "a git revision instead of a folder is exported like --ref")
    parser.add_argument("--pipelines", action="append", help="comma-separated pipeline names (file stems); repeatable")
    parser.add_argument("--models", action="append", help="comma-separated model names (file stems); repeatable")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (default 1)")
    parser.add_argument("--keep", type=Path, help="keep the data, outputs and logs of both sides in this folder")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--samples", type=int, default=32, help="calibration images/samples per model (default 32)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run before it counts as failed")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter that runs both sides (needs the package's dependencies; default: this one)")
    args = parser.parse_args(argv)
    split = lambda vals: [v.strip() for val in vals or [] for v in val.split(",") if v.strip()]  # noqa: E731

    started = time.time()
    t0 = time.perf_counter()
    if args.keep:
        if args.keep.exists() and any(args.keep.iterdir()):
            parser.error(f"--keep {args.keep}: folder exists and is not empty")
        args.keep.mkdir(parents=True, exist_ok=True)
        work = args.keep.resolve()
    else:
        work = Path(tempfile.mkdtemp(prefix="amct-compare-"))
    ref_dir = Path(tempfile.mkdtemp(prefix="amct-compare-ref-")) / "tree"
    try:
        sha = export_ref(args.ref, ref_dir)
        if Path(args.against).is_dir():
            against_path = Path(args.against).resolve()
            head, note = describe_against(against_path)
        else:                                   # a revision: exported beside the reference tree
            against_path = ref_dir.parent / "against-tree"
            head = export_ref(args.against, against_path)
            note = f"git archive {head[:10]}"
        trees = {"ref": Tree("ref", ref_dir, args.ref, sha, f"git archive {sha[:10]}"),
                 "against": Tree("against", against_path, str(args.against), head, note)}
        for tree in trees.values():
            inspect_tree(tree, args.python, work)
        models = discover_models(split(args.models), work, args.samples)

        names = sorted(set(trees["ref"].pipelines) | set(trees["against"].pipelines))
        wanted = split(args.pipelines)
        unknown = [p for p in wanted if p not in names]
        if unknown:
            parser.error(f"--pipelines: unknown {', '.join(unknown)}; shipped: {', '.join(names)}")
        selected = [p for p in names if not wanted or p in wanted]

        cases: dict[tuple[str, str], Case] = {}
        for p in selected:
            for m in models:
                case = cases[(p, m.name)] = Case(p, m.name)
                for side in SIDES:
                    case.runs[side] = Run(side, p, m.name, work / side / p / m.name)
                if m.skip:
                    case.what = m.skip
                    continue
                missing = [s for s in SIDES if p not in trees[s].pipelines]
                if missing:
                    case.status = "differs"
                    case.what = f"pipeline file only in {'against' if missing == ['ref'] else 'ref'}"
                    continue
                needs_data = any(trees[s].pipelines[p]["datasets"] for s in SIDES)
                if needs_data and m.data is None:
                    case.what = f"no calibration data for {m.name}"
                    continue
                case.status = "pending"

        pending = [c for c in cases.values() if c.status == "pending"]
        qdq_cases = [c for c in pending if any(trees[s].pipelines[c.pipeline]["qdq_input"] for s in SIDES)]
        deps: dict[tuple[str, str], Case] = {}
        for c in qdq_cases:
            if (QDQ_SOURCE, c.model) not in cases:
                if not all(QDQ_SOURCE in trees[s].pipelines for s in SIDES):
                    c.status, c.what = "skipped", f"needs {QDQ_SOURCE}.yaml on both sides for its QDQ input"
                    continue
                dep = deps[(QDQ_SOURCE, c.model)] = Case(QDQ_SOURCE, c.model)
                for side in SIDES:
                    dep.runs[side] = Run(side, QDQ_SOURCE, c.model, work / side / QDQ_SOURCE / c.model)
        model_of = {m.name: m for m in models}
        size = lambda c: model_of[c.model].path.stat().st_size   # noqa: E731 - biggest first: better packing
        phase1 = sorted([c for c in pending if c not in qdq_cases] + list(deps.values()), key=size, reverse=True)
        phase2 = sorted([c for c in qdq_cases if c.status == "pending"], key=size, reverse=True)
        total = 2 * (len(phase1) + len(phase2))
        done = 0

        def launch(pool: futures.Executor, case: Case, side: str) -> futures.Future | None:
            run, model = case.runs[side], model_of[case.model]
            model_path = model.path
            if trees[side].pipelines[case.pipeline]["qdq_input"]:
                dep = (cases.get((QDQ_SOURCE, case.model)) or deps[(QDQ_SOURCE, case.model)]).runs[side]
                run.root.mkdir(parents=True, exist_ok=True)
                model_path = qdq_input(dep, run, case.model)
                if model_path is None:
                    return None
            return pool.submit(run_one, run, trees[side], model_path, model.data, args.python, work, args.timeout)

        print(f"compare_outputs: ref {args.ref} ({sha[:10]}) vs {against_path} ({note}); "
              f"{len(selected)} pipelines x {len(models)} models, {total} runs, --jobs {args.jobs}, "
              f"work folder {work}", file=sys.stderr)
        with futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for phase in (phase1, phase2):
                running = {}
                for case in phase:
                    for side in SIDES:
                        fut = launch(pool, case, side)
                        if fut is None:
                            done += 1
                            run = case.runs[side]
                            print(f"[{done}/{total}] {side:7s} {case.pipeline} {case.model}: not run ({run.not_run})",
                                  file=sys.stderr)
                        else:
                            running[fut] = (case, side)
                for fut in futures.as_completed(running):
                    run = fut.result()
                    done += 1
                    print(f"[{done}/{total}] {run.side:7s} {run.pipeline} {run.model}: exit {run.rc} "
                          f"in {run.seconds:.1f} s", file=sys.stderr)

        for case in cases.values():
            if case.status == "pending":
                compare_case(case, trees, work)
        for dep in deps.values():
            compare_case(dep, trees, work)
        elapsed = time.perf_counter() - t0

        # ---------------------------------------------------------------- report
        counts: dict[str, int] = {}
        for c in cases.values():
            counts[c.status] = counts.get(c.status, 0) + 1
        run_seconds = {s: sum(r.seconds for c in list(cases.values()) + list(deps.values())
                              for r in [c.runs[s]]) for s in SIDES}
        out = [f"## compare_outputs: `{args.ref}` ({sha[:10]}) vs `{args.against}` ({note})", "",
               f"{args.samples} calibration samples per model; {total} runs in {elapsed:.0f} s wall "
               f"(--jobs {args.jobs}); summed run time: ref {run_seconds['ref']:.0f} s, "
               f"against {run_seconds['against']:.0f} s", ""]
        model_names = [m.name for m in models]
        out.append("| pipeline | " + " | ".join(model_names) + " |")
        out.append("|---" * (len(model_names) + 1) + "|")
        notes: list[str] = []
        for p in selected:
            cells = []
            for m in model_names:
                c = cases[(p, m)]
                if c.status == "identical":
                    cells.append("identical")
                    continue
                notes.append(f"[{len(notes) + 1}] {p} x {m}: {c.status}: {c.what}")
                label = {"differs": "**differs**"}.get(c.status, c.status)
                short = c.what if c.status == "differs" and len(c.what) <= 60 else ""
                cells.append(f"{label}{f' ({short})' if short else ''} [{len(notes)}]")
            out.append(f"| {p} | " + " | ".join(cells) + " |")
        out.append("")
        out.append("Totals: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
        dep_diffs = [d for d in deps.values() if d.status not in ("identical",)]
        for d in dep_diffs:
            notes.append(f"[{len(notes) + 1}] {d.pipeline} x {d.model} (run only as the QDQ input): {d.status}: {d.what}")
        if notes:
            out += ["", "Notes:", ""] + [f"- {n}" for n in notes]
        detailed = [c for c in list(cases.values()) + dep_diffs if c.details]
        for c in detailed:
            out += ["", f"### {c.pipeline} x {c.model}: {c.status}", "", "```"]
            for line in c.details:
                out.append(line)
            out.append("```")
        print("\n".join(out))

        compared = [c for c in cases.values() if c.status != "skipped"]
        ok = bool(compared) and all(c.status in ("identical", "both-failed-identically") for c in compared) \
            and not any(d.status == "differs" for d in deps.values())
        if args.json:
            def run_json(r: Run) -> dict:
                return {"exit": r.rc, "seconds": round(r.seconds, 3), "not_run": r.not_run, "files": r.files(),
                        "errors": error_lines(r, trees[r.side], work) if r.rc not in (0, None) or r.not_run else []}

            doc = {"ref": {"rev": args.ref, "commit": sha}, "against": {"path": str(against_path), "commit": head,
                                                                        "note": note},
                   "python": args.python, "samples": args.samples, "jobs": args.jobs,
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                   "wall_seconds": round(elapsed, 1), "run_seconds": {s: round(v, 1) for s, v in run_seconds.items()},
                   "identical": ok, "totals": counts,
                   "skipped_models": {m.name: m.skip for m in models if m.skip},
                   "cases": [{"pipeline": c.pipeline, "model": c.model, "status": c.status, "what": c.what,
                              "details": c.details, "dependency_only": (c.pipeline, c.model) not in cases,
                              **({s: run_json(c.runs[s]) for s in SIDES} if c.status != "skipped" else {})}
                             for c in list(cases.values()) + list(deps.values())]}
            args.json.write_text(json.dumps(doc, indent=2) + "\n")
        if not compared:
            print("compare_outputs: nothing was compared (every case skipped)", file=sys.stderr)
            return 2
        return 0 if ok else 1
    finally:
        shutil.rmtree(ref_dir.parent, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"compare_outputs: outputs kept in {work}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
