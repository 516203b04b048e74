"""torch.compile(fullgraph=True) of the fused models: no graph break, the compiled model as the
eager one.

  * CPU, reference backend, float64: resnet18 compiled with Inductor against torchvision (eval
    logits and two SGD steps: logits, every gradient, parameters, running statistics) and
    against the eager fused model (equal to rounding at every step);
  * GPU (needs_cuda), every backend: Inductor in float32, eval and one training step against
    the eager fused model within 2x its error against float64; one Dynamo graph whose nodes
    call the selected backend's ops, and Inductor's generated code runs them (reference/cuda:
    the custom op is called from the wrapper; triton: the triton_op is traced into and our
    Triton kernels appear in the code).

(The autocast rule inside a compiled graph: test_autocast.py.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from model_twins import float_state, fused_model, images, model_twins
from recorders import NAMESPACES, OpRecorder, assert_model_ran_on
from resnet_fused.tolerances import FLOOR_ULPS, assert_close_to_ref, assert_within_2x, check_step, rel_err
from training_loops import float_loss, perturbed_copy, sgd_steps

import resnet_fused

F64 = torch.float64

# The Triton kernels (resnet_fused/backends/triton/kernels/) Inductor emits when it traces into the
# triton_ops: the forward implicit-GEMM conv, the training backward's dz pass and dgrad.
TRITON_KERNELS = {"forward": "_conv_fwd_kernel", "backward": ("_bn_bwd_dz_kernel", "_conv_dgrad_kernel")}


@pytest.mark.slow
def test_compile_fullgraph_resnet18_eval_and_train():
    """fullgraph=True (a graph break raises) with Inductor on CPU: eval logits and two SGD
    steps (logits, every gradient, parameters, running statistics) as eager."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    tv, fused = model_twins("resnet18", F64, num_classes=10)
    perturbed = perturbed_copy(tv)
    eager = copy.deepcopy(fused)
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(4, 3, 32, 32, dtype=F64)
    for m in (tv, eager, compiled):
        m.eval()
    with torch.no_grad():
        y = compiled(x)
        assert rel_err(y, tv(x)) <= 1e-12 and rel_err(y, eager(x)) <= 1e-12, "eval logits"
    inputs = [torch.randn(4, 3, 32, 32, dtype=F64) for _ in range(2)]
    r_c = sgd_steps(compiled, inputs)
    r_tv, r_e, r_p = sgd_steps(tv, inputs), sgd_steps(eager, inputs), sgd_steps(perturbed, inputs)
    for step in range(2):
        check_step("logits", r_tv[step][0], r_c[step][0], r_p[step][0], step)
        # The same ops run in the compiled and the eager fused model: equal to rounding at every step.
        assert rel_err(r_c[step][0], r_e[step][0]) <= 1e-12, f"step {step} logits vs eager fused"
        for i, (name, _) in enumerate(tv.named_parameters()):
            check_step(f"grad {name}", r_tv[step][1][i], r_c[step][1][i], r_p[step][1][i], step)
            assert rel_err(r_c[step][1][i], r_e[step][1][i]) <= 1e-12, f"step {step} grad {name} vs eager fused"
    for (key, a), (_, b), (_, c) in zip(float_state(tv), float_state(fused), float_state(perturbed)):
        check_step(key, a, b, c, 1)
    for (key, a), b in zip(tv.state_dict().items(), fused.state_dict().values()):
        if not a.is_floating_point():
            assert torch.equal(a, b), key  # num_batches_tracked
    # One graph for eval, one for training; the second training step reuses it (no recompile).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


# ------------------------------------------------------------------------------------------
# GPU: every backend, Inductor's code checked.


