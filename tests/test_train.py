"""The trainer: bit-identical resume, DDP equivalence, and a clear stop on a non-finite loss."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_group

from llm2vec_mini import CheckpointError, ConfigError, LlamaConfig, LlamaForCausalLM, TrainingError
from llm2vec_mini.convert.safetensors import load_file
from llm2vec_mini.lora import add_lora
from llm2vec_mini.mntp import MNTPCollator, MNTPTask
from llm2vec_mini.simcse import SimCSETask
from llm2vec_mini.train import TrainConfig, latest_checkpoint, train

HERE = Path(__file__).resolve().parent


def reinit_lora(model, seed):
    """A different LoRA init on the same base (a resumed run must overwrite it)."""
    if seed:
        torch.manual_seed(seed)
        for name, p in model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(p, std=0.5)
    return model


def mntp_task(seed=0):
    torch.manual_seed(0)
    model = add_lora(LlamaForCausalLM(LlamaConfig.tiny()).set_causal(False), r=4, alpha=8, dropout=0.1)
    reinit_lora(model, seed)
    blocks = torch.randint(3, 256, (40, 16), generator=torch.Generator().manual_seed(1))
    return MNTPTask(model, blocks, MNTPCollator(mask_id=5, vocab_size=256, special_ids=[0, 1, 2]))


def simcse_task(seed=0):
    torch.manual_seed(0)
    model = add_lora(LlamaForCausalLM(LlamaConfig.tiny(attention_dropout=0.3)).set_causal(False),
                     r=4, alpha=8, dropout=0.1)
    reinit_lora(model, seed)
    gen = torch.Generator().manual_seed(2)
    sentences = [torch.randint(3, 256, (int(n),), generator=gen).tolist()
                 for n in torch.randint(2, 10, (30,), generator=gen)]
    return SimCSETask(model, sentences, pad_id=2)


def adapter(path):
    return load_file(Path(path) / "adapter_model.safetensors")


def metrics(path):
    return [json.loads(line) for line in (Path(path) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("make", [mntp_task, simcse_task])
def test_resume_is_bit_identical(tmp_path, make):
    cfg = dict(steps=6, batch_size=4, grad_accum=2, lr=5e-3, warmup_steps=2, checkpoint_every=3,
               progress=False)
    train(make(), TrainConfig(**cfg), tmp_path / "full")
    train(make(), TrainConfig(**cfg), tmp_path / "split", stop_after=3)
    assert latest_checkpoint(tmp_path / "split").name == "checkpoint-3"
    assert not (tmp_path / "split" / "adapter_model.safetensors").exists()
    train(make(seed=99), TrainConfig(**cfg), tmp_path / "split", resume=True)  # LoRA init replaced
    a, b = adapter(tmp_path / "full"), adapter(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6  # nothing logged twice
    assert all(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # training did something


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    task = mntp_task()
    forward = task.forward
    calls = {"n": 0}

    def poisoned(batch):
        calls["n"] += 1
        loss = forward(batch)
        return loss * float("nan") if calls["n"] == 3 else loss

    task.forward = poisoned
    with pytest.raises(TrainingError, match="step 3.*checkpoint-2"):
        train(task, TrainConfig(steps=5, batch_size=2, checkpoint_every=1, progress=False), tmp_path)
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_infinite_gradients_stop_before_the_weights_change(tmp_path):
    task = mntp_task()
    train(task, TrainConfig(steps=2, batch_size=2, checkpoint_every=1, progress=False), tmp_path)
    lora_b = next(p for n, p in task.model.named_parameters() if n.endswith("lora_B.weight"))
    before = {n: p.detach().clone() for n, p in task.model.named_parameters() if p.requires_grad}
    lora_b.register_hook(lambda grad: grad * float("inf"))  # a finite loss, an overflowing gradient
    with pytest.raises(TrainingError, match="gradient norm became (nan|inf) at step 1"):
        train(task, TrainConfig(steps=2, batch_size=2, progress=False), tmp_path / "again")
    for n, p in task.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n]), n  # the optimizer never stepped
    assert not (tmp_path / "again" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_a_fresh_run_drops_old_checkpoints(tmp_path):
    cfg = dict(steps=4, batch_size=2, checkpoint_every=1, progress=False)
    train(mntp_task(), TrainConfig(**cfg), tmp_path, stop_after=3)
    assert latest_checkpoint(tmp_path).name == "checkpoint-3"
    # a new, shorter run, same folder
    train(mntp_task(), TrainConfig(**dict(cfg, steps=2)), tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_adapter(tmp_path):
    cfg = dict(steps=3, batch_size=4, lr=5e-3, progress=False)
    train(mntp_task(), TrainConfig(**cfg), tmp_path / "plain")
    train(mntp_task(), TrainConfig(**cfg, gradient_checkpointing=True), tmp_path / "recomputed")
    a, b = adapter(tmp_path / "plain"), adapter(tmp_path / "recomputed")
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    for k in a:  # recomputation replays the same dropout masks (the RNG state is restored)
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("make", [mntp_task, simcse_task])
def test_bf16_training_follows_fp32_and_leaves_the_plain_model(tmp_path, make):
    """dtype="bfloat16": the projections in bf16 (on a CPU too), the adapters fp32; the losses follow
    fp32's, and afterwards the model computes in fp32 again, bit for bit as before."""
    cfg = dict(steps=4, batch_size=4, lr=5e-3, progress=False)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        task = make()
        ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            before = task.model.eval()(ids)
        train(task, TrainConfig(**cfg, dtype=dtype), tmp_path / dtype)
        runs[dtype] = [m["loss"] for m in metrics(tmp_path / dtype)]
        plain = make()
        plain.model.load_state_dict(task.model.state_dict())
        with torch.no_grad():
            assert torch.equal(task.model.eval()(ids), plain.model.eval()(ids))  # no bf16 left behind
            assert not torch.equal(task.model(ids), before)  # (it did train)
    assert runs["float32"] != runs["bfloat16"]  # bf16 was used
    for a, b in zip(runs["float32"], runs["bfloat16"]):
        assert abs(a - b) <= 0.02 * abs(a) + 1e-5, runs  # (SimCSE on random tokens: losses near 0)


