"""Grids: which dp x tp x pp each strategy forms, and a rank layout equal to DeepSpeed's."""
import itertools

import pytest
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology, PipeModelDataParallelTopology

from gptbench import autotp
from gptbench.errors import NotApplicable, UserError
from gptbench.topology import Grid, check_against_model, make_grid

WORLDS = (1, 2, 4, 8)


def degrees(grid: Grid) -> tuple:
    return grid.world_size, grid.dp, grid.tp, grid.pp


# ---- defaults ---------------------------------------------------------------------------

@pytest.mark.parametrize("world", WORLDS)
def test_pure_data_parallel_is_all_replicas(world):
    assert degrees(make_grid("pure_data_parallel", world, None, None)) == (world, world, 1, 1)
    assert degrees(make_grid("pure_data_parallel", world, 1, 1)) == (world, world, 1, 1)


@pytest.mark.parametrize("tp, pp", [(2, None), (None, 2)])
def test_pure_data_parallel_refuses_sharding_degrees(tp, pp):
    with pytest.raises(UserError, match="pure_data_parallel"):
        make_grid("pure_data_parallel", 4, tp, pp)


@pytest.mark.parametrize("world, dp", [(2, 1), (4, 2), (8, 4)])
def test_tensor_data_hybrid_defaults_to_tp2(world, dp):
    assert degrees(make_grid("tensor_data_hybrid", world, None, None)) == (world, dp, 2, 1)


@pytest.mark.parametrize("world, dp", [(2, 1), (4, 2), (8, 4)])
def test_pipeline_data_hybrid_defaults_to_pp2(world, dp):
    assert degrees(make_grid("pipeline_data_hybrid", world, None, None)) == (world, dp, 1, 2)


@pytest.mark.parametrize("world, dp", [(4, 1), (8, 2)])
def test_full_model_parallel_defaults_to_tp2_pp2(world, dp):
    assert degrees(make_grid("full_model_parallel", world, None, None)) == (world, dp, 2, 2)


@pytest.mark.parametrize("strategy", ["tensor_data_hybrid", "pipeline_data_hybrid"])
def test_one_rank_cannot_shard(strategy):
    with pytest.raises(NotApplicable) as e:
        make_grid(strategy, 1, None, None)
    assert strategy in str(e.value) and "at least 2 ranks; this run has 1" in str(e.value)


@pytest.mark.parametrize("strategy, tp, pp, name, degree", [
    ("tensor_data_hybrid", 3, None, "tp", 3), ("pipeline_data_hybrid", None, 4, "pp", 4)])
def test_a_degree_beyond_one_rank_names_the_ranks_it_needs(strategy, tp, pp, name, degree):
    with pytest.raises(NotApplicable) as e:
        make_grid(strategy, 1, tp, pp)
    assert str(e.value) == f"{name}={degree} needs at least {degree} ranks; this run has 1"


@pytest.mark.parametrize("world", [1, 2])
def test_full_model_parallel_needs_four_ranks(world):
    with pytest.raises(NotApplicable) as e:
        make_grid("full_model_parallel", world, None, None)
    msg = str(e.value)
    assert "at least 4 ranks" in msg and f"has {world}" in msg


def test_not_applicable_is_a_user_error():
    assert issubclass(NotApplicable, UserError)


# ---- explicit degrees -------------------------------------------------------------------

@pytest.mark.parametrize("strategy, world, tp, pp, want", [
    ("tensor_data_hybrid", 4, 4, None, (4, 1, 4, 1)),
    ("tensor_data_hybrid", 8, 4, None, (8, 2, 4, 1)),
    ("tensor_data_hybrid", 8, 8, None, (8, 1, 8, 1)),
    ("tensor_data_hybrid", 2, 2, None, (2, 1, 2, 1)),
    ("pipeline_data_hybrid", 4, None, 4, (4, 1, 1, 4)),
    ("pipeline_data_hybrid", 8, None, 4, (8, 2, 1, 4)),
    ("pipeline_data_hybrid", 8, None, 8, (8, 1, 1, 8)),
    ("full_model_parallel", 8, 2, 4, (8, 1, 2, 4)),
    ("full_model_parallel", 8, 4, 2, (8, 1, 4, 2)),
    ("full_model_parallel", 8, 2, 2, (8, 2, 2, 2)),
])
def test_explicit_degrees(strategy, world, tp, pp, want):
    assert degrees(make_grid(strategy, world, tp, pp)) == want


