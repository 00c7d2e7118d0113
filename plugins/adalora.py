"""AdaLoRA adapters (peft): LoRA whose rank is shared out during training — every layer starts
at ``adalora.init_r`` and the budget shrinks to ``adalora.target_r`` per layer on average,
taken from the layers whose singular values matter least.

The schedule: ``tinit`` warm-up steps at full rank, then the budget shrinks every ``delta_t``
steps until ``tfinal`` steps before the end, when the final ranks are fixed. It needs the
run's total steps (``run.total_steps``) and a call to peft's ``update_and_allocate`` after each
optimizer step, while the gradients are still there: the plugin hooks the optimizer's step for
the duration of the run. The ranks it arrived at are saved in the adapter's config
(``rank_pattern``), so ``peft.PeftModel.from_pretrained`` rebuilds the same shapes;
``plugtune export --merge`` folds it into the base. Composes with ``int8``/``nf4`` and
``gradient_checkpointing``; conflicts with ``full``, ``freeze`` and the other adapter methods
(docs/combinations.md).
"""
import torch
from pydantic import Field

from plugtune import Loss, hookimpl
from plugtune.errors import PluginError
from plugtune.plugins import peft_family as adapters
from plugtune.plugins.peft_family import (  # noqa: F401  (shared hooks)
    plugtune_load_artifact, plugtune_merge_artifact, plugtune_save_model)  # noqa: F401


class AdaloraSection(adapters.AdapterSection):
    init_r: int = Field(12, gt=0, description="rank of every adapter at the start")
    target_r: int = Field(8, gt=0, description="average rank per adapter at the end")
    alpha: float = Field(16, gt=0, description="scale of the update (alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    tinit: int = Field(0, ge=0, description="steps at full rank before the budget shrinks")
    tfinal: int = Field(0, ge=0, description="last steps with the final ranks fixed")
    delta_t: int = Field(1, gt=0, description="steps between two reallocations of the ranks")
    beta1: float = Field(0.85, gt=0, lt=1, description="smoothing of the importance scores")
    beta2: float = Field(0.85, gt=0, lt=1, description="smoothing of their uncertainty")
    orth_reg_weight: float = Field(0.5, ge=0, description="weight of the orthogonality "
                                   "penalty added to the loss")


def options(s):
    """peft's ``AdaLoraConfig`` arguments. The run's total steps are known only once the data
    is batched (``plugtune_train_start`` sets them); peft insists on a valid number here."""
    return {**adapters.common(s), "init_r": s.init_r, "target_r": s.target_r,
            "lora_alpha": s.alpha, "lora_dropout": s.dropout, "tinit": s.tinit,
            "tfinal": s.tfinal, "deltaT": s.delta_t, "beta1": s.beta1, "beta2": s.beta2,
            "orth_reg_weight": s.orth_reg_weight, "total_step": s.tinit + s.tfinal + 1}


def _check(recipe):
    problems = []
    s = recipe["adalora"]
    if s.target_r > s.init_r:
        problems.append(f"adalora.target_r: {s.target_r} is above adalora.init_r={s.init_r}; "
                        "the budget only shrinks: make target_r <= init_r")
    steps = recipe.train.max_steps
    if steps is not None and s.tinit + s.tfinal >= steps:
        problems.append(f"adalora.tinit + adalora.tfinal: {s.tinit} + {s.tfinal} leaves no step "
                        f"to reallocate ranks in train.max_steps={steps}; make them smaller")
    return problems


def orthogonality_penalty(model):
    """AdaLoRA's regulariser: the mean Frobenius distance of ``A Aᵀ`` and ``Bᵀ B`` from the
    identity over the trainable adapter matrices. peft adds it inside its forward, but only to
    a loss the model computes from labels; plugtune's task plugins compute the loss themselves
    (``plugtune.Loss``), so it is added here, as peft writes it."""
    total, n = 0.0, 0
    for name, p in model.named_parameters():
        if p.requires_grad and ("lora_A" in name or "lora_B" in name) and p.numel():
            cov = p @ p.T if "lora_A" in name else p.T @ p
            total = total + torch.linalg.matrix_norm(
                cov - torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype))
            n += 1
    return total / n if n else total


def _model(run):
    return run.accelerator.unwrap_model(run.model)


HOOKS = adapters.method("adalora", AdaloraSection, "AdaLoraConfig", options, check=_check)


class AdaLora:
    """AdaLoRA adapters (peft): LoRA whose rank budget is shared out among the layers during
    training. (A class: it holds the run's optimizer-step hook.)"""

    PLUGTUNE_ROLES = {"adapter"}

    def __init__(self):
        self.handle = None

    # the declaration every peft method makes (peft_family.method), its hooks on the class
    plugtune_recipe_sections, plugtune_check_recipe, plugtune_wrap_model = map(
        staticmethod, HOOKS[:3])

    @hookimpl(wrapper=True)
    def plugtune_compute_loss(self, model, recipe):
        """The penalty joins the training loss only (``eval_loss`` stays the task's loss,
        comparable with other methods'), once per target so the step's mean gains it once."""
        loss = yield
        weight = recipe["adalora"].orth_reg_weight
        if not model.training or not weight:
            return loss
        penalty = weight * orthogonality_penalty(model)
        return Loss(loss.sum + penalty * loss.count, loss.count)

    @hookimpl
    def plugtune_train_start(self, run):
        """Tell peft the run's length, and reallocate ranks after every optimizer step (the
        gradients are zeroed before ``plugtune_step_end`` runs, and peft scores importance
        from them)."""
        from torch.optim.optimizer import register_optimizer_step_post_hook

        s, peft_model = run.recipe["adalora"], _model(run).base_model
        if s.tinit + s.tfinal >= run.total_steps:
            raise PluginError(f"adalora.tinit + adalora.tfinal: {s.tinit} + {s.tfinal} leaves no "
                              f"step to reallocate ranks in this run's {run.total_steps} steps; "
                              "make them smaller or train longer")
        peft_model.rankallocator.set_total_step(run.total_steps)
        ours = {id(p) for p in peft_model.parameters()}

        def reallocate(optimizer, args, kwargs):
            if any(id(p) in ours for group in optimizer.param_groups for p in group["params"]):
                # run.step counts the steps finished before this one: peft's 0-based step
                peft_model.update_and_allocate(run.step)

        self.handle = register_optimizer_step_post_hook(reallocate)

    @hookimpl
    def plugtune_teardown(self):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    plugtune_save_model = staticmethod(plugtune_save_model)
    plugtune_load_artifact = staticmethod(plugtune_load_artifact)
    plugtune_merge_artifact = staticmethod(plugtune_merge_artifact)


plugtune_fit_variants = HOOKS[3]  # ``plan --fit`` asks the module (every installed plugin's)
