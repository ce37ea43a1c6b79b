"""FP8 training: float8 GEMMs over torch._scaled_mm (which runs on CPUs in torch 2.13) checked against
bf16 and against their own exact arithmetic, the layers the reference converts, evaluation outside
float8, ordinary checkpoints, torch.compile, and a clear refusal where a device has no float8."""

import pytest
import torch
import torch.nn.functional as F

from trainer import fp8, scaling
from trainer.gpt import GPT, Linear


def relative_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return ((value.double() - exact.double()).norm() / exact.double().norm()).item()


def matmul_case(scale: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 activations (256, 128), an fp32 master weight (384, 128) and an output gradient, × scale."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(256, 128, generator=generator) * scale).bfloat16()
    weight = torch.randn(384, 128, generator=generator) * 0.05
    grad = (torch.randn(256, 384, generator=generator) * scale).bfloat16()
    return x, weight, grad


def float8_matmul(x, weight, grad) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, dx, dW) through Float8Matmul."""
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    y = fp8.Float8Matmul.apply(x, weight)
    y.backward(grad)
    return y, x.grad, weight.grad


def exact_matmul(x, weight, grad) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, dx, dW) in float64 from the unrounded operands."""
    x, weight, grad = x.double(), weight.double(), grad.double()
    return x @ weight.t(), grad @ weight, grad.t() @ x


# cuBLAS, unlike the CPU, wants the second operand column-major and dimensions in multiples of 16.
ON_A_GPU = pytest.param(
    "cuda",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(
            not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= fp8.MIN_CAPABILITY),
            reason="needs a GPU of compute capability ≥ 8.9",
        ),
    ],
)


@pytest.mark.parametrize("device", ["cpu", ON_A_GPU])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_forward_and_backward_match_bf16_within_float8_precision_at_any_magnitude(scale, device) -> None:
    """Dynamic scaling: tensors far outside float8's range (e4m3 tops out at 448 and flushes below 2⁻⁹)
    still multiply to within float8's rounding; bf16 lands ~20× closer, so float8 really was used."""
    x, weight, grad = (t.to(device) for t in matmul_case(scale))
    exact = exact_matmul(x, weight, grad)
    bf16 = (F.linear(x, weight.bfloat16()), grad @ weight.bfloat16(), (grad.t() @ x).float())
    for name, ours, reference, truth, tolerance in zip(
        ("y", "dx", "dW"), float8_matmul(x, weight, grad), bf16, exact, (0.05, 0.08, 0.08), strict=True
    ):
        assert relative_error(ours, truth) < tolerance, name
        assert relative_error(ours, truth) > 5 * relative_error(reference, truth), name


