"""The API convention, enforced: options keyword-only, Modules delegate to their functions.

``docs/api-conventions.md`` states the convention; this test walks every public callable the
package exports and fails on a signature or a Module that breaks it, so a new primitive cannot
drift from it unnoticed.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import uda_selftrain as ust
import uda_selftrain.datasets as ust_datasets
import uda_selftrain.models as ust_models

ROOT = Path(__file__).resolve().parents[1]

#: Annotations that mark a parameter as data (what the call works on), which may stay positional.
_DATA = re.compile(
    r"Tensor|ndarray|Module|Dataset|SegmentationFiles|Iterable|Sequence\[(?:torch|nn|dict)|"
    r"PathLike|Path\b|ClassStatistics|Params|Mapping\[int, int\]|Selector|type\[nn"
)
#: Required sizes of what a call builds or draws (as in ``torch.zeros(n, size)``).
_SIZES = {"num_classes", "num_candidates", "num_groups", "num_samples", "n", "size", "in_size",
          "out_size", "crop_size", "in_channels", "shape"}  # fmt: skip
#: Parameters that name the data whatever their annotation says (datasets are duck-typed).
_DATA_NAMES = {"dataset", "labels", "names", "name", "index", "backbone", "block", "layers"}
#: Non-data parameters that stay positional on purpose, each with the reason.
ALLOWED_POSITIONAL = {
    # the call's subject is a name: which protocol, which validator, which checks
    ("get_protocol", "protocol"): "looks the protocol up by name",
    (
        "protocol_scores",
        "protocol",
    ): "the protocol is what is asked for, as in ConfusionMatrix.scores",
    ("select_candidate", "validator"): "the validator is what is asked for",
    ("set_value_checks", "enabled"): "a switch, like torch.set_grad_enabled(mode)",
    ("value_checks", "enabled"): "a switch, like torch.set_grad_enabled(mode)",
    ("ConfusionMatrix.scores", "protocol"): "the protocol is what is asked for",
    (
        "DeepLabV2.parameter_groups",
        "lr",
    ): "the one required value, as in torch.optim.SGD(params, lr)",
    ("PseudoLabelDataset.set_epoch", "epoch"): "torch's Sampler convention (DistributedSampler)",
    ("RareClassSampler.set_epoch", "epoch"): "torch's Sampler convention (DistributedSampler)",
    ("pseudo_label_path", "name"): "the image's name is the data the path is built from",
    ("Cityscapes.__init__", "split"): "the split names the part of the dataset, as in torchvision",
    ("OxfordRobotCar.__init__", "split"): "the split names the part of the dataset",
    ("DeepLabV2.__init__", "num_classes"): "the size of the head (it has a default for the paper)",
    ("deeplabv2_resnet101", "num_classes"): "the size of the head",
    ("deeplabv2_small", "num_classes"): "the size of the head",
}


def _exported() -> list[tuple[str, object]]:
    seen: dict[int, tuple[str, object]] = {}
    for module in (ust, ust_datasets, ust_models):
        for name in module.__all__:
            obj = getattr(module, name)
            seen.setdefault(id(obj), (name, obj))
    return sorted(seen.values(), key=lambda item: item[0])


def _is_output_type(cls: type) -> bool:
    """NamedTuples, dataclasses, exceptions, warnings and Protocols are not called with options."""
    return (
        (issubclass(cls, tuple) and hasattr(cls, "_fields"))
        or dataclasses.is_dataclass(cls)
        or issubclass(cls, BaseException)
        or getattr(cls, "_is_protocol", False)
    )


def _signatures() -> list[tuple[str, inspect.Signature]]:
    out = []
    for name, obj in _exported():
        targets: list[tuple[str, object]] = []
        if inspect.isclass(obj):
            if _is_output_type(obj):
                continue
            targets.append((f"{name}.__init__", obj.__init__))
            for meth_name, meth in vars(obj).items():
                # Overrides of nn.Module's own methods (train, ...) keep torch's signature.
                inherited = meth_name in vars(nn.Module) and meth_name != "forward"
                if inspect.isfunction(meth) and not meth_name.startswith("_") and not inherited:
                    targets.append((f"{name}.{meth_name}", meth))
        elif inspect.isfunction(obj):
            targets.append((name, obj))
        for qualname, fn in targets:
            try:
                out.append((qualname, inspect.signature(fn)))
            except (TypeError, ValueError):
                continue
    return out


def positional_options(qualname: str, sig: inspect.Signature) -> list[str]:
    """The parameters of ``sig`` that break "tensors positional, options keyword-only"."""
    bad = []
    for p in sig.parameters.values():
        if p.name in ("self", "cls") or p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            continue
        if _DATA.search(str(p.annotation)) or p.name in _DATA_NAMES:
            continue
        if p.name in _SIZES and (p.default is p.empty or p.name == "num_classes"):
            continue
        if (
            qualname.split(".")[-1] if "." not in qualname else qualname,
            p.name,
        ) in ALLOWED_POSITIONAL:
            continue
        if (qualname, p.name) in ALLOWED_POSITIONAL:
            continue
        bad.append(p.name)
    return bad


def test_options_are_keyword_only():
    bad = {q: names for q, sig in _signatures() if (names := positional_options(q, sig))}
    assert not bad, f"options that can be passed positionally (make them keyword-only): {bad}"


def test_the_check_catches_a_positional_option():
    """A deliberately added positional option fails the convention check."""

    def ias_like(
        scores: torch.Tensor, momentum: float = 0.9
    ):  # the mistake: momentum is positional
        return scores

    assert positional_options("ias_like", inspect.signature(ias_like)) == ["momentum"]


def test_every_walked_callable_was_found():
    names = {q for q, _ in _signatures()}
    # The four components and a function of each kind are walked (the walk itself is not empty).
    for expected in (
        "InstanceAdaptiveSelector.__init__",
        "HardAwareAugmenter.forward",
        "RegionAdaptiveLoss.forward",
        "ConsistencyLoss.forward",
        "consistency_loss",
        "region_masks",
        "lookup_table",
    ):
        assert expected in names


def _pairs() -> list[tuple[list[str], list[str]]]:
    """(functions, Modules) of each row of the API conventions' pairs table."""
    text = (ROOT / "docs" / "api-conventions.md").read_text()
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("concept", "---"):
            continue
        funcs = re.findall(r"`(\w+)`", cells[1])
        # A Module cell in parentheses or after a dash names no Module of its own; a remark in
        # parentheses after the Modules names methods or other classes.
        named = cells[2].split("(")[0]
        modules = [] if cells[2].startswith(("(", "—")) else re.findall(r"`(\w+)`", named)
        rows.append((funcs, [m for m in modules if isinstance(getattr(ust, m, None), type)]))
    return rows