@pytest.mark.parametrize("strategy, world, tp, pp, name, degree", [
    ("tensor_data_hybrid", 4, 3, None, "tp", 3),
    ("tensor_data_hybrid", 8, 3, None, "tp", 3),
    ("pipeline_data_hybrid", 4, None, 3, "pp", 3),
    ("pipeline_data_hybrid", 2, None, 4, "pp", 4),
    ("full_model_parallel", 8, 3, 2, "tp*pp", 6),
])
def test_degrees_not_dividing_world_show_the_numbers(strategy, world, tp, pp, name, degree):
    with pytest.raises(UserError) as e:
        make_grid(strategy, world, tp, pp)
    assert not isinstance(e.value, NotApplicable)
    msg = str(e.value)
    assert f"{name}={degree}" in msg and f"world_size={world}" in msg


@pytest.mark.parametrize("strategy, tp, pp", [("tensor_data_hybrid", 1, None),
                                              ("pipeline_data_hybrid", None, 1),
                                              ("full_model_parallel", 1, 2),
                                              ("full_model_parallel", 2, 1)])
def test_degree_one_is_not_that_strategy(strategy, tp, pp):
    with pytest.raises(NotApplicable):
        make_grid(strategy, 4, tp, pp)


def test_unknown_strategy():
    with pytest.raises(UserError, match="strategy"):
        make_grid("zero3", 2, None, None)


def test_grid_checks_the_product_and_shows_the_numbers():
    with pytest.raises(UserError) as e:
        Grid(world_size=4, dp=2, tp=2, pp=2)
    msg = str(e.value)
    assert "2*2*2" in msg and "8" in msg and "world_size is 4" in msg
    Grid(world_size=8, dp=2, tp=2, pp=2)


# ---- rank layout ------------------------------------------------------------------------

ALL_GRIDS = [(s, w) for s in ("pure_data_parallel", "tensor_data_hybrid", "pipeline_data_hybrid",
                               "full_model_parallel") for w in WORLDS
             if not (s != "pure_data_parallel" and w == 1)
             and not (s == "full_model_parallel" and w < 4)]


@pytest.mark.parametrize("strategy, world", ALL_GRIDS)
def test_coords_and_rank_are_inverse_and_groups_partition_the_world(strategy, world):
    g = make_grid(strategy, world, None, None)
    coords = [g.coords(r) for r in range(world)]
    assert sorted(coords) == sorted(itertools.product(range(g.pp), range(g.dp), range(g.tp)))
    assert all(g.rank(*c) == r for r, c in enumerate(coords))
    for groups, size in ((g.tp_groups(), g.tp), (g.pp_groups(), g.pp)):
        assert all(len(x) == size for x in groups)
        assert sorted(r for x in groups for r in x) == list(range(world))
    assert len(g.output_ranks()) == g.dp
    assert all(g.coords(r)[0] == g.pp - 1 and g.coords(r)[2] == 0 for r in g.output_ranks())


@pytest.mark.parametrize("world, pp", [(2, 2), (4, 2), (4, 4), (8, 2), (8, 4), (8, 8)])
def test_pipeline_layout_equals_deepspeed(world, pp):
    g = make_grid("pipeline_data_hybrid", world, None, pp)
    topo = PipeDataParallelTopology(num_pp=g.pp, num_dp=g.dp)
    for r in range(world):
        c = topo.get_coord(r)
        assert g.coords(r) == (c.pipe, c.data, 0)
        assert g.rank(c.pipe, c.data, 0) == topo.get_rank(pipe=c.pipe, data=c.data)
    assert sorted(g.pp_groups()) == sorted(topo.get_axis_comm_lists("pipe"))
    assert sorted(g.tp_groups()) == [[r] for r in range(world)]


@pytest.mark.parametrize("world, tp, pp", [(4, 2, 2), (8, 2, 2), (8, 2, 4), (8, 4, 2)])
def test_full_model_parallel_layout_equals_deepspeed(world, tp, pp):
    g = make_grid("full_model_parallel", world, tp, pp)
    topo = PipeModelDataParallelTopology(num_pp=g.pp, num_mp=g.tp, num_dp=g.dp)
    for r in range(world):
        c = topo.get_coord(r)
        assert g.coords(r) == (c.pipe, c.data, c.model)
        assert g.rank(*g.coords(r)) == topo.get_rank(pipe=c.pipe, data=c.data, model=c.model)
    assert sorted(g.tp_groups()) == sorted(topo.get_axis_comm_lists("model"))
    assert sorted(g.pp_groups()) == sorted(topo.get_axis_comm_lists("pipe"))


