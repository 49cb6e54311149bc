"""Collectives read from a compiled program's HLO text (`jitted.lower(*args).compile().as_text()`).

Each collective op is found by following calls from ENTRY, with how often it runs (the trip counts of the
while loops around it), its result bytes, the size of its device groups and the jax op_name XLA keeps
(named scopes and the jaxpr path). An all-reduce whose every use takes a dynamic slice of it is how
XLA:CPU compiles a reduce-scatter; it is reported as what it is, kind "all-reduce+slice", with the bytes of
the all-reduce that runs.
"""

import dataclasses
import math
import re
import warnings
from collections import defaultdict
from typing import NamedTuple

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute", "all-reduce+slice")
SLICED_ALL_REDUCE = "all-reduce+slice"
_COMPILED_KINDS = KINDS[:-1]  # opcodes; the last kind is a pattern of two of them

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([^\]]*)\]")  # f32[16,4], bf16[], f8e4m3fn[8]
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\)\s*->.*)?\{$")  # computation header line
_INSTR = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLS = re.compile(
    r"\b(calls|body|condition|to_apply|true_computation|false_computation|branch_computations|"
    r"called_computations)=(\{[^}]*\}|%?[\w.\-]+)"
)
_METADATA = re.compile(r"metadata=\{[^}]*\}")  # op names like "while/body/..." are not calls
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OPERAND = re.compile(r"%([\w.\-]+)")
_PARAMETER = re.compile(r"parameter\((\d+)\)")
# Device groups, in the three forms XLA prints: explicit lists, iota tiles, and named mesh axes.
_GROUPS_LIST = re.compile(r"(?:replica_groups|source_target_pairs)=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
# mesh['a'=2,'b'=4][, device_ids=([2,4]T(1,0))] {'a'}: the groups run along the named axes
_GROUPS_MESH = re.compile(
    r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?\s*\{([^}]*)\}"
)
# Ops a sliced all-reduce's value may pass through on the way to its dynamic slices.
_PASS_THROUGH = ("bitcast", "copy", "reshape", "get-tuple-element", "all-reduce-done")
_INDEX = re.compile(r"\bindex=(\d+)")


@dataclasses.dataclass(frozen=True)
class CollectiveOp:
    """One collective op of a compiled program."""

    kind: str  # one of KINDS
    name: str  # the HLO instruction's name
    bytes: int  # its result buffer per device, per execution
    executions: int  # per execution of the program: the product of the enclosing loops' trip counts
    loops: tuple[int, ...]  # trip counts of the while loops around it, outermost first
    group_size: int | None  # devices per group (None: not stated, e.g. collective-permute)
    op_name: str  # jax's op_name metadata: named scopes and the jaxpr path ("transpose(" in backward)
    # The device groups (partition ids, i.e. positions in the mesh's flat device order); a
    # collective-permute's (source, target) pairs. Empty where XLA does not state them.
    groups: tuple[tuple[int, ...], ...] = ()
    # Its elements: several for a tuple collective that XLA's combiners merged from ops of different
    # names (its op_name is then "prefix(name1:name2:...)", one name per element).
    parts: tuple["Part", ...] = ()


class Part(NamedTuple):
    """One element of a collective's result: a tuple all-reduce may be partly a sliced one."""

    kind: str
    op_name: str
    bytes: int
    dtype: str = ""  # the result's element type as HLO writes it ("f32", "bf16")
    dims: tuple[int, ...] = ()  # the result's shape per device


@dataclasses.dataclass(frozen=True)
class _Instr:
    name: str
    shape: str
    opcode: str
    tail: str  # the text after the opcode: operands, attributes, metadata
    operands: tuple[str, ...]


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string; tuples sum their elements, tokens and opaque shapes count 0."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 0)
        for dim in filter(None, dims.replace("<=", "").split(",")):
            size *= int(dim)
        total += size
    return int(total)


def _split_shape(rest: str) -> tuple[str, str]:
    """Split an instruction's right-hand side into (result shape, text after it)."""
    rest = re.sub(r"/\*.*?\*/", "", rest)  # tuple index comments: /*index=5*/
    if not rest.startswith("("):
        shape, _, tail = rest.partition(" ")
        return shape, tail
    depth = 0
    for i, ch in enumerate(rest):
        depth += ch in "({"
        depth -= ch in ")}"
        if depth == 0:
            return rest[: i + 1], rest[i + 1 :].lstrip()
    return rest, ""


def _tuple_elements(shape: str) -> list[str]:
    """Top-level elements of a tuple shape "(a, (b, c), d)" -> ["a", "(b, c)", "d"]."""
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(shape[1:-1], start=1):
        depth += ch in "({["
        depth -= ch in ")}]"
        if ch == "," and depth == 0:
            parts.append(shape[start:i].strip())
            start = i + 1
    return parts + [shape[start:-1].strip()]


def _result_elements(kind: str, shape: str, is_start: bool) -> list[str]:
    """The shapes of the collective's result buffer(s): one per element of a tuple collective.

    Async starts other than all-reduce-start return (operands, result, context...) tuples, e.g.
    `(f32[2], f32[16]) all-gather-start`, `((f32[8]), f32[1]) reduce-scatter-start`,
    `(f32[4], f32[4], u32[], u32[]) collective-permute-start`: the result is element 1.
    """
    if is_start and kind != "all-reduce" and shape.startswith("("):
        shape = _tuple_elements(shape)[1]
    return _tuple_elements(shape) if shape.startswith("(") else [shape]


def _instr(name: str, rhs: str) -> _Instr:
    shape, tail = _split_shape(rhs)
    opcode, _, args = tail.partition("(")
    operands = _OPERAND.findall(args.partition(")")[0])
    return _Instr(name, shape, opcode.strip(), tail, tuple(operands))


def _parse(hlo_text: str) -> tuple[str | None, dict[str, list[_Instr]]]:
    """(entry name, {computation name: its instructions})."""
    entry, comps, current = None, {}, None
    for line in hlo_text.splitlines():
        if (header := _HEADER.match(line)) and not line[0].isspace():
            current = comps.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None and (instr := _INSTR.match(line)):
            current.append(_instr(*instr.groups()))
    return entry, comps


def _iota(dims: str, perm: str | None) -> np.ndarray:
    """XLA's iota tile [d0,d1,...]T(perm): arange over the dims, transposed."""
    shape = [int(d) for d in dims.split(",")]
    ids = np.arange(math.prod(shape)).reshape(shape)
    return ids.transpose([int(p) for p in perm.split(",")]) if perm else ids


def _groups(tail: str) -> tuple[tuple[int, ...], ...]:
    """The op's device groups (a collective-permute's source-target pairs); () where none are stated."""
    if m := _GROUPS_LIST.search(tail):
        return tuple(
            tuple(int(i) for i in g.split(",") if i) for g in re.findall(r"\{([\d,]*)\}", m.group(1))
        )
    if m := _GROUPS_IOTA.search(tail):
        ids = _iota(m.group(3), m.group(4)).reshape(int(m.group(1)), int(m.group(2)))
        return tuple(map(tuple, ids.tolist()))
    if m := _GROUPS_MESH.search(tail):
        sizes = {a: int(n) for a, n in re.findall(r"'(\w+)'=(\d+)", m.group(1))}
        ids = _iota(m.group(2), m.group(3)) if m.group(2) else np.arange(math.prod(sizes.values()))
        ids = ids.reshape(list(sizes.values()))
        along = [list(sizes).index(a) for a in re.findall(r"'(\w+)'", m.group(4))]
        rest = [i for i in range(len(sizes)) if i not in along]
        ids = ids.transpose(rest + along).reshape(-1, math.prod(ids.shape[i] for i in along))
        return tuple(map(tuple, ids.tolist()))
    return ()


def _group_size(tail: str) -> int | None:
    if "source_target_pairs" in tail:
        return None
    groups = _groups(tail)
    return len(groups[0]) if groups and groups[0] else None


def _parts(op_name: str, kinds: list[str], elements: list[str]) -> tuple[Part, ...]:
    """One Part per element; a combined op's "prefix(a:b:c)" names one element each."""
    sizes = [_shape_bytes(e) for e in elements]
    names = _combined_names(op_name)
    if len(names) != len(sizes):
        names = [op_name] * len(sizes)
    arrays = [_ARRAY.search(e) for e in elements]
    dtypes = [a.group(1) if a else "" for a in arrays]
    dims = [tuple(int(d) for d in a.group(2).replace("<=", "").split(",") if d) if a else () for a in arrays]
    return tuple(map(Part, kinds, names, sizes, dtypes, dims))


def _combined_names(op_name: str) -> list[str]:
    """ "p/(a:b(c))" -> ["p/a", "p/b(c)"]: the names XLA joined when it combined ops; [] if not combined."""
    if not op_name.endswith(")"):
        return []
    depth = 0
    for start in range(len(op_name) - 1, -1, -1):  # the "(" matching the final ")"
        depth += {")": 1, "(": -1}.get(op_name[start], 0)
        if depth == 0:
            break
    names = _split_names(op_name[start + 1 : -1])
    return [op_name[:start] + name for name in names] if len(names) > 1 else []


def _split_names(text: str) -> list[str]:
    """Split "a:b(c:d):e" at the top-level colons only."""
    names, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == ":" and depth == 0:
            names.append(text[start:i])
            start = i + 1
    return names + [text[start:]]


class _Uses:
    """Who reads each instruction's value, within a computation and into the fusions it calls."""

    def __init__(self, comps: dict[str, list[_Instr]]):
        self.comps = comps
        self.users: dict[str, dict[str, list[tuple[_Instr, int]]]] = {}

    def of(self, comp: str, name: str) -> list[tuple[_Instr, int]]:
        if comp not in self.users:
            table = defaultdict(list)
            for instr in self.comps.get(comp, ()):
                for i, operand in enumerate(instr.operands):
                    table[operand].append((instr, i))
            self.users[comp] = table
        return self.users[comp].get(name, [])

    def parameter(self, comp: str, index: int) -> str | None:
        """The name of `comp`'s parameter number `index`."""
        for instr in self.comps.get(comp, ()):
            if (
                instr.opcode == "parameter"
                and (m := _PARAMETER.match(instr.tail))
                and int(m.group(1)) == index
            ):
                return instr.name
        return None

    def element_sliced(self, comp: str, name: str, index: int) -> bool:
        """only_sliced for element `index` of a tuple `name`: every get-tuple-element of it is sliced."""
        reads = [
            user
            for user, _ in self.of(comp, name)
            if user.opcode == "get-tuple-element" and (m := _INDEX.search(user.tail)) and int(m[1]) == index
        ]
        return bool(reads) and all(self.only_sliced(comp, read.name) for read in reads)

    def only_sliced(self, comp: str, name: str, depth: int = 0) -> bool:
        """True when every use of `name` in `comp` ends in a dynamic-slice (through bitcasts, copies,
        tuple elements, or the parameter of a fusion that slices it)."""
        users = self.of(comp, name)
        if not users or depth > 8:
            return False
        for user, index in users:
            if user.opcode == "dynamic-slice" and index == 0:
                continue
            if user.opcode in _PASS_THROUGH and self.only_sliced(comp, user.name, depth + 1):
                continue
            if user.opcode == "fusion" and (called := re.search(r"calls=%?([\w.\-]+)", user.tail)):
                param = self.parameter(called.group(1), index)
                if param and self.only_sliced(called.group(1), param, depth + 1):
                    continue
            return False
        return True


def collective_ops(hlo_text: str) -> list[CollectiveOp]:
    """Every collective op of one compiled program, with how often it runs per execution.

    An async start/done pair is one op (its start carries the result). A while body's ops run its
    `known_trip_count` times (present on CPU/GPU since at least jax 0.10; a loop without one counts once,
    a lower bound, with a warning naming the loop).
    Both branches of a conditional are listed.
    """
    entry, comps = _parse(hlo_text)
    uses = _Uses(comps)
    memo: dict[str, list[CollectiveOp]] = {}

    def visit(comp: str) -> list[CollectiveOp]:
        if comp in memo:
            return memo[comp]
        found = []
        for instr in comps.get(comp, ()):
            base = instr.opcode.removesuffix("-start")
            # An async start carries the result; its wrapped computation is not followed.
            if base in _COMPILED_KINDS:
                kind = base
                if base == "all-reduce" and uses.only_sliced(comp, instr.name):
                    kind = SLICED_ALL_REDUCE
                op_name = m.group(1) if (m := _OP_NAME.search(instr.tail)) else ""
                elements = _result_elements(base, instr.shape, instr.opcode.endswith("-start"))
                kinds = [kind] * len(elements)
                if base == "all-reduce" and kind != SLICED_ALL_REDUCE and len(elements) > 1:
                    kinds = [
                        SLICED_ALL_REDUCE if uses.element_sliced(comp, instr.name, i) else base
                        for i in range(len(elements))
                    ]
                parts = _parts(op_name, kinds, elements)
                nbytes = sum(part.bytes for part in parts)
                groups, size = _groups(instr.tail), _group_size(instr.tail)
                found.append(CollectiveOp(kind, instr.name, nbytes, 1, (), size, op_name, groups, parts))
                continue
            if instr.opcode in ("async-update", "async-done"):  # the async-start already followed the callee
                continue
            trips = _TRIP_COUNT.search(instr.tail) if instr.opcode == "while" else None
            if instr.opcode == "while" and trips is None and visit(_body(instr.tail)):
                warnings.warn(
                    f"HLO loop {instr.name} states no trip count: the collectives inside it are counted once "
                    "per execution of the program, a lower bound",
                    stacklevel=2,
                )
            for attr, callees in _CALLS.findall(_METADATA.sub("", instr.tail)):
                times = int(trips.group(1)) if trips and attr == "body" else 1
                loop = (times,) if instr.opcode == "while" and attr == "body" else ()
                for callee in re.findall(r"[\w.\-]+", callees.replace("%", "")):
                    found += [
                        dataclasses.replace(op, executions=times * op.executions, loops=loop + op.loops)
                        for op in visit(callee)
                    ]
        memo[comp] = found
        return found

    return visit(entry) if entry else []


def _body(tail: str) -> str:
    """The body computation's name of a while instruction (empty where none is named)."""
    m = re.search(r"body=%?([\w.\-]+)", _METADATA.sub("", tail))
    return m.group(1) if m else ""


def totals(ops: list[CollectiveOp], per_execution: bool = True) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} for every kind, zeros included: per execution of the program, or with
    `per_execution=False` one per op as written (a loop body counted once)."""
    sums = {kind: {"count": 0, "bytes": 0} for kind in KINDS}
    for op in ops:
        times = op.executions if per_execution else 1
        sums[op.kind]["count"] += times
        sums[op.kind]["bytes"] += times * op.bytes
    return sums


def collectives(hlo_text: str, per_execution: bool = True) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} for every collective kind, zeros included, in one compiled program.

    Bytes are each op's result buffer per device (all-reduce: the reduced buffer; all-gather: the gathered
    size; reduce-scatter: the scattered shard). `per_execution=True` counts a while body's ops once per
    trip, so an nn.scan over 12 layers counts its collectives 12x: per device per call of the program.
    """
    return totals(collective_ops(hlo_text), per_execution)