def test_operands_are_e4m3_forward_and_e5m2_for_gradients_each_with_its_own_scale() -> None:
    """Each GEMM equals its quantized operands multiplied exactly and scaled back: x and W in e4m3, the
    output gradient in e5m2 (range for gradients), one scale per tensor from its own amax."""
    x, weight, grad = matmul_case()
    y, dx, dw = float8_matmul(x, weight, grad)

    def dequantized(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        data, inverse_scale = fp8.to_float8(t, dtype)
        return data.double() * inverse_scale.double()

    x8, w8 = dequantized(x, torch.float8_e4m3fn), dequantized(weight, torch.float8_e4m3fn)
    g8 = dequantized(grad, torch.float8_e5m2)
    # Only the bf16 rounding of each output (~0.2%) is left between them.
    assert relative_error(y, x8 @ w8.t()) < 0.005
    assert relative_error(dx, g8 @ w8) < 0.005
    assert relative_error(dw, g8.t() @ x8) < 0.005


def test_the_largest_magnitude_lands_on_the_largest_float8_value_and_nothing_overflows() -> None:
    x = torch.tensor([[0.5, -3.0, 1e-3, 0.0]])
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        data, inverse_scale = fp8.to_float8(x, dtype)
        assert data.dtype == dtype and inverse_scale.dtype == torch.float32
        assert data.float().abs().max() == torch.finfo(dtype).max == -data.float()[0, 1]
        assert torch.isfinite(data.float()).all()
        assert data.float()[0, 1] * inverse_scale == pytest.approx(-3.0)
    zeros, inverse_scale = fp8.to_float8(torch.zeros(2, 2), torch.float8_e4m3fn)
    assert torch.isfinite(inverse_scale) and not zeros.float().any()


def d4() -> GPT:
    """The recipe's CPU model: d4, head dim 64, width 256, vocab 8192."""
    torch.manual_seed(0)
    model = GPT(scaling.model_config(4, vocab_size=8192, sequence_len=64, head_dim=64))
    model.init_weights()
    for linear in (m for m in model.modules() if isinstance(m, Linear)):  # zero-initialised ones too
        torch.nn.init.normal_(linear.weight, std=0.05)
    return model


def test_attention_mlp_and_lm_head_convert_the_small_gates_stay() -> None:
    model = d4()
    assert fp8.convert(model) == (25, 28)  # 6 matrices × 4 layers + lm_head; 2 VE gates + smear gate stay
    float8 = {name for name, m in model.named_modules() if isinstance(m, fp8.Float8Linear)}
    assert "lm_head" in float8 and "blocks.3.mlp.c_proj" in float8 and "blocks.0.attn.c_q" in float8
    assert type(model.smear_gate) is Linear and type(model.blocks[1].attn.ve_gate) is Linear
    # The rule: both dimensions multiples of 16 (float8 GEMMs on GPUs), the smaller at least 128.
    assert fp8.convertible(Linear(128, 4096)) and fp8.convertible(Linear(1024, 256))
    assert not fp8.convertible(Linear(64, 256)) and not fp8.convertible(Linear(136, 256))
    # The reference's d12 (vocab 32768): 73 of its 80 Linear layers, as its log reports.
    with torch.device("meta"):
        assert fp8.convert(GPT(scaling.model_config(12, 32768, 2048))) == (73, 80)


def test_converted_layers_share_the_weights_so_checkpoints_and_the_optimizer_are_unchanged() -> None:
    model = d4()
    weights = {name: p for name, p in model.named_parameters()}
    before = {name: t.clone() for name, t in model.state_dict().items()}
    fp8.convert(model)
    assert dict(model.named_parameters()) == weights  # the same Parameter objects, fp32 masters
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    plain = GPT(model.config)  # a model without --fp8 loads the state as it is
    plain.load_state_dict(after)


def test_evaluation_runs_outside_float8_and_training_inside() -> None:
    model, plain = d4(), d4()
    model.set_compute_dtype(torch.bfloat16)
    plain.set_compute_dtype(torch.bfloat16)
    fp8.convert(model)
    tokens = torch.randint(0, 8192, (2, 64), generator=torch.Generator().manual_seed(1))
    model.eval()
    plain.eval()
    assert torch.equal(model(tokens), plain(tokens))
    model.train()
    plain.train()
    trained, reference = model(tokens, tokens).item(), plain(tokens, tokens).item()
    assert trained != reference and trained == pytest.approx(reference, rel=0.01)


def test_compiled_float8_layer_equals_eager_in_one_graph() -> None:
    torch.manual_seed(0)
    linear = fp8.Float8Linear(128, 256)
    torch.nn.init.normal_(linear.weight, std=0.05)
    x = torch.randn(2, 16, 128).bfloat16()
    compiled = torch.compile(linear, fullgraph=True, dynamic=False)  # fullgraph: no graph break allowed
    outputs = []
    for module in (linear, compiled):
        y = module(x)
        y.float().square().sum().backward()
        outputs.append((y, linear.weight.grad))
        linear.weight.grad = None
    (eager, eager_grad), (graph, graph_grad) = outputs
    assert torch.equal(eager, graph) and torch.equal(eager_grad, graph_grad)


def test_the_cpu_runs_float8_and_an_older_gpu_is_refused_in_one_line(monkeypatch) -> None:
    fp8.check_device(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(SystemExit) as refusal:
        fp8.check_device(torch.device("cuda", 0))
    assert str(refusal.value) == (
        "--fp8: NVIDIA A100-SXM4-80GB (compute capability 8.0) has no float8 matmuls; they need 8.9 or "
        "newer (Ada, Hopper, Blackwell). Train without --fp8"
    )


def test_a_device_whose_torch_lacks_float8_matmuls_is_refused_with_the_reason(monkeypatch) -> None:
    def missing(*args, **kwargs):
        raise RuntimeError("_scaled_mm is not implemented for this device\nlong trace")

    monkeypatch.setattr(torch, "_scaled_mm", missing)
    with pytest.raises(SystemExit, match=r"cannot run float8 matmuls on cpu \(_scaled_mm is not implemented"):
        fp8.check_device(torch.device("cpu"))
