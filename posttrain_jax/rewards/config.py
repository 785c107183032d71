"""`build_rewards`: reward functions selected and configured by the trainer config.

A config lists reward specs, one dict each::

    [{"name": "math", "weight": 1.0, "correct": 10.0},
     {"name": "format", "pattern": "<answer>.*?</answer>", "mode": "search", "weight": 0.5},
     {"name": "reward_model", "checkpoint": "runs/rm/checkpoints", "tokenizer": "tok.model", "weight": 1.0}]

"name" picks a factory from `REWARD_FACTORIES`; "weight" (default 1) and
"label" (the metric name, default the name; needed to use one factory twice)
belong to the composition; every other key is a keyword of the factory. A
typo fails before training starts, naming the spec, the key and the valid
keys, rather than being ignored.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence

from posttrain_jax.rewards.compose import Rewards, RewardTerm
from posttrain_jax.rewards.model import reward_model_from_checkpoint
from posttrain_jax.rewards.verifiable import exact_match_reward, format_reward, math_reward

REWARD_FACTORIES = {
    "math": math_reward,
    "exact_match": exact_match_reward,
    "format": format_reward,
    "reward_model": reward_model_from_checkpoint,
}
_COMPOSITION_KEYS = ("name", "weight", "label")


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _as_dict(spec, where: str) -> dict:
    if hasattr(spec, "to_dict"):  # ml_collections.ConfigDict
        spec = spec.to_dict()
    if not isinstance(spec, Mapping):
        raise TypeError(f"{where}: a reward spec is a dict like {{'name': 'math', 'weight': 1.0}}, got {spec!r}")
    return dict(spec)


def reward_term_from_spec(spec, where: str = "reward spec", *, mesh=None) -> RewardTerm:
    """One `RewardTerm` from a spec dict (see the module docstring); errors name `where`.

    `mesh`: where a reward model's params are sharded (default: the first device).
    """
    spec = _as_dict(spec, where)
    if "name" not in spec:
        raise ValueError(f"{where}: missing 'name'; valid names: {', '.join(REWARD_FACTORIES)}")
    name = spec["name"]
    if name not in REWARD_FACTORIES:
        raise ValueError(f"{where}: unknown reward name {name!r}{_suggest(str(name), REWARD_FACTORIES)}; "
                         f"valid names: {', '.join(REWARD_FACTORIES)}")
    factory = REWARD_FACTORIES[name]
    parameters = inspect.signature(factory).parameters
    valid = sorted([*_COMPOSITION_KEYS, *parameters])
    for key in spec:
        if key not in valid:
            raise ValueError(f"{where} ({name!r}): unknown key {key!r}{_suggest(str(key), valid)}; "
                             f"valid keys: {', '.join(valid)}")
    kwargs = {k: v for k, v in spec.items() if k not in _COMPOSITION_KEYS}
    if mesh is not None and "mesh" in parameters:
        kwargs["mesh"] = mesh
    missing = [k for k, p in parameters.items() if p.default is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise ValueError(f"{where} ({name!r}): missing required key(s) {', '.join(map(repr, missing))}")
    try:
        fn = factory(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where} ({name!r}): {e}") from e
    return RewardTerm(spec.get("label", name), fn, spec.get("weight", 1.0))


def build_rewards(specs: Sequence, *, mesh=None) -> Rewards:
    """`Rewards` from a list of spec dicts (or ConfigDicts); see the module docstring.

    `mesh`: shard reward models over it (e.g. this process's devices, so each process scores its own
    completions without collectives; an 8B reward model does not fit on one device).
    """
    if isinstance(specs, (str, Mapping)) or not isinstance(specs, Sequence) or not specs:
        raise ValueError(f"rewards config must be a non-empty list of reward specs, got {specs!r}")
    return Rewards([reward_term_from_spec(s, f"rewards[{i}]", mesh=mesh) for i, s in enumerate(specs)])
