"""The contract every registered method keeps, checked over the registry (``methods.list_methods()``) on one tiny
12-block ViT with the registered defaults: it reduces tokens (except dense), evaluation repeats exactly, each image
gets the same logits, counts and depths alone as inside a batch, training mode computes what evaluation computes
(where the method does not train differently by design), and a training pass gives every parameter a finite
gradient. Also the staged family's registration, as a table. Method-specific behaviour (by-hand values, official
counts, refusals) stays in each method's own file."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_batch_invariant, make_tiny_vit
from methods import create_method, list_methods, method_spec, resolved_params

# Settings a registered default cannot supply on the tiny model: A-ViT's gate constants exist only for the DeiTs;
# these give halting depths that differ between images (as tests/test_adavit.py's mixed model).
SETTINGS = {"adavit": {"gate_scale": 3.0, "gate_center": 1.5}}
# Switches that change the computation, checked besides the defaults.
VARIANTS = [("patchmerger", {"scaled_attention": True})]
CASES = [pytest.param(name, {}, id=name) for name in list_methods()] + \
    [pytest.param(name, params, id=f"{name}-" + "-".join(f"{k}={v}" for k, v in params.items()))
     for name, params in VARIANTS]

# What the registry says of the token-reduction family (methods/staged.py): fine-tuned by default, the inference
# knob and its default grid (None: the compute is fixed by the trained stages), the family, and the README summary's
# first words.
KEEP_RATES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
REGISTERED = {
    "kmedoids": (False, "keep_rate", KEEP_RATES, "clustering", "K-Medoids: "),
    "dpcknn": (True, "keep_rate", KEEP_RATES, "clustering", "DPC-KNN: "),
    "sinkhorn": (True, None, None, "clustering", "Sinkhorn: "),
    "sit": (True, None, None, "merging", "SiT: "),
    "patchmerger": (True, None, None, "merging", "PatchMerger: "),
    "heuristic": (False, None, None, "pruning", "Heuristic: "),
}

# Methods whose training pass differs from evaluation by design, and why.
TRAINS_DIFFERENTLY = {
    "random": "draws new random subsets at every training pass (evaluation keeps one seeded subset)",
    "dynamicvit": "trains with Gumbel-sampled masks over all tokens (evaluation prunes by the predictor's top-k)",
}


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32) * 2


def build(name: str, params: dict | None = None):
    """``name`` with its registered defaults (and ``params``) on a tiny 12-block ViT (16 patches), in eval mode, its
    own parameters moved off their initialisation (small or zero at the start) so its choices depend on the image."""
    params = {**SETTINGS.get(name, {}), **(params or {})}
    method = create_method(name, make_tiny_vit(depth=12), **resolved_params(name, params)).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, param in method.named_parameters():
            if not key.startswith("vit."):
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    return method


def test_the_tables_name_registered_methods():
    assert set(SETTINGS) | set(TRAINS_DIFFERENTLY) | {name for name, _ in VARIANTS} | set(REGISTERED) | \
        set(FROZEN_BACKBONE) <= \
        set(list_methods())


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_registered_as_the_table_says(name):
    finetune, knob, grid, family, summary = REGISTERED[name]
    spec = method_spec(name)
    assert (spec.finetune, spec.inference_knob, spec.tradeoff_values, spec.family) == (finetune, knob, grid, family)
    assert spec.summary.startswith(summary)


@pytest.mark.parametrize("name", list_methods())
def test_reduces_tokens_and_evaluation_repeats(name, images):
    method = build(name)
    with torch.no_grad():
        first, again = method(images), method(images)
    assert torch.equal(first.logits, again.logits)  # any noise a method uses is fixed at evaluation
    assert torch.equal(first.token_counts, again.token_counts) and torch.equal(first.patch_depth, again.patch_depth)
    dense = first.token_counts[:, 0, 0]  # CLS + 16 patches enter the first block
    assert dense.eq(17).all()
    reduced = first.token_counts.min() < 17
    assert reduced != (name == "dense"), f"{name}: counts {first.token_counts[0, :, 0].tolist()}"


@pytest.mark.parametrize("name, params", CASES)
def test_batch_invariant(name, params, images):
    assert_batch_invariant(build(name, params), images)


@pytest.mark.parametrize("name, params", [case for case in CASES if case.values[0] not in TRAINS_DIFFERENTLY])
def test_train_mode_equals_eval(name, params, images):
    method = build(name, params)
    with torch.no_grad():
        evaluated = method(images)
        trained = method.train()(images)
    torch.testing.assert_close(trained.logits, evaluated.logits)
    assert torch.equal(trained.patch_depth, evaluated.patch_depth)
    assert torch.equal(trained.token_counts, evaluated.token_counts)


# Methods whose default recipe freezes the backbone (``requires_grad`` off), and why: a training pass must reach
# their own parameters only.
FROZEN_BACKBONE = {"ltmp": "the official one-epoch recipe trains the two thresholds per block only"}


@pytest.mark.parametrize("name", list_methods())
def test_a_training_pass_reaches_every_parameter(name, images):
    method = build(name).train()
    out = method(images)
    loss = out.logits.pow(2).sum()
    if not method.needs_teacher:  # the method's own loss terms belong to a training pass (the only path to LTMP's
        # last-block thresholds); teachers are exercised in the methods' own files
        loss = loss + sum(method.loss_terms(out, torch.zeros(len(images), dtype=torch.long)).values())
    loss.backward()
    for key, param in method.named_parameters():
        if name in FROZEN_BACKBONE and key.startswith("vit."):
            assert param.grad is None and not param.requires_grad, key
            continue
        assert param.grad is not None and torch.isfinite(param.grad).all(), key
    if name not in FROZEN_BACKBONE:
        assert method.vit.patch_embed.proj.weight.grad.abs().sum() > 0