def test_resume_keeps_a_trained_lm_head(tmp_path):
    """A trainable lm_head (mntp.unfreeze_lm_head) is not in the adapter: checkpoints keep it."""
    from llm2vec_mini.mntp import unfreeze_lm_head

    def make(seed=0):
        task = mntp_task(seed)
        unfreeze_lm_head(task.model)
        return task

    cfg = dict(steps=4, batch_size=2, lr=5e-3, checkpoint_every=2, progress=False)
    full = make()
    train(full, TrainConfig(**cfg), tmp_path / "full")
    train(make(), TrainConfig(**cfg), tmp_path / "split", stop_after=2)
    resumed = make()
    train(resumed, TrainConfig(**cfg), tmp_path / "split", resume=True)
    assert torch.equal(full.model.lm_head.weight, resumed.model.lm_head.weight)
    for k, v in adapter(tmp_path / "full").items():
        assert torch.equal(v, adapter(tmp_path / "split")[k]), k
    with pytest.raises(CheckpointError, match="lm_head"):  # resumed by a run that does not train it
        train(mntp_task(), TrainConfig(**dict(cfg, steps=6)), tmp_path / "split", resume=True)


def test_decay_steps_sets_the_horizon_of_the_linear_decay(tmp_path):
    """transformers' "linear" schedule without warm-up: lr * (horizon - step) / horizon at step 0, 1, ..."""
    train(mntp_task(), TrainConfig(steps=4, batch_size=2, lr=1e-2, decay_steps=10, progress=False), tmp_path)
    assert [m["lr"] for m in metrics(tmp_path)] == pytest.approx([1e-2 * (10 - s) / 10 for s in range(4)])
    with pytest.raises(ConfigError, match="decay_steps"):
        TrainConfig(steps=4, decay_steps=3).validate()


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="grad_accum"):
        TrainConfig(batch_size=5, grad_accum=2).validate()
    with pytest.raises(ConfigError, match="dtype"):
        TrainConfig(dtype="int8").validate()
    with pytest.raises(ConfigError, match="LoRA"):
        train(MNTPTask(LlamaForCausalLM(LlamaConfig.tiny()), torch.zeros(4, 8, dtype=torch.long),
                       MNTPCollator(5, 256)), TrainConfig(steps=1, batch_size=1, progress=False), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["mntp", "simcse"])
