"""A Beam job read from its runner-API proto, as a runner sees it: the leaf steps and their environments
(where Beam puts a step's resource hints), the fused stages a runner can form between materialisations,
what lies on the paths between two steps, and the objects pickled into the job. Used by the graph tests
of the local builds (tests/test_pipeline.py, tests/test_reindex.py) and the Dataflow translation tests
(tests/test_dataflow_jobs.py)."""

from __future__ import annotations

import base64
import bz2
import pickletools
import zlib
from dataclasses import dataclass

from apache_beam.portability import common_urns, python_urns
from apache_beam.portability.api import beam_runner_api_pb2

GROUP_BY_KEY = common_urns.primitives.GROUP_BY_KEY.urn
IMPULSE = common_urns.primitives.IMPULSE.urn
FLATTEN = common_urns.primitives.FLATTEN.urn
PAR_DO = common_urns.primitives.PAR_DO.urn
COMBINES = {common_urns.composites.COMBINE_PER_KEY.urn, common_urns.composites.COMBINE_GLOBALLY.urn,
            common_urns.combine_components.COMBINE_PER_KEY_PRECOMBINE.urn,
            common_urns.combine_components.COMBINE_PER_KEY_MERGE_ACCUMULATORS.urn,
            common_urns.combine_components.COMBINE_PER_KEY_EXTRACT_OUTPUTS.urn,
            common_urns.combine_components.COMBINE_GROUPED_VALUES.urn}
PICKLED = {python_urns.PICKLED_DOFN_INFO, python_urns.PICKLED_DOFN, python_urns.PICKLED_COMBINE_FN,
           python_urns.PICKLED_CODER, python_urns.PICKLED_WINDOWFN, python_urns.PICKLED_VIEWFN,
           python_urns.PICKLED_WINDOW_MAPPING_FN, python_urns.PICKLED_SOURCE, python_urns.PICKLED_TRANSFORM}
ACCELERATOR = common_urns.resource_hints.ACCELERATOR.urn


@dataclass(frozen=True)
class Pickled:
    """One object pickled into the job: where (a step's label and role, or a coder's id), its URN and
    the pickle stream itself (decoded from Beam's base64 and compression)."""

    where: str
    urn: str
    stream: bytes


