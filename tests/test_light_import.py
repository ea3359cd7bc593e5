"""A light import: `import automl`, load(dir).predict(...), a serving replica and `automl --help` start without the
search engine (Ray Tune, Ray Train, Optuna), and the CLI's help without torch. Each check runs in a fresh
interpreter, since this test process has imported everything already."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _fresh import FreshPythons

FIXTURES = Path(__file__).parent / "fixtures"
SEARCH_ENGINE = ("ray.tune", "optuna", "ray.train", "ray.serve")


FRESH: FreshPythons | None = None  # this module's interpreters, started when its first test runs


def _output(name: str) -> str:
    """What `name`'s interpreter printed (it must have exited 0)."""
    return FRESH.output(name)


def _result(name: str) -> dict:
    """The JSON line `name`'s interpreter printed last."""
    return json.loads(_output(name).strip().splitlines()[-1])


# Each check's script, started in its own interpreter when the module's first test runs (`started`).
SCRIPTS = {
    "import": f"""
    import json, sys
    import automl
    automl.load
    print(json.dumps([m for m in {SEARCH_ENGINE!r} if m in sys.modules]))
""",
    "load": f"""
    import json, sys
    import pandas as pd
    from sklearn.datasets import load_digits
    import automl

    expected = json.loads(open({str(FIXTURES / "v1_expected.json")!r}).read())
    img = automl.load({str(FIXTURES / "v1_image_export")!r})
    d = load_digits()
    image = img.predict_proba(pd.DataFrame({{"image": [d.images[i] for i in expected["image_rows"]]}}))
    txt = automl.load({str(FIXTURES / "v1_text_export")!r})
    text = txt.predict(pd.DataFrame({{"text": expected["texts"]}}))
    print(json.dumps({{"modules": [m for m in {SEARCH_ENGINE!r} if m in sys.modules],
                      "image_proba": image.to_numpy().tolist(), "text": [str(t) for t in text]}}))
""",
    "replica": f"""
    import json, sys
    from ray import serve

    deployed = {{}}
    real = serve.deployment

    def deployment(*args, **kwargs):  # keep each deployment's class, to run it here
        wrap = real(*args, **kwargs)

        def keep(cls):
            deployed[cls.__name__] = cls
            return wrap(cls)
        return keep

    serve.deployment = deployment
    from automl.ops import serve as automl_serve

    export = {str(FIXTURES / "v1_text_export")!r}
    automl_serve._app({{"topics": {{"dir": export, "info": {{}}}}}}, automl_serve.ServeOptions(cpus_per_replica=0))
    own = deployed["ModelServer"].__mro__[1]  # the class as written (serve.ingress wraps it: async __init__)
    replica = own.__new__(own)
    own.__init__(replica, {{"topics": export}}, {{"topics": {{}}}})
    rows = automl_serve.answer(replica.models["topics"], [["pizza for dinner"]])
    print(json.dumps({{"modules": [m for m in ("ray.tune", "optuna", "ray.train") if m in sys.modules],
                      "rows": rows}}))
""",
    "help": """
    import contextlib, io, json, sys
    from automl.ops.cli import build_parser, main  # the `automl` entry point

    verbs = sorted(build_parser()._subparsers._group_actions[0].choices)
    helped = []
    for argv in [["--help"]] + [[verb, "--help"] for verb in verbs]:
        with contextlib.redirect_stdout(io.StringIO()) as text, contextlib.suppress(SystemExit):
            main(argv)
        helped.append(bool(text.getvalue().startswith("usage: automl")))
    heavy = ("torch", "ray", "transformers", "timm", "optuna", "pandas")
    print(json.dumps({"verbs": verbs, "helped": helped, "modules": [m for m in heavy if m in sys.modules]}))
""",
    "warm": """
    import json, sys
    import numpy as np, pandas as pd
    from automl import stages
    from automl.options import FinetuneOptions

    rng = np.random.default_rng(0)
    images = pd.DataFrame({"image": list(rng.random((40, 8, 8))), "label": [0, 1] * 20})
    texts = pd.DataFrame({"text": [f"word {i} about {'cats' if i % 2 else 'cars'}" for i in range(40)],
                          "label": [1, 0] * 20})
    seen = {}
    for name, df in (("image", images), ("text", texts)):
        opts = FinetuneOptions.from_kwargs(label="label", output_dir="/tmp/unused")
        prepared = stages.prepare(df, data=opts.data, search=opts.search, update=opts.update, output=opts.output)
        before = {m: m in sys.modules for m in ("timm", "transformers")}
        stages.warm_libraries(prepared, opts.search).join()
        seen[name] = {"before": before, "after": {m: m in sys.modules for m in ("timm", "transformers")}}
    print(json.dumps(seen))
""",
}
# ...and each interpreter's arguments: the scripts, and the CLI's help as a user runs it.
COMMANDS = {**{name: ["-c", textwrap.dedent(code)] for name, code in SCRIPTS.items()},
            "finetune help": ["-m", "automl.ops.cli", "finetune", "--help"]}


@pytest.fixture(scope="module", autouse=True)
def started():
    global FRESH
    FRESH = FreshPythons(COMMANDS)
    yield
    FRESH.stop()


def test_every_public_name_still_resolves():
    import automl

    for name in automl.__all__:
        assert getattr(automl, name) is not None, name
    assert set(automl.__all__) <= set(dir(automl))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        automl.nope  # noqa: B018


def test_import_automl_loads_no_search_engine():
    out = _result("import")
    assert out == []


def test_load_and_predict_load_no_search_engine():
    out = _result("load")
    assert out["modules"] == []
    expected = json.loads((FIXTURES / "v1_expected.json").read_text())
    # Recorded on an Intel CPU; an AMD EPYC's float32 kernels differ by up to 1e-5 (2026-12-04). A wrong
    # preprocessing or head moves these probabilities by far more.
    np.testing.assert_allclose(out["image_proba"], expected["image_proba"], atol=1e-4)
    assert len(out["text"]) == len(expected["texts"])


def test_a_serving_replica_starts_without_the_search_engine():
    """The replica's own code (ModelServer.__init__, then what its batched predict calls), outside Ray Serve."""
    out = _result("replica")
    assert out["modules"] == []
    assert len(out["rows"]) == 1 and set(out["rows"][0]["probabilities"]) == {"food", "sport", "tech"}


def test_cli_help_imports_neither_torch_nor_the_engines():
    out = _result("help")
    assert "finetune" in out["verbs"] and all(out["helped"]), out
    assert out["modules"] == []
    assert "--time-budget" in _output("finetune help")


def test_the_backbones_libraries_are_imported_while_ray_starts():
    """auto_finetune imports the space's backbone libraries (timm, transformers) in a thread while Ray starts, so
    the plan's first build does not pay for them out of the budget; before that thread, neither is imported."""
    out = _result("warm")
    assert out["image"] == {"before": {"timm": False, "transformers": False},
                            "after": {"timm": True, "transformers": False}}
    assert out["text"]["after"]["transformers"] is True and out["text"]["before"]["transformers"] is False
