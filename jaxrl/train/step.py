"""The one train-step builder every algorithm uses: loss function in, jitted sharded step out.

Gradients are computed in a `shard_map` that is manual over the data axes ('data', 'fsdp') and leaves
'tensor' to GSPMD, so the ZeRO collectives are the ones we write:
  stage 0/1: gradients all-reduced (`psum`);
  stage 2:   gradients reduce-scattered (`psum_scatter`) onto their ZeRO partition;
  stage 3:   parameters all-gathered before use; the gather's transpose reduce-scatters the gradients.
             The transformer's stacked layers are gathered one layer at a time inside its scan (forward,
             and again in the rematerialised backward), so that layer's gradient is reduce-scattered
             inside the backward scan: a device holds its shards plus about two layers of full
             parameters, never the whole model nor a full-size gradient tree. The vocabulary tables
             are not gathered whole either: the embedding looks the tokens up in each device's shard
             (ids all-gathered, rows all-to-all'd back), and the LM head gathers the vocabulary slice
             that `vocab_logits` asks for (one chunk at a time under `model.vocab_chunk`).
The optimizer update then runs under GSPMD with the optimizer state partitioned from stage 1 on.

The loss is averaged exactly as on one device: each loss function reports the denominator it averaged
over as `metrics["weight"]` (default: its rows), and the step weights every device by it.

Two parts: a `StateLayout` (the graph, where every piece of the TrainState lives, the state made from a
model) knows no loss; `train_step(states, loss_fn)` is the pure jitted step of one loss on it, and any
number of them share one state (`jaxrl.initialize`'s engine builds one per loss function). `Trainer` is
a StateLayout with one loss's step, what a role trains with. Neither reads the ZeRO stage: the layout's
spec trees say which parameters are partitioned (gathered before use) and which gradients scattered.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrl.models.transformer import Gathers, Transformer, set_gathers, shard_activations
from jaxrl.parallel.mesh import settle
from jaxrl.optim import window_grads
from jaxrl.parallel.sharding import DATA_AXES, Layout, layer_spec, manual_spec, path_keys, subtree, zero_dim
from jaxrl.precision import loss_scale_of, skipped_steps_of

LossFn = Callable[[nnx.Module, dict], tuple[jax.Array, dict]]


@struct.dataclass
class TrainState:
    params: dict  # trainable parameters (pure dict), laid out by Layout.param
    frozen: dict  # the rest of the model (e.g. base weights under LoRA-only training)
    opt_state: Any  # optax state, moments laid out by Layout.opt
    step: jax.Array  # () int32, micro-steps taken


def _is_spec(x):
    return isinstance(x, P)


def _pick(spec_tree: dict, like: dict) -> dict:
    """The specs of `spec_tree` at the leaf paths of `like` (a sub-tree of the same model)."""

    def lookup(path, _):
        return subtree(spec_tree, path_keys(path))

    return jax.tree_util.tree_map_with_path(lookup, like)


class StateLayout:
    """Where a model's TrainState lives, and how one is made; no loss, and no parameters held.

    Stage-agnostic: the ZeRO stage is already in `layout`'s spec trees; this only places state on them.
    One StateLayout serves any number of steps (one per loss, `train_step`) over the same state.

    Args:
      model: the NNX model (concrete or `nnx.eval_shape`'d); only its graph and shapes are kept.
      optimizer: optax transformation (from `jaxrl.optim.make_optimizer`).
      mesh: the training mesh; layout: the ZeRO layout (`jaxrl.parallel.sharding.zero_layout`).
      wrt: which variables train (`nnx.Param`, or `nnx.LoRAParam` to train only LoRA).
    """

    def __init__(self, model: nnx.Module, optimizer: optax.GradientTransformation, *, mesh, layout: Layout,
                 wrt=nnx.Param):
        self.mesh, self.layout, self.optimizer, self.wrt = mesh, layout, optimizer, wrt
        self.graphdef, params, frozen = self._split(model)
        self.specs = {
            "param": _pick(layout.param, params),
            "frozen": _pick(layout.param, frozen),
            "grad": _pick(layout.grad, params),
            "opt": _pick(layout.opt, params),
        }
        named = lambda tree: jax.tree.map(lambda s: NamedSharding(mesh, s), tree, is_leaf=_is_spec)  # noqa: E731
        abstract_opt = jax.eval_shape(optimizer.init, params)
        opt_shardings = optax.tree_utils.tree_map_params(
            optimizer, lambda _, s: s, abstract_opt, named(self.specs["opt"]),
            transform_non_params=lambda _: NamedSharding(mesh, P()),
            is_leaf=lambda x: isinstance(x, NamedSharding),
        )
        self.state_shardings = TrainState(
            params=named(self.specs["param"]), frozen=named(self.specs["frozen"]), opt_state=opt_shardings,
            step=NamedSharding(mesh, P()),
        )
        self.batch_sharding = NamedSharding(mesh, P(DATA_AXES))
        shapes = TrainState(params=params, frozen=frozen, opt_state=abstract_opt,
                            step=jax.ShapeDtypeStruct((), jnp.int32))
        self._abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                                      self.state_shardings)
        # Each Transformer (by path): one layer's parameter specs (layer axis dropped), and the vocabulary
        # tables it gathers itself under ZeRO-3: those split on their width E (the dimension a vocabulary
        # slice keeps whole), by that dimension. `deferred`: the key prefixes the step leaves sharded.
        self.layer_specs, self.table_dims, self.deferred = {}, {}, []
        for path, module in nnx.iter_graph(model):
            if not isinstance(module, Transformer):
                continue
            path, node = tuple(path), layout.param
            for key in path:
                node = node[key]
            self.layer_specs[path] = jax.tree.map(layer_spec, node["layers"], is_leaf=_is_spec)
            self.deferred.append((*path, "layers"))
            self.table_dims[path] = {}
            for name, leaf, width in (("embed", "embedding", 1), ("lm_head", "kernel", 0)):
                if name in node and zero_dim(node[name][leaf]) == width:
                    self.table_dims[path][name] = width
                    self.deferred.append((*path, name, leaf))

    def _split(self, model):
        graphdef, trainable, frozen = nnx.split(model, self.wrt, ...)
        return graphdef, nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)

    def init_state(self, model: nnx.Module) -> TrainState:
        """A TrainState holding `model`'s parameters, placed on the layout, with a fresh optimizer state.

        A model born in the layout is not copied: the state shares its buffers (and the first step, which
        donates the state, consumes them). Callable again, on any model of the same graph.
        """
        graphdef, params, frozen = self._split(model)
        if graphdef != self.graphdef:
            raise ValueError("init_state got a model of another graph than the one this StateLayout was built for")
        params = jax.device_put(params, self.state_shardings.params)
        frozen = jax.device_put(frozen, self.state_shardings.frozen)
        opt_state = jax.jit(self.optimizer.init, out_shardings=self.state_shardings.opt_state)(params)
        return TrainState(params=params, frozen=frozen, opt_state=opt_state,
                          step=jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings.step))

    def abstract_state(self) -> TrainState:
        """The TrainState as `jax.ShapeDtypeStruct`s carrying their shardings, for ahead-of-time lowering
        (`step.lower(self.abstract_state(), batch)`); allocates nothing, so it also serves a model built
        with `nnx.eval_shape` (as `jaxrl plan` does)."""
        return self._abstract

    def model(self, state: TrainState) -> nnx.Module:
        """The NNX model holding `state`'s parameters (shared buffers, no copy)."""
        return nnx.merge(self.graphdef, state.params, state.frozen)


def train_step(states: StateLayout, loss_fn: LossFn):
    """The pure jitted step `(state, batch) -> (state, metrics)` of `loss_fn` on `states`' layout.

    One micro-batch: gradients, and an optimizer update on every `grad_accum`-th call (optax.MultiSteps).
    The state is donated; its shardings in and out are `states.state_shardings`, the batch's rows are split
    over the data axes.
    """
    grads_fn = jax.shard_map(
        functools.partial(_local_grads, states, loss_fn), mesh=states.mesh,
        in_specs=(_manual(states.specs["param"]), _manual(states.specs["frozen"]), P(DATA_AXES), P()),
        out_specs=(_manual(states.specs["grad"]), P()),
        axis_names=set(DATA_AXES), check_vma=False,
    )

    def step(state: TrainState, batch: dict):
        scale = loss_scale_of(state.opt_state)
        grads, metrics = grads_fn(state.params, state.frozen, batch, scale)
        # Under accumulation, the norm of the window's gradient so far: at the window's last micro-batch,
        # that of the gradient the optimizer applies, what one step on the whole window would log.
        grad_norm = optax.tree.norm(window_grads(state.opt_state, grads)) / scale
        updates, opt_state = states.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=grad_norm,
                       loss_scale=loss_scale_of(opt_state), skipped_steps=skipped_steps_of(opt_state))
        return TrainState(params=params, frozen=state.frozen, opt_state=opt_state, step=state.step + 1), metrics

    return jax.jit(step, in_shardings=(states.state_shardings, states.batch_sharding),
                   out_shardings=(states.state_shardings, None), donate_argnums=0)


