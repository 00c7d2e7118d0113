"""What optimizer plugins share (plugin API 1.1; not a plugin itself): the weight-decay
groups (:func:`param_groups`) and Kahan-compensated steps for bfloat16 weights around a
per-parameter optimizer (:func:`build`), as ``adamw`` and ``adamw_8bit`` use them.

Kahan summation:

A bfloat16 weight has 8 significant bits: an update smaller than half its last place rounds
away. At full fine-tuning learning rates (1e-5) most of a step's updates do, so a pure bf16
run learns a fraction of what a float32 one does (docs/performance.md, "bfloat16 weights").
Here each bf16 parameter keeps a bf16 compensation buffer, the part of its value the weight
could not hold (Kahan summation, as torchao's and optimi's bf16 optimizers do): the optimizer
steps the float32 sum ``weight + compensation``, the weight takes its nearest bf16 value and
the buffer the rest, so no update is lost. 2 bytes per weight, against 4 for float32 master
weights (and torch AdamW's moments, made beside a float32 value, are float32: 8 bytes per
weight instead of 4).

The optimizer is built over float32 stand-ins of the bf16 parameters, empty between steps, so
its state is float32 and a checkpoint restores it as float32; the compensation buffer is part
of its state (``optimizer.pt``). A step runs one parameter at a time, so the float32 copies of
a weight and its gradient exist for one tensor at once.
"""
import types
from typing import Literal

import torch
from pydantic import Field

COMPENSATED = torch.bfloat16


def is_vector(p):
    """A vector whatever its shape: fewer than two dimensions longer than 1 (biases and norm
    scales, and IA3's scaling vectors, stored as ``(out, 1)`` or ``(1, in)`` matrices)."""
    return sum(size > 1 for size in p.shape) < 2


def param_groups(params, weight_decay):
    """Matrices decay; vectors (biases, norm scales, IA3 scaling vectors) do not."""
    params = list(params)
    return [{"params": [p for p in params if not is_vector(p)], "weight_decay": weight_decay},
            {"params": [p for p in params if is_vector(p)], "weight_decay": 0.0}]


def setting_field():
    return Field("auto", description="Kahan summation for bfloat16 weights: a bf16 "
                 "compensation buffer per weight (2 B) keeps the updates that bf16 rounds "
                 "away (most of them at lr 1e-5); auto: on when trainable weights are bfloat16")


Setting = Literal["auto"] | bool


def wanted(setting, params):
    """Whether ``setting`` (``auto``, true, false) compensates any of ``params``."""
    return setting is True or (setting == "auto" and any(p.dtype == COMPENSATED
                                                         for p in params))


def build(make, groups, setting):
    """``make(groups)``, the optimizer, compensating the bf16 parameters of ``groups`` (a list
    of param-group dicts) when ``setting`` asks for it."""
    params = [p for g in groups for p in g["params"]]
    if not wanted(setting, params):
        return make(groups)
    stand_ins = {}
    for group in groups:
        group["params"] = [_stand_in(p, stand_ins) for p in group["params"]]
    optimizer = make(groups)
    _compensate(optimizer, stand_ins)
    return optimizer


def _stand_in(param, stand_ins):
    if param.dtype != COMPENSATED:
        return param
    stand_in = torch.nn.Parameter(torch.empty(0, dtype=torch.float32, device=param.device))
    stand_ins[stand_in] = param
    return stand_in


def _compensate(optimizer, stand_ins):
    """Make ``optimizer.step`` step each parameter alone, the bf16 ones through their float32
    stand-ins, and ``zero_grad`` clear the bf16 parameters' gradients too."""
    step, zero_grad = optimizer.step, optimizer.zero_grad

    def compensated_step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [g["params"] for g in self.param_groups]
        try:
            for params in groups:
                for p in params:
                    for other, group in zip(groups, self.param_groups):
                        group["params"] = [p] if other is params else []
                    _step_one(step, self.state, p, stand_ins.get(p))
        finally:
            for params, group in zip(groups, self.param_groups):
                group["params"] = params
        return loss

    def compensated_zero_grad(self, set_to_none=True):
        zero_grad(set_to_none=set_to_none)
        for param in stand_ins.values():
            param.grad = None

    # bound methods: the lr scheduler wraps ``optimizer.step`` through its ``__func__``
    optimizer.step = types.MethodType(compensated_step, optimizer)
    optimizer.zero_grad = types.MethodType(compensated_zero_grad, optimizer)
    optimizer.plugtune_compensated = stand_ins


@torch.no_grad()
def _step_one(step, state, p, param):
    """One parameter's step; for a bf16 ``param`` through its stand-in ``p``."""
    if param is None:
        if p.grad is not None:
            step()
        return
    if param.grad is None:
        return
    compensation = state[p].get("compensation")
    if compensation is None:
        compensation = torch.zeros_like(param)
    p.data = param.detach().float() + compensation.float()
    p.grad = param.grad.float()
    param.grad = None
    step()
    param.copy_(p.data)  # round to nearest
    state[p]["compensation"] = (p.data - param.float()).to(COMPENSATED)
    p.grad, p.data = None, p.data.new_empty(0)


def held(optimizer, param):
    """The value ``optimizer`` (or accelerate's wrapper of it) holds for ``param``: with
    compensation the bf16 weight plus its buffer, in float32; else the weight."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    for stand_in, p in getattr(optimizer, "plugtune_compensated", {}).items():
        if p is param:
            compensation = optimizer.state[stand_in].get("compensation")
            return param.float() + (0 if compensation is None else compensation.float())
    return param.detach().clone()


def plan_buffers(plan, trainable):
    """Count the compensation buffers of the planner's ``trainable`` parameters (the step's
    float32 copies of one weight and its gradient are the optimizer's step memory)."""
    compensated = [p.numel for p in trainable if p.dtype == COMPENSATED]
    plan.add("Kahan compensation", 2 * sum(compensated),
             f"a bf16 buffer per bf16 weight ({sum(compensated) / 1e6:,.1f}M weights, 2 B each)")
