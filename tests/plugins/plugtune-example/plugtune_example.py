"""Write a greeting into the run directory and report the held-out token count at evaluation.

An example of a third-party plugin: it claims the recipe section ``example:``, checks it,
adds a metric to every evaluation and writes a file when training ends.
"""
from pydantic import Field

from plugtune import hookimpl
from plugtune.recipe import Section


class ExampleSection(Section):
    greeting: str = Field("hello", description="written to example.txt in the run directory")


@hookimpl
def plugtune_recipe_sections(register):
    register("example", ExampleSection)


@hookimpl
def plugtune_check_recipe(recipe):
    if not recipe["example"].greeting.strip():
        return ["example.greeting: is empty; give some text, e.g. example.greeting=hello"]
    return []


@hookimpl
def plugtune_evaluate(run):
    return {"example_tokens": run.data["validation"].tokens()}


@hookimpl
def plugtune_train_end(run):
    if run.dir is not None:
        (run.dir / "example.txt").write_text(run.recipe["example"].greeting + "\n")
