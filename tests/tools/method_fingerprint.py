"""Fingerprint every registered method's numbers on a tiny model, to prove a refactor changes none of them.

``python tests/tools/method_fingerprint.py save FILE`` writes, for every method at its defaults (and the
settings below), the eval logits, token counts and patch depths, the train-mode logits and every loss term
on fixed weights and images; ``... compare FILE`` recomputes them here and reports, per method, whether they are
bit-identical and the largest absolute difference (logits and losses must be within 1e-6, counts and depths
exact). Run ``save`` before a change and ``compare`` after, on the same machine and torch build.
"""
from __future__ import annotations

import sys

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import methods

# extra settings where the default would not exercise the method's reduction on a 16-patch model
SETTINGS = {"tome": [{"r": 2}], "ats": [{"budget": 0.5}], "heuristic": [{"contiguous": False}]}


def tiny_vit() -> VisionTransformer:
    """The embedded model (depth 12, 64 patches), random weights: every method's defaults apply to it."""
    torch.manual_seed(0)
    return timm.create_model("deit_digits_patch4_32", num_classes=10)


def fingerprint() -> dict[str, dict[str, torch.Tensor]]:
    torch.set_num_threads(1)
    torch.manual_seed(1)
    images, targets = torch.randn(4, 3, 32, 32), torch.arange(4)
    prints = {}
    for name in methods.list_methods():
        for params in [{}] + SETTINGS.get(name, []):
            key = name + "".join(f" {k}={v}" for k, v in params.items())
            try:
                torch.manual_seed(2)
                method = methods.create_method(name, tiny_vit(), **params)
            except (ValueError, TypeError) as error:
                print(f"{key}: not built ({error})")
                continue
            entry = {}
            with torch.no_grad():
                out = method.eval()(images)
                entry.update(eval_logits=out.logits, counts=out.token_counts, depth=out.patch_depth)
                torch.manual_seed(3)
                teacher = methods.create_method("dense", tiny_vit()).eval()(images) if method.needs_teacher else None
                torch.manual_seed(4)
                out = method.train()(images)
                entry["train_logits"] = out.logits
                for term, value in method.loss_terms(out, targets, teacher).items():
                    entry[f"loss_{term}"] = value.detach().reshape(-1)
            prints[key] = entry
    return prints


def compare(saved: dict, now: dict) -> int:
    bad = 0
    for key in sorted(set(saved) | set(now)):
        if key not in saved or key not in now:
            print(f"{key}: only {'before' if key in saved else 'after'}")
            bad += 1
            continue
        identical, worst = True, 0.0
        for field in sorted(set(saved[key]) | set(now[key])):
            a, b = saved[key].get(field), now[key].get(field)
            if a is None or b is None or a.shape != b.shape:
                print(f"{key}: {field} missing or reshaped")
                bad += 1
                identical = False
                continue
            identical &= torch.equal(a, b)
            if a.is_floating_point():
                worst = max(worst, float((a - b).abs().max()) if a.numel() else 0.0)
            elif not torch.equal(a, b):
                print(f"{key}: {field} differs (integers must be exact)")
                bad += 1
        if worst > 1e-6:
            bad += 1
        print(f"{key}: {'bit-identical' if identical else 'differs'}, max |diff| {worst:.2e}")
    print(f"{len(now)} settings, {bad} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    action, path = sys.argv[1], sys.argv[2]
    if action == "save":
        torch.save(fingerprint(), path)
    else:
        sys.exit(compare(torch.load(path), fingerprint()))