def _assert_in_code(code: str, backend: str, op: str, phase: str) -> None:
    """Inductor's generated code runs `op` on `backend`: reference and cuda ops are extern
    calls of the custom op; a triton_op is traced into, so its Triton kernels appear instead
    (the op's name is accepted too, should Inductor keep it as an extern call)."""
    ns = NAMESPACES[backend]
    markers = [f"{ns}.{op}.default("]  # the call of the op in the wrapper code
    if backend == "triton":
        kernels = TRITON_KERNELS[phase]
        markers += [kernels] if isinstance(kernels, str) else list(kernels)
    assert any(m in code for m in markers), f"{phase}: none of {markers} in Inductor's code"
    if backend != "reference":
        assert "resnet_fused.conv_bn" not in code, f"{phase}: a unit fell back to the reference op"
        assert "aten.convolution" not in code and "extern_kernels.convolution" not in code, (
            f"{phase}: an aten convolution in the compiled code")


def compile_check(backend, training, device="cuda", dtype=torch.float32, batch=4, hw=64, compiler="inductor"):
    """torch.compile(fused resnet18, fullgraph=True) against the eager fused model: logits and,
    in training, one step's gradients and running statistics, within 2x eager's error against
    float64; one graph calling `backend`'s ops; Inductor's code runs them."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._inductor.utils import run_and_get_code

    model = fused_model("resnet18", dtype, device).train(training)
    eager, ref64 = copy.deepcopy(model), copy.deepcopy(model).double()
    counter = CompileCounterWithBackend(compiler)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = images(batch, hw, dtype, device)

    def run(m, inp):
        with torch.set_grad_enabled(training):
            out = m(inp)
            if training:
                float_loss(out).backward()
        return out.detach()

    op = "conv_bn_train" if training else "conv_bn_eval"
    with resnet_fused.use_backend(backend):
        if compiler == "inductor":
            out_c, codes = run_and_get_code(run, compiled, x)  # (resets Dynamo first)
        else:
            torch._dynamo.reset()
            out_c, codes = run(compiled, x), None
        rec = OpRecorder()
        with rec:
            out_e = run(eager, x)
        assert_model_ran_on(rec, backend, op, *([f"{op}_backward"] if training else []))
    with resnet_fused.use_backend("reference"):
        out_64 = run(ref64, x.double())

    assert counter.frame_count == 1, f"{counter.frame_count} graphs (a graph break or a recompile)"
    targets = {str(node.target) for g in counter.graphs for node in g.graph.nodes if node.op == "call_function"}
    assert any(f"{NAMESPACES[backend]}.{op}" in t for t in targets), f"{op} of {backend} not in the graph: {targets}"
    if codes is not None:
        code = "\n".join(codes)
        assert codes, "Inductor generated no code"
        _assert_in_code(code, backend, op, "forward")
        if training:
            _assert_in_code(code, backend, f"{op}_backward", "backward")

    assert_close_to_ref(out_c, out_e, out_64, "logits", metric="l2")
    if not training:
        return
    floor = FLOOR_ULPS * torch.finfo(dtype).eps
    grads = [[p.grad for p in m.parameters()] for m in (model, eager, ref64)]
    assert all(g is not None for g in grads[0]), "a parameter of the compiled model got no gradient"
    assert_within_2x("gradients", grads[0], grads[1], grads[2], floor)
    states = [[v for _, v in float_state(m)] for m in (model, eager, ref64)]
    assert_within_2x("parameters and running statistics", states[0], states[1], states[2], floor)
    for (key, a), (_, b) in zip(model.named_buffers(), eager.named_buffers()):
        if not a.is_floating_point():
            assert torch.equal(a, b), key  # num_batches_tracked


@pytest.mark.needs_cuda
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_compile_fullgraph_resnet18_gpu(backend, training):
    """torch.compile(fullgraph=True) with Inductor, float32: eval logits, or one training step,
    as the eager fused model; the compiled graph runs the selected backend's ops."""
    if backend.interpreted:
        pytest.skip("the Triton interpreter runs CPU tensors only")
    compile_check(backend.name, training)
