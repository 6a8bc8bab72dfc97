"""benchmarks/peers.py without the peers: the models it builds for them, the token-id feed,
the timing harness, the JSON and the missing-peer line."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from benchmarks import peers
from benchmarks.peer_models import gguf_streamed_bytes, permute_rope_rows, text_model, write_gguf, write_hf_folder
from benchmarks.runtime import kv_bytes_per_token, streamed_bytes
from saisa_edge.artifacts import open_artifact
from saisa_edge.checkpoint.smollm2 import read_llama_gguf, unpermute_rope_rows
from saisa_edge.errors import SaisaError
from saisa_edge.model.equivalence import split_prefill

IDS = [1, 5, 9, 3, 7, 11, 4]


def test_hf_folder_gives_the_reference_text_logits(tiny_gqa_dir, tmp_path):
    from transformers import LlamaForCausalLM

    lm = text_model(tiny_gqa_dir)
    write_hf_folder(lm, tiny_gqa_dir, tmp_path)
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([IDS])).logits[0]
        ours = split_prefill(lm, IDS, None)[0]
    assert float((theirs - ours).abs().max()) < 1e-4
    assert (tmp_path / "tokenizer_config.json").is_file()  # GenAI's builder loads the tokenizer from here
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] in (lm.config.text.eos_token_ids[0],
                                                                                    list(lm.config.text.eos_token_ids))


def _vocab_gguf(path, n_tokens: int) -> None:
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(n_tokens)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_holds_the_checkpoint_weights_in_llama_cpp_order(tiny_gqa_dir, tmp_path):
    lm = text_model(tiny_gqa_dir)
    t = lm.config.text
    _vocab_gguf(tmp_path / "vocab.gguf", t.vocab_size)
    write_gguf(lm, tmp_path / "vocab.gguf", tmp_path / "model.gguf")
    fields, tensors = read_llama_gguf(tmp_path / "model.gguf")  # the repo's reader undoes llama.cpp's Q/K order
    assert (fields["num_key_value_heads"], fields["num_hidden_layers"]) == (t.num_key_value_heads, t.num_hidden_layers)
    assert fields["rope_theta"] == pytest.approx(t.rope_theta) and fields["eos_token_id"] == 2
    state = {k: v for k, v in lm.state_dict().items() if "mm_projector" not in k}
    assert set(tensors) == set(state)
    for name, value in state.items():
        assert torch.equal(tensors[name], value), name
    q = state["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert not np.array_equal(permute_rope_rows(q, t.num_attention_heads), q)  # the rows really move
    assert np.array_equal(unpermute_rope_rows(torch.from_numpy(permute_rope_rows(q, t.num_attention_heads)),
                                              t.num_attention_heads).numpy(), q)
    # a step streams every matrix once, the head (tied: the embedding) included, the embedding's gather not
    head = "model.embed_tokens.weight" if t.tie_word_embeddings else "lm_head.weight"
    matrices = [v for k, v in state.items() if v.dim() == 2 and k != "model.embed_tokens.weight"]
    assert gguf_streamed_bytes(tmp_path / "model.gguf") == 4 * (sum(v.numel() for v in matrices)
                                                                + (state[head].numel() if t.tie_word_embeddings else 0))


def test_gguf_refuses_a_tokenizer_of_another_model(tiny_gqa_dir, tmp_path):
    lm = text_model(tiny_gqa_dir)
    _vocab_gguf(tmp_path / "vocab.gguf", lm.config.text.vocab_size + 1)
    with pytest.raises(SaisaError, match="vocab.gguf: its tokenizer does not have"):
        write_gguf(lm, tmp_path / "vocab.gguf", tmp_path / "model.gguf")


def test_missing_peer_is_one_line_naming_its_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llama_cpp" else real(name))
    line = peers.missing_peer(peers.LLAMA_CPP)
    assert line is not None and "\n" not in line
    assert line.startswith("llama.cpp: skipped (llama_cpp not installed)") and "pip install llama-cpp-python" in line
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert peers.missing_peer(peers.GENAI) is None


def test_timed_stops_at_eos_or_the_token_count():
    run = peers.timed(iter([5, 6, 2, 7]), 10, {2})
    assert run.tokens == [5, 6] and run.prefill_ms >= 0 and run.decode_ms >= 0
    assert peers.timed(iter(range(10, 100)), 4, {2}).tokens == [10, 11, 12, 13]


def test_first_divergence():
    assert peers.first_divergence([1, 2, 3], [1, 2, 3], 3) is None
    assert peers.first_divergence([1, 2, 3], [1, 9, 3], 3) == 1
    assert peers.first_divergence([1, 2], [1, 2, 3], 3) == 2  # one stopped early
    assert peers.first_divergence([1, 2, 4], [1, 2, 3], 2) is None  # beyond the compared tokens


def _hf_greedy(hf, ids: list[int]):
    """A peer fed token ids: transformers' LlamaForCausalLM on the HF folder, greedy (no cache: tiny)."""
    seq = list(ids)
    while True:
        seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
        yield seq[-1]


