"""Module state: what users do with a model object keeps the fused model a fused model with
the same numbers.

  * torch.save / torch.load, pickle and copy.deepcopy of the whole model, a state_dict loaded
    into a fresh model;
  * .to(dtype), channels_last and .half();
  * a frozen stem (requires_grad False), torch.no_grad and torch.inference_mode, in train and
    eval;
  * torch.export and ONNX export of to_torchvision's model (of the fused model itself:
    test_ecosystem.py).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from model_twins import model_twins
from resnet_fused.tolerances import FLOOR_ULPS, aggregate_rel_l2, rel_err
from training_loops import sgd_steps

import resnet_fused

F64 = torch.float64


def test_torch_export_after_to_torchvision():
    tv, fused = model_twins("resnet18", torch.float32, num_classes=10)
    fused.eval(), tv.eval()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(resnet_fused.to_torchvision(fused), (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), tv(x), rtol=0, atol=0)


def test_onnx_export_after_to_torchvision(tmp_path):
    pytest.importorskip("onnx")
    _, fused = model_twins("resnet18", torch.float32, num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    torch.onnx.export(resnet_fused.to_torchvision(fused).eval(), (x,), str(tmp_path / "r18.onnx"))
    assert (tmp_path / "r18.onnx").stat().st_size > 0


def test_pickle_deepcopy_state_dict():
    tv, fused = model_twins("resnet18", torch.float32, num_classes=10)
    tv.eval(), fused.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = fused(x)
        buffer = io.BytesIO()
        torch.save(fused, buffer)
        buffer.seek(0)
        copies = [pickle.loads(pickle.dumps(fused)), copy.deepcopy(fused),
                  torch.load(buffer, weights_only=False)]
        for c in copies:
            assert type(c) is resnet_fused.ResNet and type(c.layer1[0]) is resnet_fused.nn.BasicBlock
            assert torch.equal(c(x), expected)
        fresh = resnet_fused.resnet18(num_classes=10).eval()
        fresh.load_state_dict(pickle.loads(pickle.dumps(fused.state_dict())), strict=True)
        assert torch.equal(fresh(x), expected)
        torch.testing.assert_close(expected, tv(x), rtol=1e-4, atol=1e-4)


def test_to_dtype_memory_format_and_half():
    tv, fused = model_twins("resnet18", torch.float32, num_classes=10)
    tv.eval(), fused.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tv64, f64 = copy.deepcopy(tv).to(F64), copy.deepcopy(fused).to(F64)
        out = f64(x.double())
        assert out.dtype == F64 and rel_err(out, tv64(x.double())) <= 1e-12
        tv_cl = copy.deepcopy(tv64).to(memory_format=torch.channels_last)
        f_cl = copy.deepcopy(f64).to(memory_format=torch.channels_last)
        assert f_cl.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
        x_cl = x.double().contiguous(memory_format=torch.channels_last)
        assert rel_err(f_cl(x_cl), tv_cl(x_cl)) <= 1e-12
        tv_h, f_h = copy.deepcopy(tv).half(), copy.deepcopy(fused).half()
        assert all(p.dtype == torch.float16 for p in f_h.parameters())
        try:
            out_tv = tv_h(x.half())
        except RuntimeError as exc:  # no float16 convolution on this CPU build: fail the same way
            with pytest.raises(RuntimeError):
                f_h(x.half())
            pytest.skip(f"float16 convolution unsupported on CPU here: {exc}")
        out_f = f_h(x.half())
        assert out_f.dtype == out_tv.dtype == torch.float16
        ref = tv64(x.double())
        err_f, err_tv = aggregate_rel_l2([out_f], [ref]), aggregate_rel_l2([out_tv], [ref])
        assert err_f <= 2 * err_tv + FLOOR_ULPS * torch.finfo(torch.float16).eps, (err_f, err_tv)


def test_frozen_stem_no_grad_inference_mode():
    tv, fused = model_twins("resnet18", F64, num_classes=10)
    for m in (tv, fused):
        m.conv1.requires_grad_(False), m.bn1.requires_grad_(False)
    x = torch.randn(4, 3, 32, 32, dtype=F64)
    r_tv, r_f = sgd_steps(tv, [x]), sgd_steps(fused, [x])
    assert rel_err(r_f[0][0], r_tv[0][0]) <= 1e-9
    assert fused.conv1.weight.grad is None and fused.bn1.weight.grad is None and fused.bn1.bias.grad is None
    assert [g is None for g in r_f[0][1]] == [g is None for g in r_tv[0][1]]
    for (name, a), b in zip(tv.named_parameters(), fused.parameters()):
        if a.requires_grad:
            assert rel_err(b.grad, a.grad) <= 1e-9, name
    for (key, a), b in zip(tv.state_dict().items(), fused.state_dict().values()):
        assert rel_err(b, a) <= 1e-9, key  # the frozen stem's BN still tracks statistics in train()
    for ctx in (torch.no_grad, torch.inference_mode):
        for mode in (True, False):
            tv.train(mode), fused.train(mode)
            with ctx():
                out_tv, out_f = tv(x), fused(x)
            assert not out_f.requires_grad and out_f.is_inference() == out_tv.is_inference()
            assert rel_err(out_f, out_tv) <= 1e-9
    for (key, a), b in zip(tv.state_dict().items(), fused.state_dict().values()):
        assert rel_err(b, a) <= 1e-9, key  # running statistics updated under no_grad/inference_mode too