def eval_step(states: StateLayout, loss_fn: LossFn):
    """The jitted `(params, frozen, batch) -> metrics` of `loss_fn`, no update (GSPMD over the whole batch)."""

    def evaluate(params, frozen, batch):
        model = shard_activations(nnx.merge(states.graphdef, params, frozen), P(DATA_AXES))
        loss, metrics = loss_fn(model, batch)
        return dict(metrics, loss=loss)

    shardings = states.state_shardings
    return jax.jit(evaluate, in_shardings=(shardings.params, shardings.frozen, states.batch_sharding))


class Trainer(StateLayout):
    """A StateLayout with one loss's jitted step: the model it was built from, and how to train it.

    Args: as `StateLayout`, plus loss_fn: `(model, batch) -> (loss, metrics)`.
    """

    def __init__(self, model: nnx.Module, optimizer: optax.GradientTransformation, loss_fn: LossFn, *,
                 mesh, layout: Layout, wrt=nnx.Param):
        super().__init__(model, optimizer, mesh=mesh, layout=layout, wrt=wrt)
        self.loss_fn, self._model = loss_fn, model
        self._step = train_step(self, loss_fn)
        self._eval = eval_step(self, loss_fn)

    def init_state(self, model: nnx.Module | None = None) -> TrainState:
        """`StateLayout.init_state` of `model`, by default the model this Trainer was built from."""
        return super().init_state(self._model if model is None else model)

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One micro-batch: gradients, and an optimizer update on every `grad_accum`-th call."""
        return settle(self._step(state, batch))

    def evaluate(self, state: TrainState, batch: dict) -> dict:
        """The loss function's metrics on a batch, no update (GSPMD over the whole batch)."""
        return self._eval(state.params, state.frozen, batch)

    def lower(self, state, batch):
        return self._step.lower(state, batch)


