"""Conformance: every bundled WorkerLogic goes through the same checks.

For each WorkerLogic subclass defined in a module of examples/, REGISTRY holds a
tiny job (a logic instance or factory with fixed seeds, a small sample input,
the init and update the logic is meant for). Each registered logic must be

(a) serializable: a cloudpickle round trip of the instance or factory (and of a
    callable init or update) gives back a working logic of the same class;
(b) terminating on a finite input, through `transform` on 2 workers x 2 shards;
(c) fine with an empty input: the job finishes, creates no parameter, and
    outputs nothing but the logic's end-of-input summaries;
(d) deterministic for a fixed seed: two runs on 1 worker x 1 shard, with
    different PYTHONHASHSEEDs, give the same Right stream, in the same order,
    and the same multiset of Lefts. The input is longer than one feed batch
    (the sample repeated, or the entry's `long_records`), so that input chunks
    and pull answers interleave.
    A logic whose result depends on that interleaving by design (ratings that
    join a pull already on its way are learned together) says so in its entry
    (`schedule_dependent`): it runs under `with_pull_limit(logic, 1)`, which
    makes the runtime's schedule deterministic, and the check is about the
    logic's own seeds.

(e) and the in-process version of (a) to (d) that users run on their own logics,
    `psworker.testing.check_logic`, passes on each of them.

`test_every_logic_is_registered` fails when a WorkerLogic subclass of examples/
has no entry (or a base class no reason to have none), so nothing is left out
silently. An entry whose module is not in examples/ (yet) is skipped, with the
reason in the report.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import operator
import pkgutil
import sys
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import cloudpickle
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `examples` is a directory of the repo, not an installed package
    sys.path.insert(0, str(ROOT))

from conformance_inputs import TEXT, ratings, sparse_records  # noqa: E402

from examples.linear_model import param_init_for  # noqa: E402
from examples.mf import biased_init_spec  # noqa: E402
from examples.passive_aggressive import PassiveAggressive  # noqa: E402
from psclient import Left, Right, transform  # noqa: E402
from psworker import WorkerLogic, with_pull_limit  # noqa: E402
from psworker.testing import InProcessClient, canonical, check_logic  # noqa: E402

EXAMPLES_DIR = ROOT / "examples"
CHECK_TIMEOUT_S = 60
# More than one of psclient's feed batches (512 records) for the determinism check.
DETERMINISM_RECORDS = 600
SCHEDULE = (
    "ratings of an item whose pull is on its way are learned together, against one copy of the item: "
    "which ratings those are depends on when the answer arrives"
)


@dataclasses.dataclass
class Job:
    """A tiny job for one logic: what `transform` needs, with every seed fixed."""

    logic: Any  # a WorkerLogic instance or a zero-argument factory
    records: Callable[[], Iterable[Any]]  # the sample input (a fresh iterable per call)
    init: Any
    update: Any
    partition_by: Callable[[Any], Hashable] | None = None
    # True for an output the logic may emit on an empty input (an end-of-input summary).
    summary: Callable[[Any], bool] = lambda _out: False
    # Why two runs may differ at the runtime's default pull limit, when they may (see (d)).
    schedule_dependent: str | None = None
    # The input of the determinism check, when repeating the sample will not do.
    long_records: Callable[[], Iterable[Any]] | None = None


Builder = Callable[[type, ModuleType], Job]
REGISTRY: dict[str, Builder] = {}

# WorkerLogic subclasses of examples/ that are not meant to run as they are, and why.
NOT_RUNNABLE: dict[str, str] = {
    "examples.sketches:_SketchLogic": "base of CountMinLogic and BloomLogic; it has no sketch of its own",
    "examples.mf:FactorModel": "base of OnlineMF and BiasedMF: hyperparameters and users, no callbacks",
    "examples.mf:BiasedMF": "base of OnlineBiasedMF and OfflineMF; it has no on_recv",
    "examples.mf:ParkByItem": "base of OnlineMF and OnlineBiasedMF; it has no on_pull_recv",
    "examples.sparse_linear:SparseLinearLearner": "base of PassiveAggressive and LogisticRegression; "
    "update() is abstract",
}


def entry(target: str) -> Callable[[Builder], Builder]:
    def register(builder: Builder) -> Builder:
        assert target not in REGISTRY, f"{target} registered twice"
        REGISTRY[target] = builder
        return builder

    return register


# -- the sample inputs are in conformance_inputs.py; the end-of-input summaries ---------


def _summary_with_zero(key: str) -> Callable[[Any], bool]:
    return lambda out: isinstance(out, dict) and out.get(key) == 0


# -- the registry -----------------------------------------------------------------------


@entry("examples.wordcount:WordCount")
def _wordcount(cls: type, module: ModuleType) -> Job:
    return Job(cls, lambda: TEXT, "const:0", "add", summary=_summary_with_zero("words"))


@entry("examples.sketches:CountMinLogic")
def _count_min(cls: type, module: ModuleType) -> Job:
    logic = cls(depth=3, width=16, seed=1)
    return Job(logic, lambda: TEXT, logic.init, logic.update, summary=_summary_with_zero("words"))


@entry("examples.sketches:BloomLogic")
def _bloom(cls: type, module: ModuleType) -> Job:
    logic = cls(bits=64, hashes=3, seed=1)
    return Job(logic, lambda: TEXT, logic.init, logic.update, summary=_summary_with_zero("words"))


@entry("examples.online_mf:OnlineMF")
def _online_mf(cls: type, module: ModuleType) -> Job:
    logic = functools.partial(cls, rank=4, lr=0.05, reg=0.02, init_std=0.1, seed=3)
    return Job(
        logic,
        ratings,
        module.item_init_spec(4, 0.1, 3),
        "add",
        partition_by=operator.itemgetter(0),
        schedule_dependent=SCHEDULE,
    )


@entry("examples.online_biased_mf:OnlineBiasedMF")
def _movielens_online(cls: type, module: ModuleType) -> Job:
    logic = functools.partial(cls, rank=4, lr=0.03, reg=0.1, init_std=0.1, seed=3)
    return Job(
        logic,
        ratings,
        biased_init_spec(4, 0.1, 3),
        "add",
        partition_by=operator.itemgetter(0),
        schedule_dependent=SCHEDULE,
    )


def _is_eval_summary(out: Any) -> bool:
    """OfflineMF's per-epoch reports: (kind, worker, epoch, sum, count), all zero on no data."""
    return isinstance(out, tuple) and len(out) == 5 and out[0] in ("train", "test", "auc") and out[4] == 0


