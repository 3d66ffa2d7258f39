"""Where the time of a compiled refinement step goes, per kind of XLA op.

    python bench/profile_refine.py                 # 256², weights step
    python bench/profile_refine.py --size 64 --frozen

The step is refine_bench.py's: config-f stand-in generator, MSE +
LPIPS-Alex, batch 1, the weights step (one forward, both losses, both
backward passes, both Adam updates) inside a compiled loop of `--steps`
steps, run once to warm up and once under `jax.profiler.trace`. Every
event of the trace that names an instruction of the compiled program is
charged to that instruction's kind, read from the program's HLO and its
source metadata:

  * convolution: the generator's convolutions (forward), 1×1 ones (dots)
    included;
  * convolution, transposed: their derivatives, i.e. the convolutions
    JAX's transpose made (input gradients);
  * convolution, weight gradient (taps): the matrix products JAX's
    transpose made of ops' per-tap weight tangents (CPU);
  * blur (upfirdn): the depthwise FIR convolutions (feature_group_count > 1)
    of up-sampling and blurring, forward and backward;
  * modulation/demodulation: everything else of `ops.modulated_conv` (style
    scaling, demodulation's sum of squares and rsqrt), both directions;
  * LPIPS-Alex: every op whose source is the LPIPS network, both directions;
  * other: the rest (activations, noise, losses, Adam, copies).

FLOPs are counted from the HLO (2 · output elements · kernel taps · input
channels per group for a convolution, 2·M·N·K for a dot; elementwise ops
are not counted; an input-dilated convolution's count includes the
products with its inserted zeros, 4× the useful ones for the forward
transposed convolution). Printed: a markdown table of seconds, share of the op
time and GFLOP/s per kind. On a shared machine the seconds are upper
bounds; the shares are the result.
"""
import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import refine_bench  # noqa: E402
from dhr_jax import precision  # noqa: E402

KINDS = ("convolution", "convolution, transposed",
         "convolution, weight gradient (taps)", "blur (upfirdn)",
         "modulation/demodulation", "LPIPS-Alex", "other")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)(?:\{[^}]*\})? "
                    r"([\w\-]+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")


@dataclasses.dataclass
class Instr:
  name: str
  shape: str
  opcode: str
  rest: str
  computation: str


def _dims(shape):
  m = re.match(r"\w+\[([\d,]*)\]", shape)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def parse_hlo(text):
  """{name: Instr} of every instruction and {computation: [Instr]}."""
  instrs, comps, comp = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m and "=" not in line.split("(")[0]:
      comp = m.group(1)
      continue
    m = _INSTR.match(line)
    if m:
      i = Instr(m.group(1), m.group(2), m.group(3), m.group(4), comp)
      instrs[i.name] = i
      comps[comp].append(i)
  return instrs, comps


def _operands(instr):
  return re.findall(r"%([\w.\-]+)", instr.rest.split("),")[0])


def flops(instr, instrs):
  """2·MACs of a convolution or dot (0 for other ops)."""
  ops = _operands(instr)
  if instr.opcode == "convolution" and len(ops) >= 2 and ops[1] in instrs:
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.rest)
    rhs = _dims(instrs[ops[1]].shape)
    if not labels or len(rhs) != len(labels.group(2)):
      return 0
    rl = labels.group(2)
    taps = np.prod([rhs[k] for k, c in enumerate(rl) if c.isdigit()])
    cin = rhs[rl.index("i")]
    return 2.0 * np.prod(_dims(instr.shape)) * taps * cin
  if instr.opcode == "dot" and len(ops) >= 2 and ops[0] in instrs:
    lhs = _dims(instrs[ops[0]].shape)
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.rest)
    k = np.prod([lhs[int(d)] for d in m.group(1).split(",") if d]) if m else 1
    return 2.0 * np.prod(_dims(instr.shape)) * k
  return 0


def stack_tables(text):
  """{stack_frame_id: [(file, function), ...]} (innermost first) from the
  HLO text's FileNames / FunctionNames / FileLocations / StackFrames."""
  tables, table = collections.defaultdict(dict), None
  for line in text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations",
                "StackFrames"):
      table = line
      continue
    m = re.match(r"^(\d+) (.*)$", line) if table else None
    if not m:
      table = None if not line.strip() else table
      continue
    tables[table][int(m.group(1))] = m.group(2)
  num = lambda s, k: int(re.search(k + r"=(\d+)", s).group(1))
  frames = {}
  for k in tables["StackFrames"]:
    chain, seen, j = [], set(), k
    while j in tables["StackFrames"] and j not in seen:
      seen.add(j)
      entry = tables["StackFrames"][j]
      loc = tables["FileLocations"][num(entry, "file_location_id")]
      chain.append((tables["FileNames"][num(loc, "file_name_id")].strip('"'),
                    tables["FunctionNames"][num(loc, "function_name_id")]
                    .strip('"')))
      j = num(entry, "parent_frame_id")
    frames[k] = chain
  return frames


def _stack(instr, frames):
  m = re.search(r"stack_frame_id=(\d+)", instr.rest)
  return frames.get(int(m.group(1)), []) if m else []