@pytest.mark.parametrize("world, tp", [(2, 2), (4, 2), (8, 2), (8, 4)])
def test_tensor_groups_are_contiguous_runs(world, tp):
    g = make_grid("tensor_data_hybrid", world, tp, None)
    assert g.tp_groups() == [list(range(s, s + tp)) for s in range(0, world, tp)]
    assert g.output_ranks() == list(range(0, world, tp))
    # the same layout as DeepSpeed's model axis with a single pipeline stage
    topo = PipeModelDataParallelTopology(num_pp=1, num_mp=tp, num_dp=world // tp)
    assert sorted(g.tp_groups()) == sorted(topo.get_axis_comm_lists("model"))


def test_pipeline_output_ranks_are_last_stage():
    g = make_grid("pipeline_data_hybrid", 4, None, 2)  # ranks 0,1 stage 0; 2,3 stage 1
    assert g.output_ranks() == [2, 3]
    assert g.pp_groups() == [[0, 2], [1, 3]]


# ---- model limits and head split --------------------------------------------------------

def test_tp_larger_than_heads_is_refused():
    with pytest.raises(UserError) as e:
        check_against_model(make_grid("tensor_data_hybrid", 8, 8, None), n_head=5, n_layer=4)
    assert "topology.tp=8" in str(e.value) and "n_head=5" in str(e.value)
    check_against_model(make_grid("tensor_data_hybrid", 4, 4, None), n_head=5, n_layer=4)


def test_pp_larger_than_layers_is_refused():
    with pytest.raises(UserError) as e:
        check_against_model(make_grid("pipeline_data_hybrid", 8, None, 8), n_head=5, n_layer=4)
    assert "topology.pp=8" in str(e.value) and "4" in str(e.value)
    check_against_model(make_grid("pipeline_data_hybrid", 4, None, 4), n_head=5, n_layer=4)


@pytest.mark.parametrize("n_head, tp, want", [(5, 2, [3, 2]), (5, 4, [2, 1, 1, 1]),
                                              (25, 2, [13, 12]), (25, 4, [7, 6, 6, 6]),
                                              (12, 4, [3, 3, 3, 3]), (5, 1, [5])])
def test_heads_per_rank(n_head, tp, want):
    assert autotp.heads_per_rank(n_head, tp) == want


@pytest.mark.parametrize("n_head, n_embd, tp", [(5, 80, 2), (5, 80, 4), (25, 1600, 2),
                                                (25, 1600, 4)])
def test_heads_per_rank_is_deepspeeds_split(n_head, n_embd, tp):
    """The split reported in the record is the one AutoTP applies (grain = head_dim)."""
    from deepspeed.module_inject.tp_shard import AutoTPMeta, get_shard_size_list
    from transformers import GPT2Config

    head_dim = n_embd // n_head
    meta = AutoTPMeta.from_model_config(GPT2Config(n_head=n_head, n_embd=n_embd),
                                        tp_grain_size=head_dim)
    widths = get_shard_size_list(n_embd, tp, meta, "attn.c_proj")
    assert [w // head_dim for w in widths] == autotp.heads_per_rank(n_head, tp)


# ---- the rules plan and run share ------------------------------------------------------

def test_applicable_grids_are_what_make_grid_accepts():
    from gptbench.topology import applicable_grids

    grids = {(s, g.dp, g.tp, g.pp) for s, g in applicable_grids(3, n_head=25, n_layer=48)}
    assert grids == {("pure_data_parallel", 3, 1, 1), ("tensor_data_hybrid", 1, 3, 1),
                     ("pipeline_data_hybrid", 1, 1, 3)}
    # The tiny model's 5 heads and 4 blocks bound tp and pp.
    grids = {(s, g.tp, g.pp) for s, g in applicable_grids(8, n_head=5, n_layer=4)}
    assert ("tensor_data_hybrid", 8, 1) not in grids and ("tensor_data_hybrid", 4, 1) in grids
    assert ("pipeline_data_hybrid", 1, 8) not in grids and ("pipeline_data_hybrid", 1, 4) in grids
    assert [s for s, _ in applicable_grids(1, 25, 48)] == ["pure_data_parallel"]


def test_micro_batches_rule():
    from gptbench.topology import Grid, check_schedule, micro_batches

    pipe = Grid(2, 1, 1, 2)
    assert micro_batches(pipe, 4, None) == 2
    assert micro_batches(pipe, 1, None) == 1      # never more than the batch
    assert micro_batches(pipe, 4, 4) == 4
    with pytest.raises(UserError, match="batch_size=3 is not divisible by topology.micro_batches=2"):
        micro_batches(pipe, 3, None)
    with pytest.raises(UserError, match="pipelines only"):
        micro_batches(Grid(2, 1, 2, 1), 4, 2)
    check_schedule("in_flight", pipe, 2)
    with pytest.raises(UserError, match="micro_batches >= pp"):
        check_schedule("in_flight", pipe, 1)
    check_schedule("flush", pipe, 1)