# ---------------------------------------------------------------------------------------------- gradients
def _manual(tree):
    return jax.tree.map(manual_spec, tree, is_leaf=_is_spec)


def _local_grads(states: StateLayout, loss_fn: LossFn, params, frozen, batch, scale):
    """Per-device gradients of the scaled loss, reduced over the data axes as the layout says."""
    rows = jax.tree.leaves(batch)[0].shape[0]
    specs = states.specs

    scattered = _scattered_in_scan(states, params)
    whole = {path: (subtree(params, path), d) for path, d in scattered.items()}  # stage 2: replicated stacks

    def objective(p):
        model = nnx.merge(states.graphdef, _gather(states, p, specs["param"]),
                          _gather(states, frozen, specs["frozen"]))
        set_gathers(model, functools.partial(_gathers, states, whole=whole))
        loss, metrics = loss_fn(model, batch)
        weight = jax.lax.stop_gradient(jnp.asarray(metrics.get("weight", rows), jnp.float32))
        return loss * weight * scale, (loss, metrics, weight)

    # Stage 2's stacked layers are differentiated as this device's shard of each (`_whole_of` hands the
    # layer its replicated weights and reduce-scatters that layer's gradient in the backward scan).
    n = math.prod(states.mesh.shape[a] for a in DATA_AXES)
    shards = _map_at(params, scattered, lambda x, d: _own_shard(x, d, n))
    grads, (loss, metrics, weight) = jax.grad(objective, has_aux=True)(shards)
    total = jax.lax.psum(weight, DATA_AXES)
    grads = jax.tree_util.tree_map_with_path(
        lambda path, g, ps, gs: g if path_keys(path) in scattered else _reduce(g, ps, gs),  # scattered already
        grads, specs["param"], specs["grad"], is_leaf=_is_spec)
    grads = jax.tree.map(lambda g: g / total, grads)
    out = {k: jax.lax.psum(v * weight, DATA_AXES) / total for k, v in metrics.items() if k != "weight"}
    out["loss"] = jax.lax.psum(loss * weight, DATA_AXES) / total
    out["weight"] = total
    return grads, out


def _gather(states: StateLayout, tree, specs, *, whole=False):
    """A device's parameter shards -> whole parameters: every leaf partitioned over the data axes (ZeRO-3)
    is all-gathered; the rest (every leaf below stage 3) is already whole.

    What a Transformer fetches itself (its stacked layers, one at a time in its scan; its vocabulary
    tables, see `_gathers`) is left sharded, unless `whole`, which gathers every leaf of `tree`.
    """

    def gather(path, x, spec):
        d = zero_dim(spec)
        if d is None or (not whole and _is_deferred(states, path)):
            return x
        return jax.lax.all_gather(x, DATA_AXES, axis=d, tiled=True)

    return jax.tree_util.tree_map_with_path(gather, tree, specs, is_leaf=_is_spec)


def _is_deferred(states: StateLayout, path) -> bool:
    keys = path_keys(path)
    return any(keys[:len(prefix)] == prefix for prefix in states.deferred)