class JobGraph:
    """The leaf steps of a pipeline proto, with the edges between them, and the fused stages a runner
    can form (``stages``): steps joined by main inputs, within one environment, with no GroupByKey (a
    Reshuffle, a combine) between them and no side input of one computed from the other. A Flatten
    joins its producers to its consumers (runners fuse through it)."""

    def __init__(self, proto: beam_runner_api_pb2.Pipeline):
        self.proto = proto
        components = proto.components
        self.leaves = {tid: t for tid, t in components.transforms.items() if not t.subtransforms}
        self.producer = {pcoll: tid for tid, t in self.leaves.items() for pcoll in t.outputs.values()}
        self.side_inputs, self.main_inputs = {}, {}
        for tid, t in self.leaves.items():
            tags = set(beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload).side_inputs) \
                if t.spec.urn == PAR_DO else set()
            self.side_inputs[tid] = [pcoll for tag, pcoll in t.inputs.items() if tag in tags]
            self.main_inputs[tid] = [pcoll for tag, pcoll in t.inputs.items() if tag not in tags]
        self._stages = None

    @classmethod
    def of(cls, job) -> "JobGraph":
        """From a pipeline proto, or a Beam pipeline (translated with ``to_runner_api``)."""
        if isinstance(job, beam_runner_api_pb2.Pipeline):
            return cls(job)
        return cls(job.to_runner_api())

    def label(self, tid: str) -> str:
        return self.leaves[tid].unique_name

    def labels(self) -> set[str]:
        return {t.unique_name for t in self.leaves.values()}

    def find(self, suffix: str) -> str:
        """The one leaf whose label ends with ``suffix``."""
        found = [tid for tid, t in self.leaves.items() if t.unique_name.endswith(suffix)]
        assert len(found) == 1, f"{len(found)} steps end with {suffix!r}: {sorted(map(self.label, found))}"
        return found[0]

    def environment(self, tid: str) -> str:
        return self.leaves[tid].environment_id

    def hints(self, tid: str) -> dict[str, str]:
        """The resource hints of the step's environment, by URN."""
        env = self.environment(tid)
        if not env:
            return {}
        return {k: v.decode() for k, v in self.proto.components.environments[env].resource_hints.items()}

    def is_boundary(self, tid: str) -> bool:
        return self.leaves[tid].spec.urn in (GROUP_BY_KEY, IMPULSE)

    def _producers(self, pcoll: str) -> list[str]:
        """The steps whose output reaches ``pcoll`` through Flattens only."""
        tid = self.producer.get(pcoll)
        if tid is None:
            return []
        if self.leaves[tid].spec.urn == FLATTEN:
            return [p for inner in self.leaves[tid].inputs.values() for p in self._producers(inner)]
        return [tid]

    def order(self) -> list[str]:
        """The leaf ids, each after the producers of its inputs."""
        done, order = set(), []

        def visit(tid):
            if tid in done:
                return
            done.add(tid)
            for pcoll in self.main_inputs[tid] + self.side_inputs[tid]:
                if pcoll in self.producer:
                    visit(self.producer[pcoll])
            order.append(tid)

        for tid in sorted(self.leaves):
            visit(tid)
        return order

    def stages(self) -> list[frozenset[str]]:
        """The fused stages (sets of leaf ids; Flattens and boundaries are in none), fused greedily
        as Beam's own fuser does: a consumer joins its producer's stage unless a GroupByKey or an
        Impulse lies between them, their environments differ, one consumes a side input computed
        downstream of the other, or the consumer also depends on the stage through a step outside it
        (in each case the stage would have to finish before itself)."""
        if self._stages is None:
            downstream = {tid: set() for tid in self.leaves}  # side inputs computed from each step's output
            for pcoll in {p for tid in self.leaves for p in self.side_inputs[tid]}:
                for tid in self.ancestors([pcoll]):
                    downstream[tid].add(pcoll)
            root, members, down, sides = {}, {}, {}, {}
            upstream = {tid: self.ancestors(self.main_inputs[tid] + self.side_inputs[tid]) for tid in self.leaves}

            def find(x):
                while root[x] != x:
                    root[x] = root[root[x]]
                    x = root[x]
                return x

            for tid in self.order():
                if self.is_boundary(tid) or self.leaves[tid].spec.urn == FLATTEN:
                    continue
                root[tid], members[tid] = tid, {tid}
                down[tid], sides[tid] = set(downstream[tid]), set(self.side_inputs[tid])
                for pcoll in self.main_inputs[tid]:
                    for source in self._producers(pcoll):
                        if source not in root or self.environment(source) != self.environment(tid):
                            continue
                        a, b = find(source), find(tid)
                        if a == b or down[a] & sides[b] or down[b] & sides[a]:
                            continue
                        outside = upstream[tid] - members[a] - members[b]
                        if any(upstream[x] & members[a] for x in outside  # a path leaves the stage, returns
                               if self.leaves[x].spec.urn != FLATTEN):
                            continue
                        root[b] = a
                        members[a] |= members.pop(b)
                        down[a] |= down.pop(b)
                        sides[a] |= sides.pop(b)
            self._stages = [frozenset(m) for m in members.values()]
        return self._stages

    def stage_of(self, tid: str) -> frozenset[str]:
        return next(s for s in self.stages() if tid in s)

    def ancestors(self, pcolls) -> set[str]:
        """Every step that ``pcolls`` depend on, through main and side inputs."""
        seen, todo = set(), list(pcolls)
        while todo:
            tid = self.producer.get(todo.pop())
            if tid is None or tid in seen:
                continue
            seen.add(tid)
            todo += self.main_inputs[tid] + self.side_inputs[tid]
        return seen

    def between(self, a: str, b: str) -> set[str]:
        """The steps on main-input paths from step ``a`` to step ``b`` (both excluded)."""
        forward, todo = set(), [a]
        while todo:
            outputs = set(self.leaves[todo.pop()].outputs.values())
            for other, pcolls in self.main_inputs.items():
                if other not in forward and outputs & set(pcolls):
                    forward.add(other)
                    todo.append(other)
        backward, todo = set(), [b]
        while todo:
            for pcoll in self.main_inputs[todo.pop()]:
                tid = self.producer.get(pcoll)
                if tid is not None and tid not in backward:
                    backward.add(tid)
                    todo.append(tid)
        return (forward & backward) - {a, b}

    def pickled(self) -> list[Pickled]:
        """Every Python object pickled into the job: the DoFns and CombineFns of its steps (with their
        arguments and the side inputs' view functions), its coders and window functions."""
        found = []
        for tid, t in self.proto.components.transforms.items():
            name = t.unique_name
            if t.spec.urn == PAR_DO:
                payload = beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload)
                found.append((f"{name}: do_fn", payload.do_fn))
                for tag, side in payload.side_inputs.items():
                    found += [(f"{name}: side input {tag} view_fn", side.view_fn),
                              (f"{name}: side input {tag} window_mapping_fn", side.window_mapping_fn)]
            elif t.spec.urn in COMBINES:
                found.append((f"{name}: combine_fn", beam_runner_api_pb2.CombinePayload.FromString(
                    t.spec.payload).combine_fn))
        found += [(f"coder {cid}", c.spec) for cid, c in self.proto.components.coders.items()]
        found += [(f"windowing {wid}", w.window_fn) for wid, w in self.proto.components.windowing_strategies.items()]
        return [Pickled(where, spec.urn, pickle_stream(spec.urn, spec.payload)) for where, spec in found
                if spec.urn in PICKLED]


