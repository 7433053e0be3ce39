"""One object turns (strategy, world size, requested degrees) into the grid dp x tp x pp.

Rank layout follows DeepSpeed's topologies, so the groups here are the groups its engines
use: `PipeDataParallelTopology` orders axes (pipe, data), `PipeModelDataParallelTopology`
(pipe, data, model), and for the non-pipelined strategies tensor-parallel groups are runs
of contiguous ranks: rank = (p * dp + d) * tp + t in every case.
"""
from __future__ import annotations

from dataclasses import dataclass

from gptbench.config import STRATEGIES
from gptbench.errors import NotApplicable, UserError

DEFAULT_DEGREE = 2  # tp=2 for tensor_data_hybrid, pp=2 for pipelines (docs/deepspeed-notes.md)


@dataclass(frozen=True)
class Grid:
    world_size: int
    dp: int
    tp: int
    pp: int

    def __post_init__(self):
        if self.dp * self.tp * self.pp != self.world_size:
            raise UserError(f"topology: dp*tp*pp = {self.dp}*{self.tp}*{self.pp} = "
                            f"{self.dp * self.tp * self.pp}, but world_size is {self.world_size}")

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pipe stage, data replica, tensor rank) of a global rank."""
        return rank // (self.dp * self.tp), rank // self.tp % self.dp, rank % self.tp

    def rank(self, p: int, d: int, t: int) -> int:
        return (p * self.dp + d) * self.tp + t

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank(p, d, t) for t in range(self.tp)]
                for p in range(self.pp) for d in range(self.dp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank(p, d, t) for p in range(self.pp)]
                for d in range(self.dp) for t in range(self.tp)]

    def output_ranks(self) -> list[int]:
        """One rank per replica whose tokens and logits stand for the replica."""
        return [self.rank(self.pp - 1, d, 0) for d in range(self.dp)]


def make_grid(strategy: str, world_size: int, tp: int | None, pp: int | None) -> Grid:
    """The grid of `strategy` on `world_size` ranks, or NotApplicable/UserError saying why."""
    if strategy == "pure_data_parallel":
        if (tp or 1) != 1 or (pp or 1) != 1:
            raise UserError(f"topology: pure_data_parallel shards nothing; got tp={tp} pp={pp} "
                            "(use tensor_data_hybrid / pipeline_data_hybrid)")
        return Grid(world_size, world_size, 1, 1)
    if strategy == "tensor_data_hybrid":
        tp = tp or min(DEFAULT_DEGREE, world_size)
        _need("tensor_data_hybrid", "tp", tp, world_size)
        _divides("tp", tp, world_size)
        return Grid(world_size, world_size // tp, tp, 1)
    if strategy == "pipeline_data_hybrid":
        pp = pp or min(DEFAULT_DEGREE, world_size)
        _need("pipeline_data_hybrid", "pp", pp, world_size)
        _divides("pp", pp, world_size)
        return Grid(world_size, world_size // pp, 1, pp)
    if strategy == "full_model_parallel":
        tp, pp = tp or DEFAULT_DEGREE, pp or DEFAULT_DEGREE
        if tp < 2 or pp < 2 or tp * pp > world_size:
            raise NotApplicable(
                f"full_model_parallel needs tp>=2 and pp>=2, so at least {max(tp, 2) * max(pp, 2)} "
                f"ranks; this run has {world_size} (tp={tp}, pp={pp})")
        _divides("tp*pp", tp * pp, world_size)
        return Grid(world_size, world_size // (tp * pp), tp, pp)
    raise UserError(f"strategy: unknown '{strategy}'")


def _need(strategy: str, name: str, degree: int, world_size: int) -> None:
    if world_size < 2 and degree >= 2:
        raise NotApplicable(f"{name}={degree} needs at least {degree} ranks; "
                            f"this run has {world_size}")
    if world_size < 2:
        raise NotApplicable(f"{strategy} needs {name}>=2, so at least 2 ranks; "
                            f"this run has {world_size}")
    if degree < 2:
        raise NotApplicable(f"{strategy} needs {name}>=2; got {name}={degree}")


def _divides(name: str, degree: int, world_size: int) -> None:
    if world_size % degree:
        raise UserError(f"topology.{name}={degree} does not divide world_size={world_size}")


def check_against_model(grid: Grid, n_head: int, n_layer: int) -> None:
    if grid.tp > n_head:
        raise UserError(f"topology.tp={grid.tp} exceeds the model's n_head={n_head}")
    if grid.pp > n_layer:
        raise UserError(f"topology.pp={grid.pp} exceeds the model's {n_layer} blocks")


def applicable_grids(world_size: int, n_head: int, n_layer: int) -> list[tuple[str, Grid]]:
    """Every (strategy, grid) that `make_grid` and `check_against_model` accept on
    `world_size` ranks for some explicit degrees: what `gptbench run` would run, in the
    order strategy, tp, pp. `gptbench plan` lists exactly these."""
    if world_size < 1:
        raise UserError(f"gpus must be >= 1, got {world_size}")
    degrees = [None] + [k for k in range(1, world_size + 1) if world_size % k == 0]
    out, seen = [], set()
    for strategy in STRATEGIES:
        for tp in degrees:
            for pp in degrees:
                try:
                    grid = make_grid(strategy, world_size, tp, pp)
                    check_against_model(grid, n_head, n_layer)
                except (UserError, NotApplicable):
                    continue
                if (strategy, grid) not in seen:
                    seen.add((strategy, grid))
                    out.append((strategy, grid))
    return sorted(out, key=lambda sg: (STRATEGIES.index(sg[0]), sg[1].tp, sg[1].pp))


def micro_batches(grid: Grid, batch_size: int, requested: int | None) -> int:
    """Micro-batches per pipeline step: the requested number, else pp (enough to fill the
    pipeline), never more than the batch; the batch must divide by it (eval_batch splits
    it evenly). 1 without a pipeline."""
    if grid.pp == 1:
        if requested not in (None, 1):
            raise UserError(f"topology.micro_batches={requested} applies to pipelines only "
                            f"(pp=1 here)")
        return 1
    m = requested or min(grid.pp, batch_size)
    if batch_size % m:
        raise UserError(f"workload.batch_size={batch_size} is not divisible by "
                        f"topology.micro_batches={m}")
    return m


def check_schedule(schedule: str, grid: Grid, m: int) -> None:
    """The in-flight pipeline schedule needs a micro-batch for every stage to keep busy."""
    if grid.pp > 1 and schedule == "in_flight" and m < grid.pp:
        raise UserError(
            f"topology.pipeline_schedule=in_flight needs micro_batches >= pp: {m} "
            f"micro-batch(es) cannot keep {grid.pp} stages busy (raise workload.batch_size / "
            f"topology.micro_batches, or use topology.pipeline_schedule=flush)")
