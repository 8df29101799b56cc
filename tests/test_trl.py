"""The callback under TRL's SFTTrainer (a Trainer subclass with its own data pipeline), as users fine-tune."""

from __future__ import annotations

import json

from test_finetune_checkpoints import SENTENCES, _tokenizer, tiny_llama


def test_sft_trainer_with_the_callback_writes_valid_stats(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from hf_fsf import FeatureSpeedCallback

    tokenizer = _tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    model = tiny_llama(tokenizer, layers=3, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id)
    data = Dataset.from_dict({"text": SENTENCES * 4})
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        max_length=32,
        disable_tqdm=True,
    )
    callback = FeatureSpeedCallback(every=1, angle_every=1, figures=False)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[callback]
    )
    trainer.train()

    records = [json.loads(line) for line in (tmp_path / "fsf_stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert record["valid"] and record["angle"]
        assert [b["name"] for b in record["blocks"]] == [f"model.layers.{i}" for i in range(3)]
        for block in record["blocks"]:
            assert abs(block["fsf_ratio"] - 1) < 0.05  # a first-order identity, float32, lr 1e-3
            assert 0 < block["cos_theta"] <= 1
    assert any("fsf/cos_theta_mean" in entry for entry in trainer.state.log_history)