@pytest.mark.slow
def test_fed_ids_give_saisa_tokens_and_the_json(tiny_gqa_dir, tmp_path, monkeypatch, capsys):
    """The ids saisa-edge's Session used, fed to a peer built from the HF folder, give saisa-edge's
    greedy tokens; the benchmark's JSON on a real artifact with the peers absent."""
    from transformers import LlamaForCausalLM

    from saisa_edge.checkpoint.loader import open_checkpoint
    from saisa_edge.export.artifact import ExportOptions, export_artifact

    art = tmp_path / "art"
    export_artifact(open_checkpoint(tiny_gqa_dir), art, ExportOptions())
    saisa = peers.SaisaSystem("fp32", art)
    assert set(saisa.session.backend.sessions) == {"decoder"}  # text-only: the image graphs are released
    ids = saisa.prompt_ids()
    ours = saisa.run(ids, 12)
    with pytest.raises(SaisaError, match="other prompt ids"):
        saisa.run(ids[1:], 12)
    write_hf_folder(text_model(tiny_gqa_dir), tiny_gqa_dir, tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = peers.timed(_hf_greedy(hf, ids), 12, saisa.session._eos)
    assert ours.tokens and theirs.tokens == ours.tokens

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no peer installed
    peers.main(["--saisa", f"fp32={art}", "--work", str(tmp_path / "work"), "--tokens", "4", "--rounds", "2"])
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["skipped"] == [peers.missing_peer(peers.GENAI), peers.missing_peer(peers.LLAMA_CPP)]
    assert "install it with `pip install onnxruntime-genai" in captured.err
    assert report["prompt"]["token_ids"] == ids and report["rounds"] == 2
    (row,) = report["systems"]
    assert (row["system"], row["format"], row["class"]) == ("saisa-edge", "fp32", "fp32")
    assert len(row["rounds_decode_tokens_per_s"]) == 2 and row["same_tokens_every_round"]
    assert row["decode_tokens_per_s"]["best"] >= row["decode_tokens_per_s"]["median"] > 0
    assert report["ratios"] == {} and report["fp32_agreement"]["first_divergence"] == {}
    # the bound of this run: the decoder's streamed weights and the text K/V, over the bandwidth measured
    weights = streamed_bytes(open_artifact(art).graph("decoder"))
    assert row["bandwidth_bound"]["bytes_per_token_mb"] == round(
        (weights + kv_bytes_per_token(saisa.session.backend, len(ids), len(ours.tokens))
         - kv_bytes_per_token(saisa.session.backend, 0, 0)) / 1e6, 1)
    assert report["read_gb_per_s"] > 0 and report["bandwidth_bound"]["saisa-edge fp32"]["target"] == 0.85
    assert row["lm_head"] == "float"


def test_report_ratios_name_the_targets():
    class Fake:
        def __init__(self, system, label, precision=None):
            self.system, self.label, self.precision, self.source = system, label, precision or label, "x"

    systems = [Fake(peers.SAISA, "fp32", "fp32"), Fake(peers.SAISA, "int4_awq", "int4_awq"),
               Fake(peers.GENAI, "fp32"), Fake(peers.LLAMA_CPP, "F32"), Fake(peers.GENAI, "int4"),
               Fake(peers.LLAMA_CPP, "Q8_0")]
    rate = {0: 50.0, 1: 100.0, 2: 50.0, 3: 50.0, 4: 80.0, 5: 90.0}
    toks = {0: [1, 2, 3], 2: [1, 2, 3], 3: [1, 5, 3]}
    runs = {i: [peers.Run(toks.get(i, [1, 2]), 10.0, 1000 * (len(toks.get(i, [1, 2])) - 1) / rate[i])] * 2
            for i in rate}
    warm = {i: r[0] for i, r in runs.items()}
    args = peers.parse_args(["--saisa", "fp32=a", "--work", "w", "--agree", "3"])
    out = peers.report(systems, runs, warm, [1, 2], args, [])  # type: ignore[arg-type]
    ratios = out["ratios"]
    assert set(ratios) == {"saisa-edge fp32 / onnxruntime-genai fp32", "saisa-edge fp32 / llama.cpp F32",
                           "saisa-edge int4_awq / onnxruntime-genai int4"}
    assert ratios["saisa-edge fp32 / llama.cpp F32"] == {"decode_median": 1.0, "target": 1.1, "meets": False,
                                                        "decode_best": 1.0}
    assert ratios["saisa-edge int4_awq / onnxruntime-genai int4"]["decode_median"] == 1.25
    assert out["fp32_agreement"]["first_divergence"] == {"onnxruntime-genai fp32": None, "llama.cpp F32": 1}
    assert out["fp32_agreement"]["agree"] is False
    assert json.loads(json.dumps(out)) == out


def test_report_puts_systems_against_the_bandwidth_bound():
    class Fake:
        def __init__(self, system, label):
            self.system, self.label, self.precision, self.source = system, label, label, "x"

    systems = [Fake(peers.SAISA, "fp32"), Fake(peers.GENAI, "fp32"), Fake(peers.LLAMA_CPP, "F32")]
    runs = {i: [peers.Run([1, 2, 3], 10.0, 2000 / rate)] for i, rate in enumerate((50.0, 40.0, 30.0))}
    args = peers.parse_args(["--saisa", "fp32=a", "--work", "w", "--agree", "3"])
    bound = peers.Bound(1e10, {0: 1.6e8, 1: 1e8})  # 62.5 and 100 tokens/s at 10 GB/s; the third: not counted
    out = peers.report(systems, runs, {i: r[0] for i, r in runs.items()}, [1, 2], args, [], bound)  # type: ignore[arg-type]
    rows = out["systems"]
    assert rows[0]["bandwidth_bound"] == {"bytes_per_token_mb": 160.0, "bound_tokens_per_s": 62.5,
                                          "fraction": {"median": 0.8, "best": 0.8}}
    assert rows[1]["bandwidth_bound"]["fraction"]["median"] == 0.4 and "bandwidth_bound" not in rows[2]
    assert out["read_gb_per_s"] == 10.0
    assert out["bandwidth_bound"] == {"saisa-edge fp32": {"fraction_median": 0.8, "target": 0.85, "meets": False}}


def test_bad_flags_are_one_line_errors(capsys):
    for argv, said in ((["--saisa", "artifacts/smol", "--work", "w"], "give LABEL=ARTIFACT_FOLDER"),
                       (["--saisa", "a=b", "--work", "w", "--gguf", "Q5"], "'Q5': choose from F32, Q8_0"),
                       (["--saisa", "a=b", "--work", "w", "--tokens", "0"], "--tokens 0: give an integer >= 1")):
        with pytest.raises(SystemExit):
            peers.parse_args(argv)
        assert said in capsys.readouterr().err.strip().splitlines()[-1]
