"""Where every array lives: parameter PartitionSpecs named by shape, chosen by ZeRO stage and mesh.

Mesh axes are ('data', 'fsdp', 'tensor'). ZeRO partitions over the data-parallel axes ('data', 'fsdp')
together, as DeepSpeed partitions over all data-parallel ranks:
  stage 0: parameters, gradients and optimizer state replicated over them;
  stage 1: optimizer state sharded over them;
  stage 2: gradients sharded as well (reduce-scattered);
  stage 3: parameters sharded as well (FSDP).
'tensor' shards attention heads and MLP width (Megatron column/row split) at every stage.

The transformer's blocks are stacked on a leading layer axis (`layers.*` parameters of shape (L, ...)):
that axis is never sharded (the scan slices it), so their specs are (None, *per-layer spec) and the ZeRO
dimension is chosen among the others.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import PartitionSpec as P

DATA_AXES = ("data", "fsdp")  # the axes a batch (and ZeRO's partitioning) is split over
TENSOR = "tensor"


def data_parallel_size(mesh) -> int:
    """The number of data-parallel groups: a batch's rows, and ZeRO's partitions, split this many ways."""
    return math.prod(mesh.shape[a] for a in DATA_AXES)


@dataclasses.dataclass(frozen=True)
class ModelShardings:
    """PartitionSpecs for the model's parameters, named by shape suffix (per layer: a stacked block
    parameter gets a leading None for its layer axis).

    D model width, E embedding width, V vocab, X a projection's output width (heads*head_dim or the MLP
    width), P positions. The default is fully replicated.
    """

    embed_ve: P = P()
    pos_pd: P = P()
    proj_ed: P = P()  # OPT project_in [E, D]
    proj_de: P = P()  # OPT project_out [D, E]
    in_dx: P = P()  # column-parallel kernels: q, k, v, gate, up, fc1
    bias_x: P = P()
    out_xd: P = P()  # row-parallel kernels: o, down, fc2
    vec_d: P = P()  # norms and row-parallel biases
    head_ev: P = P()
    score_e1: P = P()


def model_shardings(*, shard_params: bool, tensor: bool = True) -> ModelShardings:
    """The parameter layout: FSDP over the data axes when `shard_params` (ZeRO-3), heads/MLP over 'tensor'."""
    f = DATA_AXES if shard_params else None
    t = TENSOR if tensor else None
    return ModelShardings(
        embed_ve=P(t, f),
        pos_pd=P(None, f),
        proj_ed=P(None, f),
        proj_de=P(f, None),
        in_dx=P(f, t),
        bias_x=P(t),
        out_xd=P(t, f),
        vec_d=P(),
        head_ev=P(f, t),
        score_e1=P(f, None),
    )


def fit_spec(spec: P, shape: tuple[int, ...], mesh) -> P:
    """Drops mesh axes from `spec` on dimensions they do not divide (e.g. GPT-2's vocab of 50257)."""
    if mesh is None or mesh.empty:
        return spec
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        names = tuple(a for a in names if a in mesh.shape)
        size = math.prod(mesh.shape[a] for a in names)
        out.append(None if not names or dim % size else (names if len(names) > 1 else names[0]))
    return P(*out)


def current_mesh():
    """The mesh set by `jax.set_mesh`, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def spec_tree(abstract_state):
    """PartitionSpecs of an abstract (eval_shape'd) nnx state, as a pure dict; P() where unsharded."""
    from flax import nnx

    def spec(x):
        sharding = getattr(x, "sharding", None)
        return getattr(sharding, "spec", P())

    return jax.tree.map(spec, nnx.to_pure_dict(abstract_state))


def path_keys(path) -> tuple:
    """A jax key path (DictKey, SequenceKey, ... entries) as the plain keys of the nested dicts."""
    return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def subtree(tree, keys: tuple):
    """The node of nested dicts `tree` at `keys`."""
    for key in keys:
        tree = tree[key]
    return tree


def is_stacked(path) -> bool:
    """Whether a parameter at `path` (a key tuple, e.g. ('layers', 'attn', 'q', 'kernel')) is a scanned
    stack: under a 'layers' key followed by a name (a Python list of blocks would have an index there).
    Its dimension 0 is then the layer axis."""
    keys = path_keys(path)
    return any(k == "layers" and i + 1 < len(keys) and isinstance(keys[i + 1], str) for i, k in enumerate(keys))


def layer_spec(spec: P) -> P:
    """The spec of one layer's slice of a stacked parameter: `spec` without its (unsharded) layer axis."""
    return P(*tuple(spec)[1:])


def zero_dim(spec: P) -> int | None:
    """The dimension a ZeRO-partitioned array is split on (the one carrying the data axes), or None."""
    for d, axes in enumerate(spec):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if set(names) & set(DATA_AXES):
            return d
    return None


def manual_spec(spec: P) -> P:
    """The part of `spec` over the data axes: what a shard_map manual over those axes sees."""
    out = []
    for axes in spec:
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        keep = tuple(a for a in names if a in DATA_AXES)
        out.append(None if not keep else keep if len(keep) > 1 else keep[0])
    return P(*out)


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a ZeRO stage decides, as spec trees (pure dicts) over one model's parameters.

    param: where parameters live; grad: where reduced gradients live (ZeRO-2/3: partitioned, so they
    are reduce-scattered); opt: where optimizer moments and the MultiSteps accumulator live (ZeRO-1+).
    shardings: the `ModelShardings` a model is built with to be born in `param`'s layout (None for a
    layout derived from shapes alone, `generic_zero_layout`).
    """

    stage: int
    param: dict
    grad: dict
    opt: dict
    shardings: ModelShardings | None = None


def zero_layout(build, mesh, stage: int) -> Layout:
    """Layout for the model made by `build(shardings)` on `mesh` at ZeRO `stage`.

    `build` must construct the model (under `jax.set_mesh`, abstractly via nnx.eval_shape here).
    """
    from flax import nnx

    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {stage}")
    tensor = mesh.shape.get(TENSOR, 1) > 1
    fsdp, plain = model_shardings(shard_params=True, tensor=tensor), model_shardings(shard_params=False, tensor=tensor)
    with jax.set_mesh(mesh):
        sharded = spec_tree(nnx.state(nnx.eval_shape(lambda: build(fsdp))))
        replicated = spec_tree(nnx.state(nnx.eval_shape(lambda: build(plain))))
    return Layout(
        stage=stage,
        param=sharded if stage >= 3 else replicated,
        grad=sharded if stage >= 2 else replicated,
        opt=sharded if stage >= 1 else replicated,
        shardings=fsdp if stage >= 3 else plain,
    )


def generic_zero_layout(abstract_state, mesh, stage: int) -> Layout:
    """Layout for any model at ZeRO `stage`, from its state's shapes alone (no ModelShardings needed).

    The partitioned spec of an array puts the data axes ('data', 'fsdp' together, `n` devices) on its
    largest dimension that `n` divides, first such on ties; an array with no such dimension (a scalar,
    a bias of 10, an RNG key) stays replicated. A stacked layer parameter (`is_stacked`) never puts them
    on its layer axis (dimension 0). Stage 3 uses it for parameters, stage 2 and up for
    gradients, stage 1 and up for the optimizer state; everything else is replicated.

    Args:
      abstract_state: the model's state: `nnx.state(model)` (concrete or `nnx.eval_shape`'d) or its pure
        dict (`nnx.to_pure_dict`); only shapes and dtypes are read.
      mesh: the training mesh; stage: 0, 1, 2 or 3.
    Returns:
      a Layout of pure-dict spec trees with the paths of `nnx.to_pure_dict(state)`.
    """
    from flax import nnx

    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {stage}")
    tree = nnx.to_pure_dict(abstract_state) if isinstance(abstract_state, nnx.State) else abstract_state
    n = data_parallel_size(mesh)

    def partitioned(path, x) -> P:
        shape, dtype = tuple(getattr(x, "shape", ())), getattr(x, "dtype", None)
        if n == 1 or (dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)):
            return P()
        first = 1 if is_stacked(path) else 0
        fits = [d for d, size in enumerate(shape) if d >= first and size >= n and size % n == 0]
        if not fits:
            return P()
        best = max(fits, key=lambda d: (shape[d], -d))
        return P(*(DATA_AXES if d == best else None for d in range(best + 1)))

    sharded = jax.tree_util.tree_map_with_path(partitioned, tree)
    replicated = jax.tree.map(lambda _: P(), tree)
    return Layout(
        stage=stage,
        param=sharded if stage >= 3 else replicated,
        grad=sharded if stage >= 2 else replicated,
        opt=sharded if stage >= 1 else replicated,
    )