@entry("examples.offline_mf:OfflineMF")
def _movielens_offline(cls: type, module: ModuleType) -> Job:
    logic = functools.partial(cls, rank=4, lr=0.03, reg=0.1, init_std=0.1, seed=3, epochs=2, window=4)
    return Job(
        logic,
        lambda: ratings(60, held_out_every=5),
        biased_init_spec(4, 0.1, 3),
        "add",
        partition_by=operator.itemgetter(0),
        summary=_is_eval_summary,
        schedule_dependent=f"epoch 1, during the input pass: {SCHEDULE}",
    )


@entry("examples.passive_aggressive:PassiveAggressive")
def _passive_aggressive(cls: type, module: ModuleType) -> Job:
    classes = (0, 1, 2)  # multiclass: a vector per feature, from a callable init
    logic = functools.partial(cls, "PA-II", 0.1, classes, epochs=2)
    return Job(logic, lambda: sparse_records(classes=3), param_init_for(classes), "add")


@entry("examples.side_by_side:SideBySide")
def _side_by_side(cls: type, module: ModuleType) -> Job:
    learners = [PassiveAggressive(variant, 0.1, (0, 1)) for variant in ("PA", "PA-I", "PA-II")]
    return Job(cls(learners), sparse_records, param_init_for((0, 1)), "add")


@entry("examples.logistic_regression:LogisticRegression")
def _logistic_regression(cls: type, module: ModuleType) -> Job:
    # Binary, 64 buckets (features collide), two passes, the averaged model's accumulators too.
    logic = functools.partial(cls, 6, 0.1, 1e-3, (0, 1), epochs=2, average=True)
    return Job(logic, sparse_records, "const:0.0", "add")