def pickle_stream(urn: str, payload: bytes) -> bytes:
    """The pickle stream inside a pickled FunctionSpec's payload: base64 of bz2 (zlib for coders,
    which come as ``ClassName$base64`` in a BytesValue)."""
    if urn == python_urns.PICKLED_CODER:
        from google.protobuf import wrappers_pb2

        payload = wrappers_pb2.BytesValue.FromString(payload).value.split(b"$", 1)[1]
    data = base64.b64decode(payload)
    return bz2.decompress(data) if data[:3] == b"BZh" else zlib.decompress(data)


def pickle_strings(stream: bytes) -> set[str]:
    """Every string the pickle stream carries (each text constant its opcodes push)."""
    kinds = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
    return {arg if isinstance(arg, str) else arg.decode("latin-1")
            for op, arg, _ in pickletools.genops(stream) if op.name in kinds}


def encoding_waits_for_extraction(job) -> bool:
    """Whether encoding must wait for every image's extraction: true when a side input of an Encode
    step (the model, the shard sizing) depends on anything computed in the fused stage the main
    extraction's network runs in. Such a side input exists only once that whole stage has run, so
    encoding cannot fuse with extraction and every image's raw features are held. (A training build
    extracts its sample behind a Reshuffle of its own, ExtractTrainingSample: the model may depend on
    that bounded sample.) ``job``: a Beam pipeline or its proto."""
    graph = JobGraph.of(job)
    stage = graph.stage_of(graph.find("/ExtractImages/Extract/ParDo(ExtractFeatures)"))
    encodes = [tid for tid in graph.leaves if graph.label(tid).endswith("ParDo(EncodeImages)")]
    assert encodes, "no Encode step in the graph"
    return bool(graph.ancestors([p for tid in encodes for p in graph.side_inputs[tid]]) & stage)


def step_labels(job) -> set[str]:
    """The full labels of every leaf step of a Beam graph (a pipeline or its proto)."""
    return JobGraph.of(job).labels()