def _gathers(states: StateLayout, path, *, whole: dict) -> Gathers:
    """How the Transformer at `path` fetches the parameters the step left sharded (ZeRO-3), and, under
    stage 2, the replicated layers for the shards differentiated in their place (`whole`: stacked-leaf
    path -> (full stack, scatter dim)); a field is None when there is nothing of that kind to fetch."""
    specs, dims = states.layer_specs[path], states.table_dims[path]
    partitioned = any(zero_dim(s) is not None for s in jax.tree.leaves(specs, is_leaf=_is_spec))
    mine = {leaf[len(path) + 1:]: v for leaf, v in whole.items() if leaf[:len(path) + 1] == (*path, "layers")}

    def table(name, x):
        return jax.lax.all_gather(x, DATA_AXES, axis=dims[name], tiled=True) if name in dims else x

    def layer(params, index):
        if partitioned:
            params = _gather(states, params, _pick(specs, params), whole=True)
        return _map_at(params, mine, lambda shard, spec: _whole_of(shard, spec[0][index], spec[1] - 1))  # no layer axis

    return Gathers(layer=layer if partitioned or mine else None,
                   table=table if dims else None, lookup=lookup_in_shards if "embed" in dims else None)


def _scattered_in_scan(states: StateLayout, params) -> dict:
    """Stage 2's trained stacked layer leaves: {path: the dimension their gradient is scattered on} for
    each leaf under a Transformer's `layers` whose parameter is whole and whose gradient is partitioned."""
    out = {}
    flat = jax.tree_util.tree_flatten_with_path(states.specs["param"], is_leaf=_is_spec)[0]
    grads = jax.tree.leaves(states.specs["grad"], is_leaf=_is_spec)
    for (key_path, spec), grad_spec in zip(flat, grads):
        keys = path_keys(key_path)
        d = zero_dim(grad_spec)
        under_layers = any(keys[:len(prefix)] == prefix and prefix[-1] == "layers" for prefix in states.deferred)
        if under_layers and zero_dim(spec) is None and d is not None:
            out[keys] = d
    return out


def _map_at(tree: dict, where: dict, fn) -> dict:
    """`tree` (nested dicts) with the leaf at each path of `where` replaced by fn(leaf, where[path]); the
    dicts on those paths are copied, the rest shared. A path `tree` lacks is skipped (a LoRA leaf of a
    model run with its adapters off, as DPO's reference)."""
    out = dict(tree)
    for path, value in where.items():
        node = out
        for key in path[:-1]:
            if key not in node:
                break
            node[key] = dict(node[key])
            node = node[key]
        else:
            if path[-1] in node:
                node[path[-1]] = fn(node[path[-1]], value)
    return out


def _own_shard(x, d: int, n: int):
    """This device's tile of a replicated `x` along dimension d (of n over the data axes), in
    `psum_scatter(..., tiled=True)`'s order."""
    size = x.shape[d] // n
    return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(DATA_AXES) * size, size, axis=d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _whole_of(shard, whole, d: int):
    """`whole` (a replicated layer), as the value of `shard` (this device's tile of it along d): the
    forward uses the replicated weights as they are (no communication), and the backward reduce-scatters
    the layer's gradient onto the shard, inside the backward scan: stage 2 never holds a full-size
    gradient of the stacked layers."""
    return whole


def _whole_of_fwd(shard, whole, d):
    return whole, None


def _whole_of_bwd(d, _, ct):
    return jax.lax.psum_scatter(ct, DATA_AXES, scatter_dimension=d, tiled=True), jnp.zeros_like(ct)


_whole_of.defvjp(_whole_of_fwd, _whole_of_bwd)


def lookup_in_shards(table, ids):
    """Embedding rows from a table split on its width over the data axes, inside a shard_map manual over
    them: no device gathers the (V, E) table.

    Every device looks up all devices' tokens in its own columns, then an all-to-all hands each device
    its own rows' columns from every other:
        ids (B, T) -all-gather-> (n B, T) -take from (V, E / n)-> (n B, T, E / n) -all-to-all-> (B, T, E)
    The transposes route each token's gradient back to the devices holding its columns, where it is
    scatter-added into their (V, E / n) shard: that shard's gradient, already reduced.
    """
    every = jax.lax.all_gather(ids, DATA_AXES, axis=0, tiled=True)
    rows = jnp.take(table, every, axis=0)
    return jax.lax.all_to_all(rows, DATA_AXES, 0, rows.ndim - 1, tiled=True)


def _reduce(g, param_spec, grad_spec):
    """A gradient summed over the data axes onto its ZeRO partition (all-reduced where it is whole)."""
    if zero_dim(param_spec) is not None:
        return g  # the all-gather's transpose already reduce-scattered it
    d = zero_dim(grad_spec)
    if d is None:
        return jax.lax.psum(g, DATA_AXES)
    return jax.lax.psum_scatter(g, DATA_AXES, scatter_dimension=d, tiled=True)
