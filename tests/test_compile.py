"""`train.compile`: opt-in, the model's forward compiled in place (compilation itself happens at
the first step and takes minutes on a CPU, so it is measured by benchmarks/compile.py, not here)."""
from plugtune import loop, testing


def test_train_compile_compiles_the_forward_in_place_keeping_parameter_names(make_recipe):
    for compiled in (False, True):
        recipe, pm = testing.load_recipe(make_recipe(train={"compile": compiled}))
        run = loop.setup(recipe, pm, echo=lambda *a: None)
        names = [n for n, _ in run.model.named_parameters()]
        run.total_steps = 1
        loop.optimization(run)
        model = run.accelerator.unwrap_model(run.model)
        assert (getattr(model, "_compiled_call_impl", None) is not None) == compiled
        assert [n for n, _ in model.named_parameters()] == names  # checkpoints keep their keys
