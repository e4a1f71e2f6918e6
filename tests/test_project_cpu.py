"""The cpu backend's fused projection agrees with the reference (``project.py`` after ``model.covariance``).

Both compute the same formulas; the numba kernels work in float64 throughout
(rounding the outputs to the parameters' dtype) and pull gradients back by hand
instead of through autograd.  Tolerances, relative to the largest magnitude of
each reference tensor: float64 1e-10 (observed ~1e-15); float32 1e-5 for values
(observed ~3e-7) and 1e-4 for gradients (observed ~5e-7).  Enumeration
rectangles are integers and must be identical.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("numba")

from napari_neurogs_mip import numba_runtime
from napari_neurogs_mip.model import GaussianModel
from napari_neurogs_mip.render import Renderer, project_cpu
from napari_neurogs_mip.render.project import Projection
from scenes import PARAMETERS, Scene, make_scenes

# The model holds at least one Gaussian (``GaussianModel.validate``); K = 0 is covered by the rasteriser tests.
SCENES = {scene.name: scene for scene in make_scenes() if scene.params["means"].shape[0] > 0}
VALUE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
GRADIENT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def model_of(scene: Scene) -> GaussianModel:
    return GaussianModel(**{name: scene.params[name] for name in PARAMETERS})


def outputs_and_gradients(scene: Scene, projection: Projection) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The three differentiable outputs and the parameter gradients of a fixed random linear loss of them."""
    outputs = [projection.means2d, projection.conics, projection.amplitudes]
    generator = torch.Generator().manual_seed(3)
    loss = sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype)).sum() for t in outputs)
    grads = torch.autograd.grad(loss, [scene.params[name] for name in PARAMETERS])
    return [t.detach() for t in outputs], list(grads)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    assert torch.isfinite(actual).all(), what
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(scale, 1e-30), msg=what)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", sorted(SCENES))
def test_matches_reference(name: str, dtype: torch.dtype) -> None:
    reference_scene, scene = SCENES[name].fresh(dtype), SCENES[name].fresh(dtype)
    want = reference_scene.project()
    got = project_cpu.project_model(model_of(scene), scene.views, scene.eps, scene.compensate)
    assert got.shapes == want.shapes
    assert got.rects.dtype == torch.int32 and torch.equal(got.rects, want.rects), f"{name}: rectangles differ"
    want_values, want_grads = outputs_and_gradients(reference_scene, want)
    values, grads = outputs_and_gradients(scene, got)
    for label, a, b in zip(("means2d", "conics", "amplitudes"), values, want_values):
        assert_close(a, b, VALUE_TOLERANCE[dtype], f"{name} {label}")
    for label, a, b in zip(PARAMETERS, grads, want_grads):
        assert_close(a, b, GRADIENT_TOLERANCE[dtype], f"{name} d/d {label}")


@pytest.mark.parametrize("compensate", [False, True])
def test_gradcheck(compensate: bool) -> None:
    """Finite differences in float64 confirm the hand-written backward (incl. the compensation term)."""
    scene = SCENES["k50"].fresh(torch.float64)
    params = {name: scene.params[name][:6].detach().clone().requires_grad_(True) for name in PARAMETERS}

    def outputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        projection = project_cpu.project_model(GaussianModel(*tensors), scene.views, 0.3, compensate)
        return projection.means2d, projection.conics, projection.amplitudes

    assert torch.autograd.gradcheck(outputs, tuple(params[name] for name in PARAMETERS), eps=1e-6, atol=1e-6)


def test_same_bits_for_any_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Gaussian is handled by one worker, so the result does not depend on the threads."""
    scene = SCENES["k500"]
    monkeypatch.setattr(project_cpu, "_MIN_BLOCKS", 1)  # k500 has 2 blocks: let both threads take one
    results = []
    for threads in (1, 3):
        monkeypatch.setattr(numba_runtime, "THREADS", threads)
        fresh = scene.fresh(torch.float32)
        projection = project_cpu.project_model(model_of(fresh), fresh.views, fresh.eps)
        results.append(outputs_and_gradients(fresh, projection))
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        assert torch.equal(a, b)


def test_renderer_cpu_matches_torch_end_to_end() -> None:
    """``Renderer`` with backend cpu (both numba stages) renders and differentiates as the reference."""
    scene = SCENES["k500"]
    images, grads = {}, {}
    for backend in ("cpu", "torch"):
        fresh = scene.fresh(torch.float64)
        renderer = Renderer.create("cpu", backend, mode="soft", beta=50.0)
        assert renderer.backend == backend
        rendered = renderer.render(model_of(fresh), fresh.views)
        generator = torch.Generator().manual_seed(5)
        loss = sum((img * torch.randn(img.shape, generator=generator, dtype=img.dtype)).sum() for img in rendered)
        grads[backend] = torch.autograd.grad(loss, [fresh.params[name] for name in PARAMETERS])
        images[backend] = [img.detach() for img in rendered]
    for a, b in zip(images["cpu"], images["torch"]):
        assert_close(a, b, 1e-10, "image")
    for name, a, b in zip(PARAMETERS, grads["cpu"], grads["torch"]):
        assert_close(a, b, 1e-10, f"d/d {name}")
    assert Renderer.create("cpu", "cpu").torch_threads == 1
    assert Renderer.create("cpu", "torch").torch_threads is None


def test_rejects_negative_filter() -> None:
    scene = SCENES["single"].fresh(torch.float64)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        project_cpu.project_model(model_of(scene), scene.views, -0.1)


def test_torch_threads_restores_the_setting() -> None:
    from napari_neurogs_mip.device import torch_threads

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"), torch_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