def kind_of(instr, instrs, comps, frames):
  """(kind, flops) of a top-level instruction (fusions: by their ops)."""
  inner = [instr]
  called = re.search(r"calls=%?([\w.\-]+)", instr.rest)
  if called and instr.opcode in ("fusion", "call", "custom-call"):
    inner = comps.get(called.group(1), []) or [instr]
  total = sum(flops(i, instrs) for i in inner)
  stacks = [_stack(i, frames) for i in inner]
  files = {os.path.basename(f) for st in stacks for f, _ in st}
  functions = {fn for st in stacks for _, fn in st}
  names = [re.search(r'op_name="([^"]*)"', i.rest) for i in inner]
  names = [n.group(1) for n in names if n]
  convs = [i for i in inner if i.opcode in ("convolution", "dot")]
  if "lpips.py" in files or any("LPIPSNet" in n for n in names):
    return "LPIPS-Alex", total
  if any("feature_group_count" in i.rest for i in convs):
    return "blur (upfirdn)", total
  if convs:
    back = any("transpose(" in n for n in names)
    if back and all(i.opcode == "dot" for i in convs):
      return "convolution, weight gradient (taps)", total
    return ("convolution, transposed" if back else "convolution"), total
  if "modulated_conv" in functions:
    return "modulation/demodulation", total
  return "other", total


def describe(instr, instrs, comps):
  """The shapes, window and layout of an instruction's convolutions or
  dots (what --top prints to tell them apart)."""
  called = re.search(r"calls=%?([\w.\-]+)", instr.rest)
  inner = comps.get(called.group(1), []) if called else []
  parts = []
  for i in inner or [instr]:
    if i.opcode not in ("convolution", "dot"):
      continue
    shapes = [instrs[o].shape for o in _operands(i) if o in instrs]
    extra = re.findall(r"(window=\{[^}]*\}|dim_labels=\S+?,|"
                       r"feature_group_count=\d+|lhs_contracting_dims=\{[^}]*\})",
                       i.rest)
    parts.append(f"{i.opcode} {' '.join(shapes)} -> {i.shape} "
                 f"{' '.join(extra)}")
  return "; ".join(parts)


def trace_events(log_dir):
  path = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"),
                   recursive=True)
  data = json.load(gzip.open(path[0]))
  return [e for e in data["traceEvents"] if e.get("ph") == "X"]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--size", type=int, default=256)
  ap.add_argument("--steps", type=int, default=2)
  ap.add_argument("--frozen", action="store_true",
                  help="the offset step (weights frozen) instead")
  ap.add_argument("--top", type=int, default=0,
                  help="also list the N most expensive instructions")
  args = ap.parse_args(argv)
  precision.set_default()  # float32, as run.py and refine_bench.py
  from dhr_jax import refine
  G, codes, target, mask, net, lp, hyper = refine_bench.problem(
      args.size, 1, True)
  spec = refine.refine_spec(G, refine.default_feature_idx(args.size),
                            "hybrid", net)
  if args.frozen:
    spec = dataclasses.replace(spec, weights_frozen=True)
  run, state = refine_bench.step_program(spec, G, codes, target, mask, lp,
                                         hyper, args.steps)
  text = run.as_text()
  instrs, comps = parse_hlo(text)
  frames = stack_tables(text)
  jax.block_until_ready(run(state, codes, target, mask))  # warm
  with tempfile.TemporaryDirectory() as log_dir:
    t0 = time.perf_counter()
    with jax.profiler.trace(log_dir):
      jax.block_until_ready(run(state, codes, target, mask))
    wall = (time.perf_counter() - t0) / args.steps
    events = trace_events(log_dir)
  seconds, gflop = collections.Counter(), collections.Counter()
  per_instr = collections.Counter()
  counted = set()
  for e in events:
    name = e["name"].split(":")[0].lstrip("%")
    if name not in instrs:
      continue
    kind, f = kind_of(instrs[name], instrs, comps, frames)
    seconds[kind] += e["dur"] * 1e-6 / args.steps
    per_instr[(name, kind)] += e["dur"] * 1e-6 / args.steps
    gflop[kind] += f * 1e-9 / args.steps
    counted.add(name)
  op_time = sum(seconds.values())
  print(f"# {args.size}², batch 1, {'offset' if args.frozen else 'weights'}"
        f" step, jax {jax.__version__}, {os.cpu_count()} CPUs; step "
        f"{wall:.2f} s (wall, under the profiler), op time {op_time:.2f} s "
        f"over {len(counted)} instructions")
  print("| kind | seconds | share | GFLOP | GFLOP/s |")
  print("|---|---|---|---|---|")
  for k in KINDS:
    s = seconds.get(k, 0.0)
    g = gflop.get(k, 0.0)
    rate = f"{g / s:.1f}" if s and g else "–"
    print(f"| {k} | {s:.3f} | {100 * s / max(op_time, 1e-12):.1f}% | "
          f"{g:.1f} | {rate} |")
  tot = sum(gflop.values())
  print(f"| all | {op_time:.3f} | 100% | {tot:.1f} | "
        f"{tot / max(op_time, 1e-12):.1f} |")
  for (name, kind), s in per_instr.most_common(args.top):
    print(f"# {s:.4f} s {kind}: {name} {instrs[name].opcode} "
          f"{describe(instrs[name], instrs, comps)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
