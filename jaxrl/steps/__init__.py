"""What each step trains and how it is wired: its roles, declared once, built for a run or for a plan.

A `Role` (steps/role.py) names one model of a step: what to build, whether it trains, its loss or
forward, the shapes of one call's batch, its learning rate. `sft.py`, `reward.py` and `ppo.py` declare
their roles and run them; `hybrid.py` is PPO's Hybrid Engine; `plan.py` builds the same roles
abstractly (`nnx.eval_shape`) and lowers them for `jaxrl plan`.
"""