def _delegating_source(cls: type) -> str:
    """forward (or update, for accumulators) plus the private methods it calls, one level deep."""
    src = ""
    for entry in ("forward", "update"):
        fn = vars(cls).get(entry)
        if fn is not None:
            src += inspect.getsource(fn)
    for helper in set(re.findall(r"self\.(_\w+)\(", src)):
        fn = getattr(cls, helper, None)
        if inspect.isfunction(fn):
            src += inspect.getsource(fn)
    return src


# Samplers, monitors and the validators' accumulators (update/compute, checked by value in their
# own tests) have no forward to delegate.
PAIRS = [
    (funcs, m)
    for funcs, modules in _pairs()
    for m in modules
    if funcs and issubclass(getattr(ust, m), nn.Module) and "forward" in vars(getattr(ust, m))
]


def test_pairs_table_is_read():
    assert len(PAIRS) >= 12
    assert (["consistency_loss"], "ConsistencyLoss") in PAIRS


@pytest.mark.parametrize(("funcs", "module"), PAIRS, ids=[m for _, m in PAIRS])
def test_module_delegates_to_its_function(funcs, module):
    """Every Module of the pairs table computes through one of its row's functions."""
    cls = getattr(ust, module)
    src = _delegating_source(cls)
    # The function itself, or the private kernel it runs (not its argument checks).
    kernels = set(funcs)
    for f in funcs:
        body = inspect.getsource(getattr(ust, f))
        kernels |= {k for k in re.findall(r"\b(_\w+)\(", body) if not k.startswith("_check")}
    called = sorted(k for k in kernels if re.search(rf"(?<![\w.]){k}\(", src))
    assert called, f"{module}.forward does not call its function ({', '.join(funcs)})"


def test_sibling_argument_order():
    """Siblings take their tensors in the same order: logits, labels, then the teacher's."""
    for fn in (ust.consistency_loss, ust.hiast_loss, ust.region_adaptive_loss):
        names = list(inspect.signature(fn).parameters)
        assert names[:2] == ["logits", "labels"], fn.__name__
    assert list(inspect.signature(ust.consistency_loss).parameters)[2] == "teacher_logits"
    assert list(inspect.signature(ust.hiast_loss).parameters)[2] == "teacher_logits"
    fwd = list(inspect.signature(ust.ConsistencyLoss.forward).parameters)[1:4]
    assert fwd == ["logits", "labels", "teacher_logits"]


# --------------------------------------------------------------------------------------------
# The examples stay small and readable (issue: the examples' engine taken apart).
# --------------------------------------------------------------------------------------------


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def test_examples_stay_small():
    """No example over 450 lines, no helper module over 300, no function over 60."""
    import ast

    too_long = []
    for path in _python_files("examples"):
        text = path.read_text()
        limit = 300 if "pipeline" in path.parts else 450
        if len(text.splitlines()) > limit:
            too_long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines > {limit}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    too_long.append(
                        f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines"
                    )
    assert not too_long, too_long


def test_no_import_path_edits():
    """Scripts import as they run (pytest's pythonpath setting for the tests), never by editing
    the import path at run time."""
    edit = re.compile(r"sys\.path\.(insert|append|extend)\(|sys\.path \+?=")
    found = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in _python_files("src", "examples", "tests", "docs", "benchmarks")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if edit.search(line) and p.name != "test_conventions.py"
    ]
    assert not found, found


def test_pipeline_helpers_raise_exceptions_not_system_exit():
    """Only an example's main() turns a RunError into an exit; the helper package never exits."""
    found = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in _python_files("examples/pipeline")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "SystemExit" in line
    ]
    assert not found, found


def test_outputs_are_named_tuples():
    """What a primitive returns is a NamedTuple with named fields: no mutable dataclass, no dict
    of scores. (``Protocol`` is a frozen description passed in, not an output.)"""
    mutable = [
        name
        for name, obj in _exported()
        if inspect.isclass(obj)
        and dataclasses.is_dataclass(obj)
        and not obj.__dataclass_params__.frozen
    ]
    assert not mutable, mutable
    for out in (
        ust.ProtocolScores,
        ust.PseudoLabelDiagnostics,
        ust.HardAwareViews,
        ust.HIASTLossOutput,
        ust.Selection,
    ):
        assert issubclass(out, tuple) and hasattr(out, "_fields"), out.__name__
    for fn in (ust.protocol_scores, ust.paste_views, ust.hiast_loss, ust.select_argmax):
        returned = inspect.signature(fn).return_annotation
        assert "dict" not in str(returned), fn.__name__
