"""One accounting convention: parameter counts against an independent build (HF's PhimoeForCausalLM),
FLOPs per token against an explicit count, and the trainer's MFU, ``bench`` and ``plan`` all using it."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from grin_testing import tiny_config
from megatron_grin import accounting
from megatron_grin.config import preset

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_grin"


@pytest.mark.parametrize("cfg", [tiny_config(), tiny_config(num_experts=7, moe_router_topk=3, kv_channels=20),
                                 preset("grin-16x3.8b")], ids=["tiny", "odd", "grin"])
def test_parameter_counts_equal_hf_phimoe(cfg):
    """HF's model is an independent implementation of the architecture: the same parameters, unpadded vocab."""
    import torch
    from transformers import PhimoeConfig, PhimoeForCausalLM

    from megatron_grin.convert.hf_keys import hf_config_dict

    hf_cfg = PhimoeConfig(**{k: v for k, v in hf_config_dict(cfg).items() if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        model = PhimoeForCausalLM(hf_cfg)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    counts = accounting.parameter_counts(cfg)
    assert counts["total"] == total and counts["expert"] == experts
    assert counts["active"] == total - experts + experts * cfg.moe_router_topk // cfg.num_experts


def test_grin_flops_per_token_explicit_count():
    """GRIN: 6 x (active params without the embedding) + 12 L heads head_dim seq, written out."""
    h, v, L = 4096, 32064, 32
    attention = h * 128 * (32 + 16) + 128 * (32 + 16) + 32 * 128 * h + h  # qkv + bias, o_proj + bias
    layer = attention + 4 * h + 16 * h + 2 * 3 * h * 6400  # norms, router, two of 16 experts
    head = v * h + v + 2 * h
    expected_params = 6.0 * (L * layer + head)
    got = accounting.flops_per_token(preset("grin-16x3.8b"), 4096)
    assert got["params"] == expected_params
    assert got["attention"] == 12.0 * L * 32 * 128 * 4096
    assert got["total"] / 1e9 == pytest.approx(45.5, abs=0.05)


def test_trainer_mfu_and_plan_use_the_accounting_numbers():
    from megatron_grin.plan import planner
    from megatron_grin.plan.layout import Implementation, Layout
    from megatron_grin.training import metrics

    cfg = preset("grin-16x3.8b", num_layers=2)
    assert metrics.flops_per_token(cfg, 4096) == accounting.flops_per_token(cfg, 4096)["total"]
    plan = planner.evaluate(cfg, Layout(gpus=1, micro_batch_size=2, global_batch_size=8, seq_length=4096),
                            Implementation(attention="unfused"))
    tok_s = plan.time["tokens_per_s_per_gpu"]
    assert plan.time["mfu"] == pytest.approx(accounting.mfu(tok_s, cfg, 4096, plan.assumptions.peak_tflops * 1e12),
                                             rel=1e-12)


def _calls_and_defs(module: str) -> tuple[set[str], set[str]]:
    tree = ast.parse((PACKAGE / module).read_text())
    defs = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    calls = {f"{n.func.value.id}.{n.func.attr}" for n in ast.walk(tree) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return defs, calls | names


@pytest.mark.parametrize("owner", ["training", "bench", "plan"])
def test_flops_and_peaks_have_one_owner(owner):
    """No copy of the FLOPs formula, the peak table or the parameter counter outside accounting.py: the
    trainer's MFU, bench and plan each call accounting.flops_per_token."""
    used_everywhere = set()
    for path in sorted((PACKAGE / owner).glob("*.py")):
        defs, used = _calls_and_defs(f"{owner}/{path.name}")
        assert not {"parameter_counts", "model_flops_per_token"} & defs, path
        assert not {"PEAK_TFLOPS", "GPU_PEAK_TFLOPS_BF16"} & used, path
        used_everywhere |= used
    assert "accounting.flops_per_token" in used_everywhere or "flops_per_token" in used_everywhere


def test_datasheet_lookup_prefers_the_specific_name():
    assert accounting.device_entry("NVIDIA GH200 480GB")[0] == "GH200"
    assert accounting.device_entry("NVIDIA H100 PCIe")[0] == "H100 PCIe"
    assert accounting.datasheet_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert accounting.datasheet_peak_tflops("NVIDIA H100 80GB HBM3", bf16=False) == 494.7
    assert accounting.datasheet_peak_tflops("a toaster") is None


def test_accounting_imports_no_torch_or_megatron():
    code = ("import sys, megatron_grin.accounting; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'transformers')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
