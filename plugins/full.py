"""Full fine-tuning: every parameter of the model trains."""
from plugtune import hookimpl
from plugtune.recipe import float16_training_problem


@hookimpl
def plugtune_check_recipe(recipe):
    problems = []
    if "freeze" in recipe.plugins:
        problems.append("plugins: `full` trains every parameter and `freeze` freezes some: use "
                        "one; for full fine-tuning drop freeze, to train a part drop full")
    if recipe.model.dtype == "float16":
        problems.append(float16_training_problem("`full` trains every weight"))
    return problems


@hookimpl
def plugtune_select_trainable(model):
    for p in model.parameters():
        p.requires_grad_(True)


@hookimpl
def plugtune_fit_variants():
    """``plan --fit``'s first choice: every weight trains (quality cost 0)."""
    from plugtune.plan import Variant

    return [Variant("full", 0, ["full"])]
