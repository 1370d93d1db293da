"""A tiny multimodal run through every real role: K12 problems with their diagrams, the tiny
random Qwen2.5-VL model, Ray actors for rollout (transformers engine), reward and 2 FSDP2
learner ranks, the Redis-backed replay buffer over gRPC.

The training file mixes real K12 rows with rows whose image is missing, corrupt or not an
image (skipped and counted, each named in the log) and images far too large or small
(resized). The run shows the images reached each role: the engines report the images they
encoded, the buffer returns each group's prepared PNG bytes, and the vision tower — trained
here (``learner.freeze_vision_tower=false``), reachable by gradients only through image
features — has moved.
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from services.trainer.loop import Trainer
from services.trainer.metrics import read_metrics
from shuffle_r1.config import load_config
from shuffle_r1.models import load_policy_model

ROOT = Path(__file__).resolve().parents[2]
K12 = ROOT / "data" / "k12"
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]


def png(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (30, 90, 200)).save(out, format="PNG")
    return out.getvalue()


def write_training_file(folder: Path) -> Path:
    """12 K12 rows, then 3 rows with unusable images and 2 with extreme sizes."""
    rows = json.loads((K12 / "k12.json").read_text())[:12]
    (folder / "images").mkdir()
    for row in rows:
        shutil.copy(K12 / row["image_path"], folder / row["image_path"])
    good = (K12 / rows[0]["image_path"]).read_bytes()
    (folder / "images" / "corrupt.png").write_bytes(good[: len(good) // 3])
    (folder / "images" / "notes.png").write_text("meeting notes, not a picture")
    (folder / "images" / "huge.png").write_bytes(png((3000, 2400)))
    (folder / "images" / "tiny.png").write_bytes(png((6, 5)))
    extra = [
        ("missing", "images/gone.png"),
        ("corrupt", "images/corrupt.png"),
        ("notes", "images/notes.png"),
        ("huge", "images/huge.png"),
        ("tiny", "images/tiny.png"),
    ]
    rows += [
        {"id": uid, "question": f"What is {k} + 1?", "answer": str(k + 1), "image_path": path}
        for k, (uid, path) in enumerate(extra)
    ]
    path = folder / "train.json"
    path.write_text(json.dumps(rows))
    return path


def test_tiny_multimodal_run_carries_images_through_every_role(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train = write_training_file(tmp_path)
    cfg = load_config(
        ROOT / "configs/k12_tiny_vl_cpu.yaml",
        [
            f"data.train_path={train}",
            "data.train_size=0",
            f"trainer.output_dir={tmp_path / 'out'}",
            "trainer.run_name=e2e-tiny-vl",
            "trainer.total_steps=2",
            "trainer.eval_every=2",
            "trainer.val_before_train=false",  # one evaluation, after step 2, is enough here
            "learner.freeze_vision_tower=false",
            "reward.function=tests.e2e.reward_fns:distinct_char_share",
        ],
    )
    groups = cfg.trainer.rollout_batch_size
    with caplog.at_level(logging.WARNING), Trainer(cfg) as trainer:
        assert len(trainer.train_prompts) == 14
        assert all(len(p.images) == 1 for p in trainer.train_prompts)
        summary = trainer.run()
        prepared = {p.example.uid: p.images for p in trainer.train_prompts}
        # what the buffer holds for the last step: each group's prepared PNG bytes
        served = trainer.buffer.sample(
            trainer.run_id, 1, policy_version=1, expected_groups=groups, spec=trainer.spec
        )
    rows = read_metrics(summary.metrics_path)
    assert [r["step"] for r in rows] == [0, 1]

    # bad images: skipped and counted before training, each named with its file and row
    assert rows[-1]["data/skipped_rows"] == 3
    for row, reason in ((13, "gone.png"), (14, "corrupt.png"), (15, "notes.png")):
        assert f"{train} row {row}: " in caplog.text and reason in caplog.text

    # images reached rollout (the engines encoded one per prompt) and the buffer
    assert [r["rollout/images"] for r in rows] == [groups, 2 * groups]
    assert [r["buffer/images"] for r in rows] == [groups, 2 * groups]
    assert len(served.images) == groups
    for prompt_id, found in served.images.items():
        assert tuple(image.data for image in found.images) == prepared[prompt_id]

    # every role ran: rewards, PTS/ABS pairs, two updates, evaluation on image prompts
    for r in rows:
        assert r["buffer/batch_rollouts"] > 0 and r["buffer/batch_rollouts"] % 2 == 0
        assert math.isfinite(r["learner/policy_loss"]) and r["learner/num_optimizer_steps"] >= 1
    assert rows[1]["rollout/weight_version"] >= 1 and rows[1]["weight_version"] >= 2
    assert 0.0 <= rows[1]["val/accuracy"] <= 1.0

    # images reached the learner: the vision tower learned from them
    assert summary.checkpoint is not None
    before = load_policy_model(trainer.model_path, dtype=torch.float32).state_dict()
    after = load_policy_model(summary.checkpoint / "learner" / "model", dtype=torch.float32)
    visual = {k: v for k, v in after.state_dict().items() if k.startswith("model.visual.")}
    moved = [k for k, v in visual.items() if not torch.equal(v, before[k])]
    assert len(visual) > 10 and len(moved) >= len(visual) // 2
