"""GGUF: the reader vs gguf-py, the dequantisers vs gguf-py bit for bit, the Q/K permutation, the Llama
mapping vs transformers (a tiny random model written here, and SmolLM2 vs transformers' GGUF loader),
and malformed files built byte by byte in the tests."""

import struct

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import GGUFValueType as VT  # noqa: E402
from gguf.quants import dequantize as ref_dequantize  # noqa: E402
from gguf.quants import quantize as ref_quantize  # noqa: E402

from llm2vec_mini.convert.gguf import (  # noqa: E402
    GGML_TYPES,
    dequantize,
    gguf_config,
    load_gguf,
    load_gguf_model,
    permute_qk,
    read_gguf,
    unpermute_qk,
)
from llm2vec_mini.errors import CheckpointError  # noqa: E402


def bits(a: np.ndarray) -> np.ndarray:
    """float32 array -> its bit patterns, so that -0.0 != 0.0 and NaN == NaN in comparisons."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# -------------------------------------------------------------------------------------------------
# A byte-level GGUF builder, written from the spec here (independent of the reader under test).

def s(text) -> bytes:  # a GGUF string
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def build(path, kvs=(), tensors=(), version=3, magic=b"GGUF", alignment=32, n_tensors=None, n_kv=None):
    """tensors: (name, ne (ggml order), ggml type, data bytes); offsets are laid out aligned."""
    infos, data, offset = b"", b"", 0
    for name, ne, gtype, blob in tensors:
        infos += s(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        infos += struct.pack("<IQ", gtype, offset)
        padded = blob + b"\0" * (-len(blob) % alignment)
        data += padded
        offset += len(padded)
    header = magic + struct.pack("<I", version)
    header += struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors,
                          len(kvs) if n_kv is None else n_kv)
    head = header + b"".join(kvs) + infos
    path.write_bytes(head + b"\0" * (-len(head) % alignment) + data)
    return path


def f32_tensor(name, rows, cols, seed=0):
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return (name, (cols, rows), 0, w.tobytes()), w


# -------------------------------------------------------------------------------------------------
# The reader

def test_type_table_matches_gguf_py():
    for type_id, (name, block, nbytes) in GGML_TYPES.items():
        assert QT(type_id).name == name
        if name == "Q8_1":  # gguf-py still has the old float layout (40); ggml's block_q8_1 is 36 bytes
            continue
        assert gguf.GGML_QUANT_SIZES[QT(type_id)] == (block, nbytes), name


def test_every_value_type_matches_what_gguf_py_wrote(tmp_path):
    path = tmp_path / "values.gguf"
    w = gguf.GGUFWriter(path, arch="llama")
    values = {"u8": (255, w.add_uint8), "i8": (-128, w.add_int8), "u16": (65535, w.add_uint16),
              "i16": (-32768, w.add_int16), "u32": (2**32 - 1, w.add_uint32), "i32": (-2**31, w.add_int32),
              "f32": (0.1, w.add_float32), "u64": (2**64 - 1, w.add_uint64), "i64": (-2**63, w.add_int64),
              "f64": (0.1, w.add_float64), "yes": (True, w.add_bool), "no": (False, w.add_bool),
              "text": ("héllo ▁wörld 🙂", w.add_string)}
    for key, (value, add) in values.items():
        add(key, value)
    w.add_array("ints", [1, -2, 3])
    w.add_array("floats", [0.5, -1.25])
    w.add_array("strings", ["a", "", "ü"])
    w.add_key_value("bools", [True, False, True], VT.ARRAY, sub_type=VT.BOOL)
    w.add_array("nested", [[1, 2], [3]])
    w.add_array("nested_strings", [["x", "y"], ["z"]])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    f = read_gguf(path)
    assert f.version == 3 and f.tensors == {} and f.alignment == 32  # vocab-only style: no tensors
    assert f.metadata["general.architecture"] == "llama"
    for key, (value, _) in values.items():
        expected = float(np.float32(value)) if key == "f32" else value
        assert f.metadata[key] == expected and type(f.metadata[key]) is type(expected), key
    assert f.metadata["ints"] == [1, -2, 3]
    assert f.metadata["floats"] == [0.5, -1.25]
    assert f.metadata["strings"] == ["a", "", "ü"]
    assert f.metadata["bools"] == [True, False, True]
    assert f.metadata["nested"] == [[1, 2], [3]]
    assert f.metadata["nested_strings"] == [["x", "y"], ["z"]]


def _assert_same_as_gguf_py(f, reader):
    fields = {k: v for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    assert set(f.metadata) == set(fields)
    for key, field in fields.items():
        assert f.metadata[key] == field.contents(), key
    assert list(f.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = f.tensors[t.name]
        assert info.shape == tuple(int(n) for n in reversed(t.shape)), t.name
        assert (info.ggml_type, info.offset, info.nbytes) == (int(t.tensor_type), t.data_offset, t.n_bytes)


def test_reader_on_vocab_only_files(data_dir):
    path = data_dir / "tokenizers" / "ggml-vocab-llama-spm.gguf"  # tokens, f32 scores, i32 types, bools
    f = read_gguf(path)
    assert f.tensors == {} and f.version == 3
    _assert_same_as_gguf_py(f, gguf.GGUFReader(path))  # gguf-py's reader is slow: one file is enough
    f = read_gguf(data_dir / "tokenizers" / "ggml-vocab-gpt-2.gguf")
    assert f.tensors == {} and len(f.metadata["tokenizer.ggml.tokens"]) == 50257
    merges = f.metadata["tokenizer.ggml.merges"]
    assert len(merges) == 50000 and merges[0] == "Ġ t"


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_gguf):
    return gguf.GGUFReader(smollm2_gguf)


@pytest.mark.real_model
def test_reader_matches_gguf_py_on_smollm2(smollm2_gguf, smollm2_reader):
    f = read_gguf(smollm2_gguf)
    assert isinstance(f.data, np.memmap)  # the data is mapped, not read into memory
    assert f.path == str(smollm2_gguf) and f.version == 3 and len(f.tensors) == 272
    _assert_same_as_gguf_py(f, smollm2_reader)


# -------------------------------------------------------------------------------------------------
# Dequantisers

@pytest.mark.real_model
def test_dequantisers_bit_exact_on_smollm2_tensors(smollm2_gguf, smollm2_reader):
    f, reader = read_gguf(smollm2_gguf), smollm2_reader
    seen = set()
    for t in reader.tensors:  # every tensor of two layers, the embedding (Q8_0) and the final norm
        if not t.name.startswith(("blk.0.", "blk.29.", "token_embd", "output_norm")):
            continue
        ours = f.tensor(t.name)
        assert ours.dtype == np.float32 and ours.shape == f.tensors[t.name].shape
        ref = ref_dequantize(np.asarray(t.data), t.tensor_type).reshape(ours.shape)
        np.testing.assert_array_equal(bits(ours), bits(ref), err_msg=t.name)
        seen.add(t.tensor_type.name)
    assert seen == {"Q8_0", "Q4_1", "F32"}


# Byte positions of the fp16 scales in each block, to keep them finite (random bytes elsewhere).
FP16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
               "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


@pytest.mark.parametrize("type_name", list(FP16_FIELDS))
def test_dequantisers_bit_exact_on_random_blocks(type_name):
    qtype = QT[type_name]
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(hash(type_name) % 2**32)
    blocks = rng.integers(0, 256, (24, nbytes), dtype=np.uint8)
    for at in FP16_FIELDS[type_name]:
        scales = rng.normal(0, 0.05, 24).astype(np.float16)
        scales[:2] = [0.0, -0.0]  # zero scales and their sign
        blocks[:, at:at + 2] = scales.view(np.uint8).reshape(24, 2)
    shape = (4, 6 * block)
    ours = dequantize(blocks, int(qtype), shape)
    ref = ref_dequantize(blocks.reshape(-1), qtype).reshape(shape)
    np.testing.assert_array_equal(bits(ours), bits(ref))


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16", "F16", "F32"])
def test_dequantisers_on_gguf_py_quantised_weights(type_name):
    x = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)
    qtype = QT[type_name]
    q = ref_quantize(x, qtype)
    ours = dequantize(q.view(np.uint8), int(qtype), x.shape)
    np.testing.assert_array_equal(bits(ours), bits(ref_dequantize(q, qtype)))
    # An independent sanity check: dequantise(quantise(x)) is close to x.
    tol = {"Q4_0": 0.6, "Q4_1": 0.4, "Q5_0": 0.3, "Q5_1": 0.2, "Q8_0": 0.03}.get(type_name, 0.02)
    assert np.abs(ours - x).max() < tol


def test_dequantize_rejects_unsupported_type_and_wrong_size():
    raw = np.zeros(84, dtype=np.uint8)  # one Q2_K block
    with pytest.raises(CheckpointError, match=r"'blk.0.attn_q.weight'.*Q2_K.*not supported"):
        dequantize(raw, int(QT.Q2_K), (256,), name="blk.0.attn_q.weight")
    with pytest.raises(CheckpointError, match=r"'w'.*do not hold Q8_0"):
        dequantize(np.zeros(33, dtype=np.uint8), int(QT.Q8_0), (32,), name="w")


# -------------------------------------------------------------------------------------------------
# The Q/K permutation

def interleaved_rows(n_head: int, head_dim: int) -> list:
    """llama.cpp's row order, by index arithmetic: new row h*d + 2i + s = old row h*d + s*d/2 + i."""
    order = [0] * (n_head * head_dim)
    for h in range(n_head):
        for i in range(head_dim // 2):
            for half in range(2):
                order[h * head_dim + 2 * i + half] = h * head_dim + half * head_dim // 2 + i
    return order


@pytest.mark.parametrize("n_head,head_dim", [(4, 16), (3, 64), (1, 2)])
def test_permute_qk_matches_index_arithmetic_and_round_trips(n_head, head_dim):
    w = torch.randn(n_head * head_dim, 24)
    permuted = permute_qk(w, n_head)
    torch.testing.assert_close(permuted, w[interleaved_rows(n_head, head_dim)], rtol=0, atol=0)
    torch.testing.assert_close(unpermute_qk(permuted, n_head), w, rtol=0, atol=0)
    torch.testing.assert_close(permute_qk(unpermute_qk(w, n_head), n_head), w, rtol=0, atol=0)
    wn = w.numpy()  # numpy arrays too, as the loader passes them
    np.testing.assert_array_equal(unpermute_qk(permute_qk(wn, n_head), n_head), wn)


def test_permutation_turns_rotate_half_rope_into_interleaved_rope():
    """Why the permutation exists: HF's rotate-half RoPE on W x equals llama.cpp's interleaved
    (complex-pair) RoPE on permute(W) x, up to the same row order."""
    n_head, d, pos = 2, 8, 5
    w, x = torch.randn(n_head * d, 12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = pos * inv_freq  # (d/2,)
    q = (w @ x).view(n_head, d)  # HF: pair (i, i + d/2) rotates by angle i
    cos, sin = torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2)
    hf = q * cos + torch.cat([-q[:, d // 2:], q[:, :d // 2]], dim=-1) * sin
    qc = torch.view_as_complex((permute_qk(w, n_head) @ x).view(n_head, d // 2, 2).contiguous())
    gg = torch.view_as_real(qc * torch.polar(torch.ones_like(angle), angle)).reshape(n_head * d)
    torch.testing.assert_close(gg, permute_qk(hf.reshape(-1, 1), n_head).reshape(-1))


# -------------------------------------------------------------------------------------------------
# A tiny random Llama written as GGUF here, read back through our loader, vs transformers

GGUF_NAMES = {  # our/HF name -> GGUF name, spelled out in full (the reference for the loader's table)
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight"}
for _i in range(2):
    GGUF_NAMES.update({
        f"model.layers.{_i}.input_layernorm.weight": f"blk.{_i}.attn_norm.weight",
        f"model.layers.{_i}.self_attn.q_proj.weight": f"blk.{_i}.attn_q.weight",
        f"model.layers.{_i}.self_attn.k_proj.weight": f"blk.{_i}.attn_k.weight",
        f"model.layers.{_i}.self_attn.v_proj.weight": f"blk.{_i}.attn_v.weight",
        f"model.layers.{_i}.self_attn.o_proj.weight": f"blk.{_i}.attn_output.weight",
        f"model.layers.{_i}.post_attention_layernorm.weight": f"blk.{_i}.ffn_norm.weight",
        f"model.layers.{_i}.mlp.gate_proj.weight": f"blk.{_i}.ffn_gate.weight",
        f"model.layers.{_i}.mlp.up_proj.weight": f"blk.{_i}.ffn_up.weight",
        f"model.layers.{_i}.mlp.down_proj.weight": f"blk.{_i}.ffn_down.weight"})
N_HEAD, N_KV, HEAD_DIM = 4, 2, 16


def tiny_hf_model(tie=False):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=N_HEAD, num_key_value_heads=N_KV, rms_norm_eps=1e-5,
                                   rope_theta=5000.0, max_position_embeddings=128, tie_word_embeddings=tie,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a mix-up of norm weights shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def write_tiny_gguf(path, hf, qtypes=None, skip=(), meta_changes=None):
    """hf -> GGUF as llama.cpp's converter writes it (Q/K rows interleaved), quantised by gguf-py.
    Returns the HF-layout state dict holding the values the file really stores (after quantisation).
    meta_changes: {key: value, or None to leave the key out}."""
    qtypes = qtypes or {}
    meta = {"llama.block_count": 2, "llama.context_length": 128, "llama.embedding_length": 64,
            "llama.feed_forward_length": 128, "llama.attention.head_count": N_HEAD,
            "llama.attention.head_count_kv": N_KV, "llama.attention.layer_norm_rms_epsilon": 1e-5,
            "llama.rope.freq_base": 5000.0, "llama.rope.dimension_count": HEAD_DIM,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.padding_token_id": 0}
    meta.update(meta_changes or {})
    w = gguf.GGUFWriter(path, arch="llama")
    for key, value in meta.items():
        if value is not None:
            (w.add_uint64 if isinstance(value, int) and value >= 2**32 else
             w.add_uint32 if isinstance(value, int) else w.add_float32)(key, value)
    stored = {}
    for name, tensor in hf.state_dict().items():
        gname = GGUF_NAMES[name]
        if gname in skip or (name == "lm_head.weight" and hf.config.tie_word_embeddings):
            continue
        x = tensor.numpy().astype(np.float32)
        heads = N_HEAD if "q_proj" in name else N_KV if "k_proj" in name else None
        if heads:
            x = x[interleaved_rows(heads, HEAD_DIM)]
        qtype = qtypes.get(gname, QT.F32)
        if qtype == QT.F32:
            w.add_tensor(gname, x)
            back = x
        elif qtype == QT.IQ4_NL:  # a type we do not dequantise: only its size matters
            w.add_tensor(gname, np.zeros((x.shape[0], x.shape[1] // 32 * 18), np.uint8), raw_dtype=qtype)
            continue
        else:
            q = ref_quantize(x, qtype)
            w.add_tensor(gname, q, raw_dtype=qtype)
            back = ref_dequantize(q, qtype).reshape(x.shape)
        if heads:  # undo the interleaving with the inverse index table
            back = back[np.argsort(interleaved_rows(heads, HEAD_DIM))]
        stored[name] = torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


MIXED = {"token_embd.weight": QT.F16, "output.weight": QT.Q8_0, "blk.0.attn_q.weight": QT.Q8_0,
         "blk.0.attn_k.weight": QT.Q4_0, "blk.1.attn_k.weight": QT.Q5_1, "blk.0.ffn_down.weight": QT.Q4_1,
         "blk.1.ffn_up.weight": QT.Q5_0, "blk.1.attn_output.weight": QT.BF16}


def test_tiny_llama_gguf_loads_like_transformers(tmp_path):
    hf = tiny_hf_model()
    stored = write_tiny_gguf(tmp_path / "tiny.gguf", hf, MIXED)
    hf.load_state_dict(stored)  # transformers now holds exactly what the file stores
    ours = load_gguf_model(tmp_path / "tiny.gguf")
    c = ours.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (96, 64, 128, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rope_theta) == (4, 2, 16, 5000.0)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id, c.tie_word_embeddings) == (1, 2, 0, False)
    assert c.max_position_embeddings == 128 and c.rms_norm_eps == pytest.approx(1e-5)
    ours_sd = ours.state_dict()
    assert set(ours_sd) == set(stored)
    for name, value in stored.items():
        torch.testing.assert_close(ours_sd[name], value, rtol=0, atol=0, msg=name)
    assert all(p.device.type == "cpu" for p in ours.parameters())
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_tiny_llama_tied_and_bf16(tmp_path):
    hf = tiny_hf_model(tie=True)
    stored = write_tiny_gguf(tmp_path / "tied.gguf", hf)
    hf.load_state_dict(stored, strict=False)
    ours = load_gguf_model(tmp_path / "tied.gguf", dtype=torch.bfloat16)
    assert ours.config.tie_word_embeddings and ours.lm_head.weight is ours.model.embed_tokens.weight
    assert ours.lm_head.weight.dtype == torch.bfloat16
    assert len(list(ours.parameters())) == len(list(hf.parameters()))  # one tied tensor, not two
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.float()(ids), hf(ids).logits, rtol=0.05, atol=0.05)


# -------------------------------------------------------------------------------------------------
# Malformed files: each raises CheckpointError naming the file (and the tensor)

def raises(path, match, call=read_gguf):
    with pytest.raises(CheckpointError, match=match) as err:
        call(path)
    assert str(path) in str(err.value)


def test_bad_magic_versions_and_empty_file(tmp_path):
    raises(build(tmp_path / "magic.gguf", magic=b"GGML"), "magic")
    raises(build(tmp_path / "v1.gguf", version=1), "unsupported GGUF version 1")
    raises(build(tmp_path / "v4.gguf", version=4), "unsupported GGUF version 4")
    (tmp_path / "empty.gguf").write_bytes(b"")
    raises(tmp_path / "empty.gguf", "too short")
    raises(tmp_path / "absent.gguf", "cannot read")
    (tmp_path / "folder.gguf").mkdir()
    raises(tmp_path / "folder.gguf", "cannot read")  # a directory: not IsADirectoryError from numpy
    assert read_gguf(build(tmp_path / "v2.gguf", version=2)).version == 2


def test_truncated_metadata_and_absurd_lengths(tmp_path):
    good = build(tmp_path / "good.gguf",
                 kvs=[kv("general.name", 8, s("tiny")), kv("n", 4, struct.pack("<I", 7))])
    assert read_gguf(good).metadata == {"general.name": "tiny", "n": 7}
    whole = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[:40])
    raises(tmp_path / "cut.gguf", "truncated")
    # A key claiming 2^62 bytes, an array claiming 2^60 elements, 2^60 tensors, 2^60 keys: errors,
    # not MemoryError.
    raises(build(tmp_path / "longkey.gguf", kvs=[struct.pack("<Q", 2**62) + b"abc"]), "truncated")
    array = struct.pack("<IQ", 4, 2**60) + b"\0" * 8
    raises(build(tmp_path / "longarray.gguf", kvs=[kv("a", 9, array)]), "array of 1152921504606846976")
    # an array the file does hold, but whose 2^24 + 1 numbers would take ten times their bytes as Python ints
    array = struct.pack("<IQ", 0, 2**24 + 1) + b"\0" * (2**24 + 1)
    raises(build(tmp_path / "bigarray.gguf", kvs=[kv("a", 9, array)]), "longer than any metadata array")
    strings = struct.pack("<IQ", 8, 3) + s("x") + struct.pack("<Q", 2**40)
    raises(build(tmp_path / "longstring.gguf", kvs=[kv("tokens", 9, strings)]), r"tokens'\[1\]")
    raises(build(tmp_path / "ntensors.gguf", n_tensors=2**60), "tensor infos")
    raises(build(tmp_path / "nkv.gguf", n_kv=2**60), "metadata entries")
    raises(build(tmp_path / "vtype.gguf", kvs=[kv("k", 99, b"\0" * 8)]), "unknown value type 99")
    raises(build(tmp_path / "utf8.gguf", kvs=[kv("k", 8, s(b"\xff\xfe"))]), "UTF-8")
    raises(build(tmp_path / "dup.gguf", kvs=[kv("k", 0, b"\1"), kv("k", 0, b"\2")]), "duplicate metadata key")
    raises(build(tmp_path / "align.gguf", kvs=[kv("general.alignment", 4, struct.pack("<I", 24))]),
           "power of two")


def test_bad_tensor_infos(tmp_path):
    tensor, _ = f32_tensor("w", 4, 8)
    ok = build(tmp_path / "ok.gguf", tensors=[tensor])
    info = read_gguf(ok).tensors["w"]
    assert (info.shape, info.nbytes, info.ggml_type) == ((4, 8), 128, 0)
    raises(ok, r"no tensor named 'v'", lambda p: read_gguf(p).tensor("v"))  # not a bare KeyError
    (tmp_path / "short.gguf").write_bytes(ok.read_bytes()[:-10])
    raises(tmp_path / "short.gguf", r"tensor 'w'.*past the end")
    path = tmp_path / "far.gguf"  # one tensor info by hand: offset 2^40
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + s("w")  # one tensor, no metadata
    path.write_bytes(head + struct.pack("<I2QIQ", 2, 8, 4, 0, 1 << 40) + b"\0" * 200)
    raises(path, r"tensor 'w'.*past the end")
    path.write_bytes(head + struct.pack("<I2QIQ", 2, 8, 4, 0, 3) + b"\0" * 200)
    raises(path, r"tensor 'w'.*not a multiple of the alignment")
    path.write_bytes(head + struct.pack("<I5QIQ", 5, *[1] * 5, 0, 0) + b"\0" * 200)
    raises(path, r"tensor 'w' has 5 dimensions")
    raises(build(tmp_path / "type.gguf", tensors=[("w", (32,), 99, b"\0" * 64)]),
           r"tensor 'w'.*unknown ggml type 99")
    raises(build(tmp_path / "row.gguf", tensors=[("w", (16,), 8, b"\0" * 34)]),
           r"tensor 'w'.*multiple of the Q8_0")


def test_llama_files_that_do_not_fit_the_model(tmp_path):
    hf = tiny_hf_model()
    write_tiny_gguf(tmp_path / "iq4.gguf", hf, {"blk.1.ffn_gate.weight": QT.IQ4_NL})
    raises(tmp_path / "iq4.gguf", r"'blk.1.ffn_gate.weight'.*IQ4_NL.*not supported", load_gguf_model)
    write_tiny_gguf(tmp_path / "missing.gguf", hf, skip={"blk.1.ffn_up.weight"})
    raises(tmp_path / "missing.gguf", r"missing.*'blk.1.ffn_up.weight'", load_gguf_model)
    write_tiny_gguf(tmp_path / "nolayers.gguf", hf, meta_changes={"llama.block_count": None})
    raises(tmp_path / "nolayers.gguf", r"llama.block_count", load_gguf_model)
    write_tiny_gguf(tmp_path / "narrow.gguf", hf, meta_changes={"llama.feed_forward_length": 96})
    raises(tmp_path / "narrow.gguf", r"'blk.0.ffn_gate.weight'.*expected shape \(96, 64\), found \(128, 64\)",
           load_gguf_model)
    write_tiny_gguf(tmp_path / "rope.gguf", hf, meta_changes={"llama.rope.dimension_count": 8})
    raises(tmp_path / "rope.gguf", r"partial rotary", load_gguf_model)
    f = read_gguf(tmp_path / "missing.gguf")  # a Llama-3 rope_freqs tensor is not part of our model
    w = gguf.GGUFWriter(tmp_path / "extra.gguf", arch="llama")
    for key, value in f.metadata.items():
        if key.startswith(("llama.", "tokenizer.")):
            (w.add_uint64 if isinstance(value, int) and value >= 2**32 else
             w.add_uint32 if isinstance(value, int) else w.add_float32)(key, value)
    for name in f.tensors:
        w.add_tensor(name, f.tensor(name))
    w.add_tensor("blk.1.ffn_up.weight", np.zeros((128, 64), np.float32))
    w.add_tensor("rope_freqs.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    raises(tmp_path / "extra.gguf", r"'rope_freqs.weight': Llama-3.1-style RoPE frequency factors are not "
           r"supported.*Hugging Face folder", load_gguf_model)
    raises(build(tmp_path / "gpt2.gguf", kvs=[kv("general.architecture", 8, s("gpt2"))]), "only 'llama'",
           lambda p: gguf_config(read_gguf(p)))


# -------------------------------------------------------------------------------------------------
# SmolLM2 (the real Q4_1 file) vs transformers' own GGUF loader

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return",
           "Large language models can be turned into text encoders by"]


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_gguf):
    """(our model, transformers' model from its own GGUF loader, our tokenizer)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("llm2vec_mini.tokenizer")
    ours, tok = load_gguf(smollm2_gguf)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    return ours, ref, tok


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_config_and_weights_match_transformers(smollm2_pair):
    ours, ref, _ = smollm2_pair
    c, r = ours.config, ref.config
    assert c == c.smollm2_135m(rms_norm_eps=c.rms_norm_eps)  # the preset, bar eps's float32 rounding
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                  "tie_word_embeddings"):
        assert getattr(c, field) == getattr(r, field), field
    assert c.rms_norm_eps == pytest.approx(r.rms_norm_eps) and c.rope_theta == r.rope_parameters["rope_theta"]
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ref_sd = ref.state_dict()
    for name, value in ours.state_dict().items():  # q_proj/k_proj unpermuted exactly as transformers does
        torch.testing.assert_close(value, ref_sd[name], rtol=0, atol=0, msg=name)


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_logits_and_greedy_continuation_match_transformers(smollm2_pair):
    ours, ref, tok = smollm2_pair
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tok.encode(prompt)])
            a, b = ours(ids), ref(ids).logits
            assert torch.equal(a.argmax(-1), b.argmax(-1)), prompt
            torch.testing.assert_close(a, b, rtol=0, atol=1e-3, msg=prompt)
    ids = torch.tensor([tok.encode(PROMPTS[0])])
    out = ours.generate(ids, 4)
    assert tok.decode(out[0, ids.shape[1]:]).startswith(" Paris")
    ref_out = ref.generate(ids, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(out, ref_out)


@pytest.mark.real_model
def test_load_gguf_returns_our_tokenizer(smollm2_gguf):
    pytest.importorskip("llm2vec_mini.tokenizer", reason="llm2vec_mini.tokenizer is not written yet")
    model, tok = load_gguf(smollm2_gguf)
    assert model.config.vocab_size == tok.vocab_size == 49152
    # The ids transformers' GGUF tokenizer gives (AutoTokenizer.from_pretrained(dir, gguf_file=...)).
    assert tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (model.config.bos_token_id, model.config.eos_token_id,
                                                    model.config.pad_token_id) == (1, 2, 2)


# -------------------------------------------------------------------------------------------------
# Issue 16: the metadata is checked against the file's tensors before anything is built

@pytest.mark.parametrize("changes, match", [
    ({"llama.embedding_length": 2**40, "llama.rope.dimension_count": None},
     r"hidden_size must be a positive integer below 2\*\*31"),
    ({"llama.vocab_size": 2**62}, r"vocab_size must be a positive integer below 2\*\*31"),
    ({"llama.vocab_size": 2**20}, r"'token_embd\.weight': expected shape \(1048576, 64\), found \(96, 64\)"),
    ({"llama.feed_forward_length": 2**30}, r"'blk\.0\.ffn_gate\.weight': expected shape \(1073741824, 64\)"),
    ({"llama.block_count": 100_000}, r"the llama\.\* metadata says the model has 100000 layers, but the file "
                                     r"holds tensors for 2"),
])
def test_sizes_the_file_does_not_hold_are_refused_before_the_model_is_built(tmp_path, monkeypatch, changes,
                                                                            match):
    """Issue 16, class 2: embedding_length 2^40 asked for a petabyte, feed_forward_length 2^30 for
    terabytes, block_count 100,000 looped for minutes, vocab_size 2^62 overflowed inside torch."""
    from llm2vec_mini.convert import gguf as ours
    write_tiny_gguf(tmp_path / "m.gguf", tiny_hf_model(), meta_changes=changes)
    built = []
    monkeypatch.setattr(ours, "LlamaForCausalLM", lambda config: built.append(config))
    raises(tmp_path / "m.gguf", match, load_gguf_model)
    assert not built
