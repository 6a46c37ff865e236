"""An exported nanoseek model works in TRL out of the box: GRPOTrainer loads it with its tokenizer and chat
template, trains two steps, and a format reward sees the think tags in the completions TRL decodes (with
skip_special_tokens=True: <think> / </think> are added tokens that are not special, as in DeepSeek-R1)."""

import pytest
import torch

from nanoseek.hf import export

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")


def test_trl_grpo_steps_on_an_exported_model_see_the_think_tags(tiny_run, tmp_path):
    run, _ = tiny_run
    folder = export(run, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    think, end_think = tok.convert_tokens_to_ids(["<think>", "</think>"])
    seen = []

    def think_format(completions, completion_ids, **_):
        """R1's format reward, reduced: 1 when the completion holds <think> ... </think>."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        seen.extend(zip(texts, completion_ids))
        return [float("<think>" in t and "</think>" in t.split("<think>", 1)[-1]) for t in texts]

    prompts = [[{"role": "user", "content": f"{a}+{b}="}] for a, b in ((12, 34), (5, 7), (40, 2), (9, 9))]
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=2, num_generations=2,
        max_completion_length=8, learning_rate=1e-3, use_cpu=True, bf16=False, fp16=False, report_to="none",
        save_strategy="no", logging_steps=1, seed=0, dataloader_num_workers=0,
        # a tiny model after 4 steps rarely writes the tags by itself: bias them so completions hold both
        generation_kwargs={"sequence_bias": {(think,): 8.0, (end_think,): 8.0}})
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=think_format, args=args, processing_class=tok,
                              train_dataset=datasets.Dataset.from_dict({"prompt": prompts}))
    trainer.train()

    assert trainer.state.global_step == 2 and len(seen) == 4  # 2 steps x 2 completions
    tagged = [text for text, ids in seen if think in ids and end_think in ids]
    assert tagged, seen  # the sampled ids hold both tags ...
    assert all("<think>" in t and "</think>" in t for t in tagged)  # ... and the text TRL scores keeps them