@entry("examples.topk:TopK")
def _topk(cls: type, module: ModuleType) -> Job:
    rng = np.random.default_rng(13)
    items = {i: rng.normal(0.0, 1.0, 5).astype(np.float32) for i in range(DETERMINISM_RECORDS)}
    queries = rng.normal(0.0, 1.0, (3, 4))
    logic = cls(queries, 4, [set(), {1, 2, 3}, set(range(0, 600, 2))])
    return Job(
        logic,
        lambda: range(30),
        functools.partial(operator.getitem, items),  # the shards start with the "trained" item rows
        "replace",
        summary=lambda out: isinstance(out, tuple) and len(out) == 2 and out[1] == [],
        long_records=lambda: range(DETERMINISM_RECORDS),
    )


# These two run on the default shard, not under the server logic each is meant for.
@entry("examples.lock_server:LockedCounter")
def _locked_counter(cls: type, module: ModuleType) -> Job:
    out_together = "increments of a counter whose pulls are out together read the same value"
    return Job(cls, lambda: [i % 3 for i in range(30)], "const:0", "replace", schedule_dependent=out_together)


@entry("examples.server_optimizer:GradientMF")
def _gradient_mf(cls: type, module: ModuleType) -> Job:
    init = biased_init_spec(16, 0.1, 1)  # benchmarks.mf_common's
    return Job(cls, ratings, init, module.sgd_update, partition_by=operator.itemgetter(0), schedule_dependent=SCHEDULE)


# -- discovery --------------------------------------------------------------------------


def example_modules() -> list[str]:
    return sorted(f"examples.{info.name}" for info in pkgutil.iter_modules([str(EXAMPLES_DIR)]))


def logic_classes() -> dict[str, type]:
    """Every WorkerLogic subclass defined in a module of examples/, as `module:Class`."""
    found: dict[str, type] = {}
    for name in example_modules():
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, WorkerLogic) and obj.__module__ == name:
                found[f"{name}:{attr}"] = obj
    return found


def resolve(target: str) -> tuple[type, ModuleType]:
    module_name, _, class_name = target.partition(":")
    if module_name not in example_modules():
        pytest.skip(f"{module_name} is not in examples/ (yet): {target} not checked")
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name, None)
    assert inspect.isclass(cls) and issubclass(cls, WorkerLogic), f"{target} is not a WorkerLogic class"
    return cls, module


def build(target: str) -> tuple[type, Job]:
    cls, module = resolve(target)
    return cls, REGISTRY[target](cls, module)


def test_every_logic_is_registered() -> None:
    found = logic_classes()
    missing = sorted(set(found) - set(REGISTRY) - set(NOT_RUNNABLE))
    assert not missing, (
        f"WorkerLogic classes with no conformance entry: add them to REGISTRY (or NOT_RUNNABLE): {missing}"
    )
    present = set(example_modules())
    stale = sorted(t for t in [*REGISTRY, *NOT_RUNNABLE] if t.partition(":")[0] in present and t not in found)
    assert not stale, f"entries naming no WorkerLogic class of their module: {stale}"
    for target in NOT_RUNNABLE:
        if target in found:  # a base that is not abstract must at least be subclassed by a registered logic
            subclasses = [t for t, cls in found.items() if cls is not found[target] and issubclass(cls, found[target])]
            assert any(t in REGISTRY for t in subclasses), f"{target} is not run through any registered subclass"


# -- the checks -------------------------------------------------------------------------


def run(job: Job, records: Iterable[Any], workers: int, shards: int) -> tuple[list[Any], list[tuple[Any, Any]]]:
    """(outputs, model) of one job; asserts the stream's shape: Lefts, then Rights, no id twice."""
    items = list(transform(records, job.logic, job.init, job.update, workers, shards, partition_by=job.partition_by))
    kinds = [type(item) for item in items]
    assert set(kinds) <= {Left, Right}
    first_right = kinds.index(Right) if Right in kinds else len(kinds)
    assert Left not in kinds[first_right:], "a Left arrived after the first Right"
    model = [item.value for item in items[first_right:]]
    ids = [param_id for param_id, _ in model]
    assert len(ids) == len(set(ids)), "an id appears twice in the Right stream"
    return [item.value for item in items[:first_right]], model


