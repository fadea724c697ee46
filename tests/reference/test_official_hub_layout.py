"""The Hub's adapter files: folders laid out as McGill-NLP's Sheared-LLaMA adapters, read by both libraries.

`McGill-NLP/LLM2Vec-Sheared-LLaMA-mntp` holds a bf16 `adapter_model.safetensors` (30 MB: r = 16 on
the seven projections of 24 layers, 2 bytes a number), an `adapter_config.json` written by the PEFT
of April 2024, `config.json` (the base's, naming a remote-code class), the tokenizer files, and two
remote-code files, `modeling_llama_encoder.py` and `attn_mask_utils.py`; the `-mntp-unsup-simcse`
repository holds a second bf16 adapter. The fixtures below are built the same way on a tiny Llama
with the Llama-2 vocabulary. The remote-code files are stand-ins of our own that leave a mark if
anything imports them: neither loader may (the official one does not pass `trust_remote_code`).

Checked: our `LLM2Vec.from_pretrained(base, adapters=[mntp, simcse])` against the official
`LLM2Vec.from_pretrained(mntp, peft_model_name_or_path=simcse)` (the parity bar of the reference
tier), and our merge of a bf16 adapter into fp32 weights against peft's `merge_and_unload`.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_tier import cosine_distance, official_encode, run_official
from test_official_parity import MIXED, PLAIN, assert_parity

TARGETS = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 16, 32
REMOTE_CODE = ("modeling_llama_encoder.py", "attn_mask_utils.py")


def older_peft_config(base_model_name_or_path: str) -> str:
    """adapter_config.json with the fields PEFT 0.10 (April 2024) wrote, sorted, indented by 2, as it
    wrote them; the auto_mapping names the remote-code class the adapter was trained on."""
    config = {
        "alpha_pattern": {}, "auto_mapping": {"base_model_class": "LlamaEncoderModel",
                                              "parent_library": "modeling_llama_encoder"},
        "base_model_name_or_path": base_model_name_or_path, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
        "layers_to_transform": None, "loftq_config": {}, "lora_alpha": ALPHA, "lora_dropout": 0.05,
        "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
        "peft_type": "LORA", "r": R, "rank_pattern": {}, "revision": None, "target_modules": TARGETS,
        "task_type": None, "use_dora": False, "use_rslora": False}
    return json.dumps(config, indent=2, sort_keys=True)


def remote_code_stand_in(marker: Path, name: str) -> str:
    """A file in place of the Hub's remote code: it defines a class and records that it was imported."""
    return (f'"""A stand-in for the Hub\'s {name}, written for this test. Importing it leaves a mark:\n'
            f'no loader of an LLM2Vec folder may execute it."""\n\n'
            f'from pathlib import Path\n\n'
            f'Path({str(marker)!r}).write_text(__name__)\n\n\n'
            f'class LlamaEncoderModel:\n    pass\n')


def bf16_adapter(config: dict, seed: int, std: float) -> dict:
    """Random LoRA matrices in bf16 under the keys the official MNTP run saves (peft on a LlamaModel)."""
    g = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden),
              "o_proj": (hidden, hidden), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
              "down_proj": (hidden, inter)}  # (out, in)
    tensors = {}
    for i in range(config["num_hidden_layers"]):
        for proj, (out_features, in_features) in shapes.items():
            block = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.layers.{i}.{block}.{proj}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(R, in_features, generator=g) * std).bfloat16()
            tensors[f"{key}.lora_B.weight"] = (torch.randn(out_features, R, generator=g) * std).bfloat16()
    return tensors


