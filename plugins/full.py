"""Full fine-tuning: every parameter of the model trains."""
from plugtune import float16_training_problem, hookimpl

#: ``trainable``: the core refuses ``freeze`` or an adapter method beside it.
PLUGTUNE_ROLES = {"trainable"}


@hookimpl
def plugtune_check_recipe(recipe):
    if recipe.model.dtype == "float16":
        return [float16_training_problem("`full` trains every weight")]
    return []


@hookimpl
def plugtune_select_trainable(model):
    for p in model.parameters():
        p.requires_grad_(True)


@hookimpl
def plugtune_fit_variants():
    """``plan --fit``'s first choice: every weight trains (quality cost 0)."""
    from plugtune import Variant  # the planner loads only when asked

    return [Variant("full", Variant.FULL, ["full"])]