def test_two_processes_with_batch_b_equal_one_process_with_batch_2b(tmp_path, task):
    """The same adapter, and the same logged losses: the global batch's loss, not rank 0's share."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    worker = str(HERE / "ddp_worker.py")
    rc, _, err = run_group([sys.executable, worker, task, "8", str(tmp_path / "one")], env)
    assert rc == 0, err[-3000:]
    rc, _, err = run_group([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                         "--standalone", worker, task, "4", str(tmp_path / "two")], env)
    assert rc == 0, err[-3000:]
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    moved = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)
    assert moved > 1e-3  # the steps were real
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    one, two = (metrics(tmp_path / d) for d in ("one", "two"))
    torch.testing.assert_close(torch.tensor([r["loss"] for r in two]), torch.tensor([r["loss"] for r in one]),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("pooling", ["mean", "eos_token", "last_token"])
def test_simcse_reads_a_sentence_as_encode_does(tiny_llama_dir, pooling):
    """What SimCSE trains on is what LLM2Vec.encode reads afterwards: for eos_token pooling the
    eos token written after the text (the official rule, checked against the official library in
    tests/reference/), else the text alone."""
    from llm2vec_mini.convert.hf import load_pretrained
    from llm2vec_mini.encoder import LLM2Vec
    from llm2vec_mini.simcse import simcse_task as make_simcse_task

    model, tok = load_pretrained(tiny_llama_dir)
    texts = ["A man is playing a guitar.", "Stocks fell sharply on Monday."]
    task = make_simcse_task(model, tok, texts, max_length=128, pooling=pooling)
    enc = LLM2Vec(model, tok, pooling=pooling, device="cpu")
    assert task.sentences == [ids for ids, _ in enc.prepare(texts)]
    assert (task.sentences[0][-1] == tok.eos_id) == (pooling == "eos_token")


# -------------------------------------------------------------------------------------------------
# An earlier run in the output folder is never deleted unasked

@pytest.mark.slow
def test_an_earlier_run_is_refused_unless_resume_or_overwrite(tmp_path):
    cfg = TrainConfig(steps=3, batch_size=2, checkpoint_every=1, progress=False)
    train(mntp_task(), cfg, tmp_path / "stopped", stop_after=2)  # checkpoints 1 and 2, no adapter
    train(mntp_task(), TrainConfig(steps=2, batch_size=2, progress=False), tmp_path / "finished")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    for folder, resume in (("stopped", False), ("finished", False), ("finished", True)):
        # a finished run without checkpoints has nothing to resume from either
        with pytest.raises(ConfigError, match="--resume .* --overwrite") as e:
            train(mntp_task(), cfg, tmp_path / folder, resume=resume)
        assert str(tmp_path / folder) in str(e.value) and "metrics.jsonl" in str(e.value)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing touched
    train(mntp_task(), cfg, tmp_path / "stopped", resume=True)  # what --resume is for
    train(mntp_task(), cfg, tmp_path / "finished", overwrite=True)
    assert len(metrics(tmp_path / "finished")) == len(metrics(tmp_path / "stopped")) == 3


def test_the_cli_refuses_an_earlier_run_before_any_work(tmp_path, tiny_llama_dir, capsys):
    from llm2vec_mini.cli import main
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat.\nA dog ran in the park.\n" * 20)
    out = tmp_path / "adapter"
    args = ["train-mntp", "--model", str(tiny_llama_dir), "--data", str(text), "--output", str(out),
            "--steps", "1", "--batch-size", "2", "--block-size", "16", "--device", "cpu"]
    assert main(args) == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert main(args + ["--overwrite", "--seed", "7"]) == 0
    assert (out / "adapter_model.safetensors").read_bytes() != before


# -------------------------------------------------------------------------------------------------
# Every random draw has its own seed: no two (step, micro-batch) pairs share one

class _DrawRecorder(torch.nn.Module):
    """A task whose loss records one draw of the global generator (what dropout draws from) and the
    batch generator it was given (what masking draws from)."""

    def __init__(self):
        super().__init__()
        self.model = add_lora(LlamaForCausalLM(LlamaConfig.tiny(num_hidden_layers=1)), r=1, alpha=1)
        self.dropout_draws, self.batch_draws = [], []

    def __len__(self):
        return 1000

    def make_batch(self, indices, generator):
        self.batch_draws.append(torch.rand(1, generator=generator).item())
        return (torch.tensor(indices),)

    def forward(self, batch):
        self.dropout_draws.append(torch.rand(1).item())
        return sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0


@pytest.mark.parametrize("grad_accum", [32, 40])
def test_no_two_micro_batches_share_a_seed(tmp_path, grad_accum):
    """The old formulas (seed * 7919 + step * 31 + micro) gave step 0's micro-batch 31 and step 1's
    micro-batch 0 the same dropout masks once grad_accum exceeded 31."""
    task = _DrawRecorder()
    train(task, TrainConfig(steps=2, batch_size=grad_accum, grad_accum=grad_accum, progress=False), tmp_path)
    assert len(task.dropout_draws) == len(task.batch_draws) == 2 * grad_accum
    assert len(set(task.dropout_draws)) == 2 * grad_accum
    assert len(set(task.batch_draws)) == 2 * grad_accum


def test_seeds_differ_between_runs_and_purposes():
    from llm2vec_mini.util import derive_seed
    seeds = {derive_seed(purpose, seed, step, micro) for purpose in ("batch", "dropout", "order")
             for seed in range(4) for step in range(50) for micro in range(50)}
    assert len(seeds) == 3 * 4 * 50 * 50