@pytest.fixture(scope="module")
def hub(tiny_llama2, tmp_path_factory):
    """{base, mntp, simcse, marker}: the McGill-NLP layout on the tiny Llama-2-vocabulary model."""
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp("hub")
    base = Path(tiny_llama2["base"])
    mntp, simcse = root / "LLM2Vec-Sheared-LLaMA-mntp", root / "LLM2Vec-Sheared-LLaMA-mntp-unsup-simcse"
    marker = root / "REMOTE_CODE_WAS_IMPORTED"
    for folder in (mntp, simcse):
        folder.mkdir()
        (folder / "README.md").write_text("An LLM2Vec adapter (a test fixture).\n")
    # MNTP: the adapter beside the base's config (naming the remote-code class), the tokenizer, the code
    save_file(bf16_adapter(tiny_llama2["config"], seed=1, std=0.05), mntp / "adapter_model.safetensors",
              metadata={"format": "pt"})
    # the Hub names the base by its Hub id; transformers resolves it, here it is the local folder
    (mntp / "adapter_config.json").write_text(older_peft_config(str(base)))
    config = json.loads((base / "config.json").read_text())
    config.update(architectures=["LlamaEncoderModel"], torch_dtype="bfloat16",
                  auto_map={"AutoModel": "modeling_llama_encoder.LlamaEncoderModel"})
    (mntp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (mntp / name).write_bytes((base / name).read_bytes())
    special = {"content": None, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    (mntp / "special_tokens_map.json").write_text(json.dumps(
        {k: dict(special, content=v) for k, v in (("bos_token", "<s>"), ("eos_token", "</s>"),
                                                  ("unk_token", "<unk>"))}, indent=2))
    for name in REMOTE_CODE:
        (mntp / name).write_text(remote_code_stand_in(marker, name))
    # SimCSE: the second adapter alone, naming the base by a Hub id that does not resolve here
    save_file(bf16_adapter(tiny_llama2["config"], seed=2, std=0.05), simcse / "adapter_model.safetensors",
              metadata={"format": "pt"})
    (simcse / "adapter_config.json").write_text(older_peft_config("princeton-nlp/Sheared-LLaMA-1.3B"))
    return dict(base=str(base), mntp=str(mntp), simcse=str(simcse), marker=marker, work=root)


def test_the_fixture_is_laid_out_as_the_hub(hub):
    from llm2vec_mini.convert.safetensors import load_file
    assert sorted(p.name for p in Path(hub["mntp"]).iterdir()) == sorted([
        "README.md", "adapter_config.json", "adapter_model.safetensors", "attn_mask_utils.py", "config.json",
        "modeling_llama_encoder.py", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"])
    tensors = load_file(Path(hub["mntp"]) / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert all(k.startswith("base_model.model.layers.") for k in tensors)  # no ".default", no "model.model"
    # the marker works: importing a stand-in leaves it (so its absence below means something)
    probe = hub["work"] / "probe"
    probe.mkdir()
    (probe / "stand_in.py").write_text(remote_code_stand_in(probe / "mark", "probe"))
    subprocess.run([sys.executable, "-c", "import stand_in"], cwd=probe, check=True)
    assert (probe / "mark").exists()


def test_our_adapters_in_order_match_the_official_hub_loading(hub):
    from llm2vec_mini.encoder import LLM2Vec
    (ref, info), (ref_plain, _) = official_encode(
        dict(work=hub["work"], mntp=hub["mntp"], simcse=hub["simcse"]),
        [dict(texts=MIXED, batch_size=7), dict(texts=PLAIN, batch_size=3)], "hub")
    assert info["model_class"] == "PeftModel"  # the SimCSE adapter on top of the merged MNTP model
    ours = LLM2Vec.from_pretrained(hub["base"], adapters=[hub["mntp"], hub["simcse"]], device="cpu",
                                  dtype="float32")  # fp32: the parity bar is fp32's
    assert_parity("base + [mntp, simcse] against the official Hub loading", ours.encode(MIXED, batch_size=7),
                  ref)
    assert_parity("plain texts", ours.encode(PLAIN, batch_size=3), ref_plain)
    # the Hub way with our loader too: the MNTP folder as the model (it names its base)
    hub_way = LLM2Vec.from_pretrained(hub["mntp"], adapters=[hub["simcse"]], device="cpu", dtype="float32")
    assert_parity("mntp folder + simcse", hub_way.encode(MIXED, batch_size=7), ref)
    # the adapters matter: without SimCSE the embeddings differ
    mntp_only = LLM2Vec.from_pretrained(hub["base"], adapters=[hub["mntp"]], device="cpu", dtype="float32")
    assert np.abs(mntp_only.encode(PLAIN, batch_size=3) - ref_plain).max() > 1e-3 * np.abs(ref_plain).max()
    worst = [cosine_distance(model.encode(MIXED, batch_size=7), ref).max() for model in (ours, hub_way)]
    print(f"max 1 - cos: {worst[0]:.1e} (base + adapters), {worst[1]:.1e} (the mntp folder as the model)")
    assert not hub["marker"].exists(), "a loader imported the remote-code stand-in"
    assert "modeling_llama_encoder" not in sys.modules


def test_a_bf16_adapter_merges_into_fp32_weights_as_peft_merges_it(hub, tmp_path):
    from llm2vec_mini.convert.hf import load_pretrained
    from llm2vec_mini.convert.safetensors import load_file
    job = dict(base=hub["base"], adapter=hub["mntp"], out=str(tmp_path / "merged.safetensors"))
    run_official("peft-merge", job, tmp_path)
    theirs = load_file(job["out"])  # LlamaBiModel's state dict: layers.{i}..., embed_tokens, norm
    model, _ = load_pretrained(hub["base"], adapters=[hub["mntp"]])
    ours = model.model.state_dict()
    base = load_pretrained(hub["base"])[0].model.state_dict()
    adapter = load_file(Path(hub["mntp"]) / "adapter_model.safetensors")
    assert set(theirs) <= set(ours)
    worst, wrong_way = 0.0, 0.0
    for name, ref in theirs.items():
        assert ours[name].dtype == ref.dtype == torch.float32, name
        scale = float(ref.abs().max())
        worst = max(worst, float((ours[name] - ref).abs().max()) / scale)
        key = f"base_model.model.{name.removesuffix('.weight')}"
        if f"{key}.lora_A.weight" in adapter:
            assert float((ref - base[name]).abs().max()) > 1e-3 * scale  # the adapter did change it
            # a merge that multiplies in bf16 (a way to get it wrong) lands elsewhere
            a, b = adapter[f"{key}.lora_A.weight"], adapter[f"{key}.lora_B.weight"]
            bf16_product = base[name] + (b @ a).float() * (ALPHA / R)
            wrong_way = max(wrong_way, float((bf16_product - ref).abs().max()) / scale)
    print(f"max |ours - peft| / max |W| = {worst:.1e}; a bf16 product would be {wrong_way:.1e} off")
    assert worst <= 1e-6
    assert wrong_way > 1e-4  # the bar above tells the two apart
