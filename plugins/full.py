"""Full fine-tuning: every parameter of the model trains."""
from plugtune import hookimpl


@hookimpl
def plugtune_check_recipe(recipe):
    if "freeze" in recipe.plugins:
        return ["plugins: `full` trains every parameter and `freeze` freezes some: use one; "
                "for full fine-tuning drop freeze, to train a part drop full"]
    return []


@hookimpl
def plugtune_select_trainable(model):
    for p in model.parameters():
        p.requires_grad_(True)