def make_logic(logic: Any) -> WorkerLogic:
    return logic if isinstance(logic, WorkerLogic) else logic()


TARGETS = sorted(REGISTRY)


@pytest.mark.parametrize("target", TARGETS)
def test_serializable(target: str) -> None:
    cls, job = build(target)
    shipped = cloudpickle.loads(cloudpickle.dumps(job.logic))
    logic = make_logic(shipped)
    assert type(logic) is cls
    again = cloudpickle.loads(cloudpickle.dumps(make_logic(job.logic)))
    assert type(again) is cls
    if not isinstance(job.init, str):
        init = cloudpickle.loads(cloudpickle.dumps(job.init))
        assert canonical(init(0)) == canonical(job.init(0))
    if not isinstance(job.update, str):
        assert callable(cloudpickle.loads(cloudpickle.dumps(job.update)))
    # The round-tripped logic still works: it takes a record without touching the network.
    sink = InProcessClient(job.init, job.update)
    logic.open()
    logic.on_recv(next(iter(job.records())), sink)
    assert sink.pending or sink.model or sink.outputs, f"{target} did nothing with a record"


@pytest.mark.timeout(CHECK_TIMEOUT_S)
@pytest.mark.parametrize("target", TARGETS)
def test_terminates_on_a_finite_input(target: str) -> None:
    _, job = build(target)
    _, model = run(job, job.records(), workers=2, shards=2)
    assert model, f"{target} left no parameter after {sum(1 for _ in job.records())} records"


@pytest.mark.timeout(CHECK_TIMEOUT_S)
@pytest.mark.parametrize("target", TARGETS)
def test_handles_an_empty_input(target: str) -> None:
    _, job = build(target)
    outputs, model = run(job, [], workers=1, shards=1)
    assert model == [], f"{target} created parameters without any input"
    others = [out for out in outputs if not job.summary(out)]
    assert not others, f"{target} output more than end-of-input summaries on an empty input: {others[:5]}"


def repeated(records: Iterable[Any], n: int) -> list[Any]:
    sample = list(records)
    return [sample[i % len(sample)] for i in range(n)]


def pull_limit_one(logic: Any) -> Callable[[], WorkerLogic]:
    return lambda: with_pull_limit(make_logic(logic), 1)


@pytest.mark.timeout(2 * CHECK_TIMEOUT_S)
@pytest.mark.parametrize("target", TARGETS)
def test_deterministic_for_a_fixed_seed(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _, job = build(target)
    if job.schedule_dependent:  # the schedule is fixed: the sample is enough
        job = dataclasses.replace(job, logic=pull_limit_one(job.logic))
        records = list(job.records())
    else:
        records = list(job.long_records()) if job.long_records else repeated(job.records(), DETERMINISM_RECORDS)
        assert len(records) > 512, "the determinism input must span several feed batches"
    runs = []
    for hash_seed in ("1", "2"):  # the children inherit it: str hashes, set orders differ between the runs
        monkeypatch.setenv("PYTHONHASHSEED", hash_seed)
        runs.append(run(job, records, workers=1, shards=1))
    (first_out, first_model), (second_out, second_model) = runs
    first = [canonical(cell) for cell in first_model]
    second = [canonical(cell) for cell in second_model]
    assert sorted(first, key=repr) == sorted(second, key=repr), f"{target}: the final models differ"
    assert first == second, f"{target}: same final model, Right stream in another order"
    assert Counter(map(canonical, first_out)) == Counter(map(canonical, second_out)), f"{target}: outputs differ"


@pytest.mark.timeout(CHECK_TIMEOUT_S)
@pytest.mark.parametrize("target", TARGETS)
def test_check_logic_in_process(target: str) -> None:
    """The public kit's in-process version of the checks above passes on every bundled logic."""
    _, job = build(target)
    check_logic(job.logic, job.records(), param_init=job.init, param_update=job.update, summary=job.summary)
