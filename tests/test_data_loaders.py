"""Dataset loaders (VQA v2, LLaVA, Hugging Face, the seed's CSV) and safe image loading, on tiny fixture
files written into tmp_path."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from gpt2mm.data.images import load_image, load_image_bytes
from gpt2mm.data.llava import load_llava
from gpt2mm.data.samples import LoadReport, Sample, Turn, strip_image_placeholder
from gpt2mm.data.sources import load_csv, load_hf, parse_qa_text
from gpt2mm.data.vqa import coco_image_name, coco_subtype, load_vqa, pick_answer
from gpt2mm.errors import DataError, UsageError

# --- helpers ---------------------------------------------------------------------------------------------


def write_image(path: Path, size=(8, 6), color=(200, 30, 30), mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def jpeg_bytes(size=(64, 64)) -> bytes:
    import numpy as np

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR claims width x height (with a valid CRC)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


ANSWERS_1 = ["red", "red", "red", "dark red", "red", "maroon", "red", "red", "crimson", "red"]


def vqa_files(tmp_path: Path, subtype="val2014", ext=".jpg", questions=None, annotations=None):
    """Three questions about two images, in VQA v2's official layout."""
    images = tmp_path / "images"
    for image_id in (1, 42):
        write_image(images / coco_image_name(image_id, subtype, ext))
    qs = questions or [
        {"image_id": 1, "question": "What color is the square?", "question_id": 10},
        {"image_id": 1, "question": "How many squares?", "question_id": 11},
        {"image_id": 42, "question": "Is it a circle?", "question_id": 420},
    ]
    anns = annotations or [
        {
            "image_id": q["image_id"],
            "question_id": q["question_id"],
            "question_type": "what color is the",
            "answer_type": "other",
            "multiple_choice_answer": mc,
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(ans)
            ],
        }
        for q, mc, ans in zip(
            qs, ["red", "1", "no"], [ANSWERS_1, ["1"] * 9 + ["one"], ["no"] * 6 + ["yes"] * 4]
        )
    ]
    qf = write_json(tmp_path / "questions.json", {"data_subtype": subtype, "questions": qs})
    af = write_json(tmp_path / "annotations.json", {"annotations": anns})
    return qf, af, images


# --- samples ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<image>\nWhat is this?", "What is this?"),
        ("What is this?\n<image>", "What is this?"),
        ("Look at <image> and answer.", "Look at and answer."),
        ("line one\n<image>\nline two", "line one\nline two"),
        ("<image>", ""),
        ("no placeholder ", "no placeholder"),
    ],
)
def test_strip_image_placeholder(text, expected):
    assert strip_image_placeholder(text) == expected


def test_report_raises_or_counts():
    with pytest.raises(DataError, match="x.json: record 3"):
        LoadReport("x.json").bad("bad schema", "x.json: record 3: wrong")
    r = LoadReport("x.json", skip_bad=True)
    for reason in ["missing image", "bad schema", "missing image"]:
        r.bad(reason, "msg")
    r.loaded = 7
    assert r.num_skipped == 3
    assert r.summary() == "x.json: 7 samples; skipped 3 records: 2 missing image, 1 bad schema"
    assert LoadReport("y.json", loaded=2).summary() == "y.json: 2 samples; nothing skipped"


# --- images ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, fmt, ext",
    [("RGB", "JPEG", ".jpg"), ("RGBA", "PNG", ".png"), ("L", "PNG", ".png"), ("P", "GIF", ".gif")],
)
def test_load_image_converts_to_rgb(tmp_path, mode, fmt, ext):
    color = 3 if mode in ("L", "P") else (10, 20, 30, 255)[: len(mode)]
    path = write_image(tmp_path / f"a{ext}", size=(7, 5), color=color, mode=mode, fmt=fmt)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (7, 5)
    assert load_image_bytes(path.read_bytes()).size == (7, 5)


def test_load_image_refuses_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jpg: no such image file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(DataError, match="not a file"):
        load_image(tmp_path)


def test_load_image_refuses_non_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is text, not a JPEG\n")
    with pytest.raises(DataError, match=r"notes\.jpg: not an image file"):
        load_image(path)
    with pytest.raises(DataError, match="upload: not an image file"):
        load_image_bytes(b"hello", name="upload")
    with pytest.raises(DataError, match="empty"):
        load_image_bytes(b"")


def test_load_image_refuses_truncated_jpeg(tmp_path):
    data = jpeg_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    Image.open(path)  # the header alone reads fine: only the full decode finds the damage
    with pytest.raises(DataError, match=r"cut\.jpg: truncated or corrupt JPEG"):
        load_image(path)
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_image_bytes(data[: len(data) // 2])


def test_load_image_refuses_over_byte_limit(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_bytes())
    size = path.stat().st_size
    assert load_image(path, max_bytes=size).size == (64, 64)
    with pytest.raises(DataError, match=rf"big\.jpg: {size} bytes, over the limit of {size - 1}"):
        load_image(path, max_bytes=size - 1)
    with pytest.raises(DataError, match="over the limit"):
        load_image_bytes(path.read_bytes(), max_bytes=size - 1)


def test_load_image_refuses_decompression_bomb_before_decoding(tmp_path, monkeypatch):
    # 3000 x 3000 declared, 1 pixel of data: refused by our limit from the header, not by a failed decode.
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(3000, 3000))
    with pytest.raises(
        DataError, match=r"bomb\.png: header declares 3000x3000 = 9000000 pixels, over the limit"
    ):
        load_image(path, max_pixels=1_000_000)
    # 40000 x 40000 with PIL's global check switched off: our default limit still refuses it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    path.write_bytes(png_bomb(40_000, 40_000))
    with pytest.raises(DataError, match="1600000000 pixels, over the limit"):
        load_image(path)
    # ... and with PIL's check on, its error becomes a DataError too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match="decompression bomb"):
        load_image_bytes(path.read_bytes(), name="bomb")


def test_load_image_small_pixel_limit(tmp_path):
    path = write_image(tmp_path / "a.png", size=(20, 20))
    assert load_image(path, max_pixels=400).size == (20, 20)
    with pytest.raises(DataError, match="400 pixels, over the limit of 399"):
        load_image(path, max_pixels=399)


# --- VQA v2 ----------------------------------------------------------------------------------------------


def test_coco_name_rule():
    assert coco_subtype("train2014") == "train2014"
    assert coco_subtype("test2015") == "test2015"
    assert coco_subtype("train") == "train2014"  # the synthetic world's year-less subtype
    assert coco_subtype("val") == "val2014"
    assert coco_image_name(42, "val2014") == "COCO_val2014_000000000042.jpg"
    assert coco_image_name(7, "train", ".png") == "COCO_train2014_000000000007.png"


def test_vqa_sample_fields(tmp_path):
    samples, report = load_vqa(*vqa_files(tmp_path))
    assert [s.id for s in samples] == ["10", "11", "420"]
    s = samples[0]
    assert isinstance(s, Sample)
    assert s.turns == [Turn("user", "What color is the square?"), Turn("assistant", "red")]
    assert s.image == str(tmp_path / "images" / "COCO_val2014_000000000001.jpg")
    assert s.answers == ANSWERS_1
    assert (s.question_id, s.image_id, s.answer_type, s.question_type) == (
        10,
        1,
        "other",
        "what color is the",
    )
    assert samples[2].image.endswith("COCO_val2014_000000000042.jpg")
    assert report.loaded == 3 and report.summary().endswith("3 samples; nothing skipped")


def test_vqa_synthetic_png_and_yearless_subtype(tmp_path):
    samples, _ = load_vqa(*vqa_files(tmp_path, subtype="train", ext=".png"))
    assert samples[0].image.endswith("COCO_train2014_000000000001.png")
    # the data_subtype argument overrides the file's key
    qf, af, images = vqa_files(tmp_path, subtype="train")
    for p in list(images.iterdir()):
        p.rename(images / p.name.replace("train2014", "val2014"))
    samples, _ = load_vqa(qf, af, images, data_subtype="val2014")
    assert samples[0].image.endswith("COCO_val2014_000000000001.jpg")
    with pytest.raises(DataError, match="missing image|not found"):
        load_vqa(qf, af, images)


def test_vqa_multiple_choice_vs_sampled_answers(tmp_path):
    files = vqa_files(tmp_path)
    mc = [s.turns[1].text for s in load_vqa(*files)[0]]
    assert mc == ["red", "1", "no"]
    a = load_vqa(*files, answer_mode="sample", seed=3)[0]
    b = load_vqa(*files, answer_mode="sample", seed=3)[0]
    assert [s.turns[1].text for s in a] == [s.turns[1].text for s in b]
    assert all(s.turns[1].text in s.answers for s in a)
    # per question id: the same draw whatever subset is loaded
    assert load_vqa(*files, answer_mode="sample", seed=3, limit=1)[0][0].turns[1].text == a[0].turns[1].text
    assert a[0].turns[1].text == pick_answer(ANSWERS_1, 10, 3)
    # different seeds draw differently (over many question ids)
    draws = {seed: [pick_answer(ANSWERS_1, q, seed) for q in range(200)] for seed in (0, 1)}
    assert draws[0] != draws[1]
    assert set(draws[0]) == set(ANSWERS_1)
    with pytest.raises(UsageError, match="answer_mode"):
        load_vqa(*files, answer_mode="majority")


def test_vqa_limit_keeps_file_order(tmp_path):
    samples, report = load_vqa(*vqa_files(tmp_path), limit=2)
    assert [s.question_id for s in samples] == [10, 11] and report.loaded == 2


def test_vqa_question_without_annotation(tmp_path):
    qf, af, images = vqa_files(tmp_path)
    anns = json.loads(af.read_text())
    del anns["annotations"][1]
    write_json(af, anns)
    with pytest.raises(
        DataError, match=r"questions\.json: question_id 11: no annotation in .*annotations\.json"
    ):
        load_vqa(qf, af, images)
    samples, report = load_vqa(qf, af, images, skip_bad=True)
    assert [s.id for s in samples] == ["10", "420"]
    assert report.skipped == {"no annotation": 1}
    assert "skipped 1 record: 1 no annotation" in report.summary()


def test_vqa_missing_image_and_check_images(tmp_path):
    qf, af, images = vqa_files(tmp_path)
    (images / coco_image_name(42, "val2014")).unlink()
    with pytest.raises(
        DataError, match=r"question_id 420: image .*COCO_val2014_000000000042\.jpg \(or \.png\) not found"
    ):
        load_vqa(qf, af, images)
    samples, report = load_vqa(qf, af, images, skip_bad=True, limit=5)
    assert len(samples) == 2 and report.skipped == {"missing image": 1}
    samples, report = load_vqa(qf, af, images, check_images=False)
    assert len(samples) == 3 and samples[2].image.endswith("COCO_val2014_000000000042.jpg")


def test_vqa_images_named_by_a_pattern(tmp_path):
    """data.image_pattern: official files whose images are not COCO-named, in a folder or per subtype."""
    qf, af, coco = vqa_files(tmp_path)
    for image_id in (1, 42):  # the same images as 1.png and val2014/000042.jpg
        write_image(tmp_path / "flat" / f"{image_id}.png")
        write_image(tmp_path / "nested" / "val2014" / f"{image_id:06d}.jpg")
    reference, _ = load_vqa(qf, af, coco)
    for folder, pattern, name in [
        ("flat", "{image_id}.png", "42.png"),
        ("nested", "{subtype}/{image_id:06d}.jpg", "val2014/000042.jpg"),
    ]:
        samples, _ = load_vqa(qf, af, tmp_path / folder, image_pattern=pattern)
        assert [(s.id, s.turns, s.answers) for s in samples] == [
            (s.id, s.turns, s.answers) for s in reference
        ]
        assert samples[2].image == str(tmp_path / folder / name)
    (tmp_path / "flat" / "42.png").unlink()
    with pytest.raises(DataError, match=r"question_id 420: image .*flat/42\.png not found"):
        load_vqa(qf, af, tmp_path / "flat", image_pattern="{image_id}.png")
    # without {subtype}, the questions file needs no data_subtype
    qs = json.loads(qf.read_text())
    del qs["data_subtype"]
    write_json(qf, qs)
    samples, report = load_vqa(qf, af, tmp_path / "flat", image_pattern="{image_id}.png", skip_bad=True)
    assert len(samples) == 2 and report.skipped == {"missing image": 1}
    for bad in ["{id}.png", "{image_id:q}.png", "image.png"]:
        with pytest.raises(UsageError, match="image_pattern"):
            load_vqa(qf, af, tmp_path / "flat", image_pattern=bad)


def test_vqa_bad_schema(tmp_path):
    qs = [
        {"image_id": 1, "question": "ok?", "question_id": 10},
        {"image_id": 1, "question_id": 11},  # no question
        {"image_id": 1, "question": "again?", "question_id": 10},  # duplicate id
    ]
    anns = [
        {
            "image_id": 1,
            "question_id": 10,
            "multiple_choice_answer": "yes",
            "answers": [{"answer": "yes"}] * 10,
        },
    ]
    qf, af, images = vqa_files(tmp_path, questions=qs, annotations=anns)
    with pytest.raises(DataError, match=r"questions\.json: question 1: expected"):
        load_vqa(qf, af, images)
    samples, report = load_vqa(qf, af, images, skip_bad=True)
    assert len(samples) == 1 and report.skipped == {"bad schema": 1, "duplicate id": 1}
    write_json(qf, {"questions": qs})
    with pytest.raises(DataError, match="data_subtype"):
        load_vqa(qf, af, images)
    write_json(af, [1, 2])
    with pytest.raises(DataError, match=r"annotations\.json: expected a JSON object"):
        load_vqa(qf, af, images, data_subtype="val2014")
    af.write_text("{not json")
    with pytest.raises(DataError, match=r"annotations\.json: not valid JSON"):
        load_vqa(qf, af, images)


# --- LLaVA -----------------------------------------------------------------------------------------------


def llava_records():
    return [
        {  # instruct style, multi-turn
            "id": "000000033471",
            "image": "coco/000000033471.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat are the colors of the bus?"},
                {"from": "gpt", "value": "The bus is white and red."},
                {"from": "human", "value": "What feature can be seen on the back?"},
                {"from": "gpt", "value": "An advertisement."},
            ],
        },
        {  # text-only (mix-665k), with a system turn
            "id": "wgByO4Y_0",
            "model": "",
            "conversations": [
                {"from": "system", "value": "You are helpful."},
                {"from": "human", "value": "Say hi."},
                {"from": "gpt", "value": "Hi!"},
            ],
        },
        {  # pretrain-558k caption style
            "id": "004539375",
            "image": "00453/004539375.jpg",
            "conversations": [
                {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
                {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"},
            ],
        },
    ]


def llava_file(tmp_path: Path, records) -> tuple[Path, Path]:
    images = tmp_path / "llava_images"
    for rec in records:
        image = rec.get("image") if isinstance(rec, dict) else None
        for name in [image] if isinstance(image, str) else image if isinstance(image, list) else []:
            if isinstance(name, str) and name and name != "missing.jpg":
                write_image(images / name)
    return write_json(tmp_path / "llava.json", records), images


def test_llava_formats(tmp_path):
    path, images = llava_file(tmp_path, llava_records())
    samples, report = load_llava(path, images)
    multi, text_only, caption = samples
    assert multi.id == "000000033471" and multi.image == str(images / "coco/000000033471.jpg")
    assert [t.role for t in multi.turns] == ["user", "assistant", "user", "assistant"]
    assert multi.turns[0].text == "What are the colors of the bus?"
    assert multi.answers is None and multi.question_id is None
    assert text_only.image is None and text_only.turns == [Turn("user", "Say hi."), Turn("assistant", "Hi!")]
    assert caption.turns[0].text == "Render a clear and concise summary of the photo."
    assert caption.turns[1].text.startswith("select luxury")
    assert report.loaded == 3 and report.notes == {"system turns dropped": 1}
    assert "nothing skipped (1 system turns dropped)" in report.summary()
    assert [s.id for s in load_llava(path, images, limit=2)[0]] == ["000000033471", "wgByO4Y_0"]


def _two_images(question: str, answer: str) -> dict:
    """A LLaVA record with two images and one exchange."""
    conversation = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": "b", "image": ["a.jpg", "b.jpg"], "conversations": conversation}


@pytest.mark.parametrize(
    "record, message",
    [
        ({"id": "b", "image": "x.jpg"}, "missing 'conversations'"),
        ({"image": "x.jpg", "conversations": []}, "missing 'id'"),
        ({"id": "b", "conversations": []}, "non-empty list"),
        ({"id": "b", "conversations": [{"from": "bot", "value": "hi"}]}, "unknown role 'bot'"),
        (
            {"id": "b", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
            "turns must alternate",
        ),
        ({"id": "b", "conversations": [{"from": "gpt", "value": "a"}]}, "user turn was expected"),
        ({"id": "b", "conversations": [{"from": "human", "value": "a"}]}, "ends with a user turn"),
        (
            {"id": "b", "conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]},
            "turn 0: expected",
        ),
        (
            {
                "id": "b",
                "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image>"}],
            },
            "assistant turn",
        ),
        ({"id": "b", "image": [], "conversations": []}, "a non-empty list"),
        ({"id": "b", "image": ["a.jpg", 3], "conversations": []}, "a non-empty list"),
        (
            _two_images("Is <image> red?", "no"),
            "the user turns hold 1 <image> placeholders for 2 images",
        ),
        (
            _two_images("<image> <image> <image> Which?", "the first"),
            "the user turns hold 3 <image> placeholders for 2 images",
        ),
        (
            _two_images("<image> <image> Which?", "<image>"),
            "<image> in an assistant turn",
        ),
        ("not a record", "expected a JSON object"),
    ],
)
def test_llava_bad_schema(tmp_path, record, message):
    path, images = llava_file(tmp_path, [llava_records()[0], record])
    with pytest.raises(DataError, match="llava.json: record 1") as e:
        load_llava(path, images)
    assert message in str(e.value)
    samples, report = load_llava(path, images, skip_bad=True)
    assert len(samples) == 1 and report.skipped == {"bad schema": 1}
    assert report.examples and message in report.examples[0]


def test_llava_missing_image_duplicate_ids_and_skip_summary(tmp_path):
    recs = llava_records()
    recs.append(dict(recs[0]))  # the same id again: renamed
    recs.append({"id": "gone", "image": "missing.jpg", "conversations": recs[2]["conversations"]})
    recs.append({"id": "bad", "conversations": [{"from": "gpt", "value": "x"}]})
    recs.append({"id": "gone2", "image": "missing2.jpg", "conversations": recs[2]["conversations"]})
    path, images = llava_file(tmp_path, recs[:4])
    path = write_json(path, recs)
    with pytest.raises(
        DataError, match=r"llava\.json: record 4 \(id 'gone'\): image .*missing\.jpg not found"
    ):
        load_llava(path, images)
    samples, report = load_llava(path, images, skip_bad=True)
    assert [s.id for s in samples] == ["000000033471", "wgByO4Y_0", "004539375", "000000033471#3"]
    assert report.skipped == {"missing image": 2, "bad schema": 1}
    assert "skipped 3 records: 2 missing image, 1 bad schema" in report.summary()
    assert len(load_llava(path, images, check_images=False, skip_bad=True)[0]) == 6
    write_json(path, {"not": "a list"})
    with pytest.raises(DataError, match="expected a JSON list"):
        load_llava(path, images)
    with pytest.raises(DataError, match="no such file"):
        load_llava(tmp_path / "absent.json", images)


def two_image_records() -> list[dict]:
    return [
        {
            "id": "pair",
            "image": ["a.jpg", "sub/b.jpg"],
            "conversations": [
                {"from": "human", "value": "Image 1: <image>\nImage 2:<image>\nWhich is bigger?"},
                {"from": "gpt", "value": "The second."},
            ],
        },
        {
            "id": "spread",
            "image": ["a.jpg", "sub/b.jpg"],
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "A circle."},
                {"from": "human", "value": "And this one? <image>"},
                {"from": "gpt", "value": "A square."},
            ],
        },
        {
            "id": "no-placeholder",
            "image": ["a.jpg", "sub/b.jpg"],
            "conversations": [{"from": "human", "value": "Compare them."}, {"from": "gpt", "value": "Same."}],
        },
        {
            "id": "list-of-one",
            "image": ["a.jpg"],
            "conversations": [
                {"from": "human", "value": "What is <image> it?"},
                {"from": "gpt", "value": "A."},
            ],
        },
        {
            "id": "string",
            "image": "a.jpg",
            "conversations": [
                {"from": "human", "value": "What is <image> it?"},
                {"from": "gpt", "value": "A."},
            ],
        },
    ]


def test_llava_several_images_keep_their_placeholders(tmp_path):
    path, images = llava_file(tmp_path, two_image_records())
    samples, report = load_llava(path, images)
    pair, spread, bare, one, string = samples
    a, b = str(images / "a.jpg"), str(images / "sub/b.jpg")
    assert pair.images == [a, b] and pair.image == a and pair.more_images == [b]
    assert pair.turns[0].text == "Image 1: <image>\nImage 2:<image>\nWhich is bigger?"
    assert pair.encoder_turns() == [("user", pair.turns[0].text, 2), ("assistant", "The second.", 0)]
    assert [n for _, _, n in spread.encoder_turns()] == [1, 0, 1, 0]
    # no placeholder: every image goes to the first user turn (after its `Q:`)
    assert bare.encoder_turns() == [("user", "Compare them.", 2), ("assistant", "Same.", 0)]
    # a list of one image is the plain string's record: the placeholder removed, the image after `Q:`
    assert one.images == string.images == [a] and one.more_images == []
    assert one.turns == string.turns == [Turn("user", "What is it?"), Turn("assistant", "A.")]
    assert one.encoder_turns() == [("user", "What is it?", 1), ("assistant", "A.", 0)]
    assert report.loaded == 5
    # a user turn that is only its image is a prompt (as the first turn of a single-image record is)
    alone = {
        "id": "alone",
        "image": ["a.jpg", "sub/b.jpg"],
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A circle."},
            {"from": "human", "value": "<image>"},
            {"from": "gpt", "value": "A square."},
        ],
    }
    path = write_json(path, [alone])
    (sample,), _ = load_llava(path, images)
    assert [n for _, _, n in sample.encoder_turns()] == [1, 0, 1, 0]


def test_llava_several_images_errors_name_file_and_record(tmp_path):
    records = two_image_records()
    records.append(
        {
            "id": "extra",
            "image": ["a.jpg", "sub/b.jpg"],
            "conversations": [
                {"from": "human", "value": "<image> and <image>?"},
                {"from": "gpt", "value": "Two."},
                {"from": "human", "value": "<image>"},
                {"from": "gpt", "value": "x"},
            ],
        }
    )
    records.append(
        {"id": "gone", "image": ["a.jpg", "missing.jpg"], "conversations": records[2]["conversations"]}
    )
    path, images = llava_file(tmp_path, records)
    with pytest.raises(
        DataError,
        match=r"llava\.json: record 5 \(id 'extra'\): the user turns hold 3 <image> placeholders for 2 images",
    ):
        load_llava(path, images)
    samples, report = load_llava(path, images, skip_bad=True)
    assert [s.id for s in samples] == ["pair", "spread", "no-placeholder", "list-of-one", "string"]
    assert report.skipped == {"bad schema": 1, "missing image": 1}
    assert any("record 6 (id 'gone'): image" in m and "missing.jpg not found" in m for m in report.examples)


def test_sample_with_placeholders_that_do_not_count_its_images():
    s = Sample(
        "x", "a.jpg", [Turn("user", "<image> vs <image>"), Turn("assistant", "y")], more_images=["b.jpg"]
    )
    assert s.encoder_turns()[0] == ("user", "<image> vs <image>", 2)
    s.more_images = ["b.jpg", "c.jpg"]
    with pytest.raises(ValueError, match="sample x: its user turns hold 2 <image> placeholders but it has 3"):
        s.encoder_turns()
    with pytest.raises(ValueError, match="more_images without a first image"):
        Sample("y", None, [], more_images=["b.jpg"])


# --- Hugging Face datasets -------------------------------------------------------------------------------


def test_hf_dataset_with_column_mapping_and_image_cache(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {
            "img": [Image.new("RGB", (5, 4), (1, 2, 3)), Image.new("RGB", (6, 6), (9, 9, 9))],
            "q": ["<image>\nwhat color?", "how many?"],
            "mc": ["black", "2"],
            "all_answers": [
                [{"answer": "black", "answer_id": 1}] * 10,
                [{"answer": "2", "answer_id": 1}] * 10,
            ],
            "qid": [5, 6],
        }
    )
    columns = {
        "image": "img",
        "question": "q",
        "answer": "mc",
        "answers": "all_answers",
        "question_id": "qid",
    }
    samples, report = load_hf(ds, columns, image_cache=tmp_path / "cache")
    assert report.loaded == 2
    s = samples[0]
    assert s.id == "5" and s.question_id == 5 and s.answers == ["black"] * 10
    assert s.turns == [Turn("user", "what color?"), Turn("assistant", "black")]
    data = Path(s.image).read_bytes()
    assert (
        Path(s.image) == tmp_path / "cache" / ds._fingerprint / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    )
    assert load_image(s.image).size == (5, 4)
    mtime = Path(s.image).stat().st_mtime_ns
    again, _ = load_hf(ds, columns, image_cache=tmp_path / "cache")
    assert again[0].image == s.image and Path(s.image).stat().st_mtime_ns == mtime  # written once
    with pytest.raises(UsageError, match="image_cache"):
        load_hf(ds, columns)
    with pytest.raises(DataError, match="no column 'question'"):
        load_hf(ds, {"question": "question", "answer": "mc"})
    with pytest.raises(UsageError, match="unknown fields"):
        load_hf(ds, {"caption": "q"})


def test_hf_from_disk_paths_conversations_and_bad_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    write_image(tmp_path / "imgs" / "a.jpg")
    conv = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "hello"}]
    ds = datasets.Dataset.from_dict(
        {
            "id": ["r0", "r1", "r2"],
            "image": ["a.jpg", "missing.jpg", None],
            "conversations": [conv, conv, [{"from": "gpt", "value": "x"}]],
        }
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dsdict"))
    with pytest.raises(DataError, match="split="):
        load_hf(tmp_path / "dsdict")
    with pytest.raises(DataError, match=r"dsdict: row 1: image .*missing\.jpg not found"):
        load_hf(tmp_path / "dsdict", split="train", image_root=tmp_path / "imgs")
    samples, report = load_hf(tmp_path / "dsdict", split="train", image_root=tmp_path / "imgs", skip_bad=True)
    assert [s.id for s in samples] == ["r0"] and samples[0].turns == [
        Turn("user", "hi"),
        Turn("assistant", "hello"),
    ]
    assert samples[0].image == str(tmp_path / "imgs" / "a.jpg")
    assert report.skipped == {"missing image": 1, "bad schema": 1}
    ds.save_to_disk(str(tmp_path / "plain"))
    samples, _ = load_hf(tmp_path / "plain", check_images=False, limit=1)
    assert [s.id for s in samples] == ["r0"] and samples[0].image == "a.jpg"
    again, _ = load_hf(tmp_path / "plain", split="train", check_images=False, limit=1)
    assert [s.id for s in again] == ["r0"]
    # one Dataset has no validation split: asking for one is an error, not its training rows again
    with pytest.raises(DataError, match="no split 'validation'.*hf_val_split null"):
        load_hf(tmp_path / "plain", split="validation", check_images=False)


# --- the seed's CSV --------------------------------------------------------------------------------------


def test_parse_qa_text():
    assert parse_qa_text("Q: <image> What is it? A: a cat<|endoftext|>") == ("What is it?", "a cat")
    assert parse_qa_text("Q:how many?A: 2") == ("how many?", "2")
    with pytest.raises(ValueError):
        parse_qa_text("just a caption")


@pytest.mark.parametrize("header", ["image,text\n", "", ",image,text\n"])
def test_csv_with_and_without_header(tmp_path, header):
    write_image(tmp_path / "img" / "a.jpg")
    write_image(tmp_path / "img" / "b.jpg")
    index = header.startswith(",")
    rows = [("img/a.jpg", "Q: <image> What is it? A: a square"), ("img/b.jpg", 'Q: Is it "red"? A: yes')]
    lines = "".join(
        (f"{i}," if index else "") + f'{p},"{t.replace(chr(34), chr(34) * 2)}"\n'
        for i, (p, t) in enumerate(rows)
    )
    path = tmp_path / "seed.csv"
    path.write_text(header + lines)
    samples, report = load_csv(path)
    assert [(s.image, s.turns[0].text, s.turns[1].text) for s in samples] == [
        (str(tmp_path / "img/a.jpg"), "What is it?", "a square"),
        (str(tmp_path / "img/b.jpg"), 'Is it "red"?', "yes"),
    ]
    first_line = 2 if header else 1
    assert [s.id for s in samples] == [str(first_line), str(first_line + 1)]
    assert report.loaded == 2 and len(load_csv(path, limit=1)[0]) == 1


def test_csv_bad_rows(tmp_path):
    write_image(tmp_path / "a.jpg")
    path = tmp_path / "seed.csv"
    path.write_text(
        "image,text\n"
        "a.jpg,Q: ok? A: yes\n"
        "a.jpg,a caption without a question\n"
        "only one field\n"
        "gone.jpg,Q: where? A: here\n"
    )
    with pytest.raises(DataError, match=r"seed\.csv: line 3: text 'a caption"):
        load_csv(path)
    samples, report = load_csv(path, skip_bad=True)
    assert len(samples) == 1 and report.skipped == {"bad row": 2, "missing image": 1}
    assert report.summary().endswith("skipped 3 records: 2 bad row, 1 missing image")
    samples, report = load_csv(path, skip_bad=True, check_images=False)
    assert len(samples) == 2 and report.skipped == {"bad row": 2}
    path.write_text("a.jpg,Q: ok? A: yes\n" * 4 + "gone.jpg,Q: where? A: here\n")  # no header
    with pytest.raises(DataError, match=r"seed\.csv: line 5: image .*gone\.jpg not found"):
        load_csv(path)
    path.write_text("a.jpg,a bad first line is data and not a header\n")
    with pytest.raises(DataError, match=r"seed\.csv: line 1: text"):
        load_csv(path)
    path.write_bytes(b"a.jpg,Q: \xff\xfe? A: yes\n")
    with pytest.raises(DataError, match=r"seed\.csv: .*not valid UTF-8"):
        load_csv(path)


# --- Hugging Face data files, streaming, the hub -------------------------------------------------------------


def test_streamed_json_with_a_bad_first_row_is_one_line(tmp_path, hf):
    """Streaming reads the first row to learn the columns: a malformed one is the loader's one-line error,
    as it is without streaming."""
    from gpt2mm.data.sources import load_hf

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text('{"question": "q", "answer": \n')
    with pytest.raises(DataError) as e:
        load_hf(tmp_path / "d", streaming=True, check_images=False)
    assert "\n" not in str(e.value) and "row 0: cannot read the data" in str(e.value)


@pytest.fixture
def hf(tmp_path, monkeypatch):
    """The datasets package, its cache (where load_dataset converts data files to Arrow) under tmp_path."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return datasets


def vqa_rows(n: int) -> dict[str, list]:
    """n VQA-style rows with image data (distinct PNGs), 10 human answers and question ids."""
    buf = []
    for i in range(n):
        b = io.BytesIO()
        Image.new("RGB", (4 + i, 4), (10 * i, 0, 0)).save(b, "PNG")
        buf.append({"bytes": b.getvalue(), "path": None})
    return {
        "image": buf,
        "question": [f"<image>\nhow many {i}?" for i in range(n)],
        "answer": [str(i) for i in range(n)],
        "answers": [[str(i)] * 9 + ["lots"] for i in range(n)],
        "question_id": list(range(100, 100 + n)),
    }


def comparable(samples: list[Sample]) -> list[tuple]:
    """A sample's fields and its image's bytes (the cached file's name differs between sources)."""
    return [
        (s.id, s.turns, s.answers, s.question_id, Path(s.image).read_bytes() if s.image else None)
        for s in samples
    ]


def test_hf_data_files_and_streaming_give_the_save_to_disk_samples(tmp_path, hf):
    """A folder of parquet files (splits from the file names), one parquet file, and each of them streamed,
    give the samples the save_to_disk folder of the same rows gives."""
    features = hf.Features(
        {
            "image": hf.Image(),
            "question": hf.Value("string"),
            "answer": hf.Value("string"),
            "answers": hf.Sequence(hf.Value("string")),
            "question_id": hf.Value("int64"),
        }
    )
    train, val = (hf.Dataset.from_dict(vqa_rows(n), features=features) for n in (5, 2))
    hf.DatasetDict({"train": train, "validation": val}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "pq").mkdir()
    train.to_parquet(str(tmp_path / "pq" / "train-00000-of-00001.parquet"))
    val.to_parquet(str(tmp_path / "pq" / "validation-00000-of-00001.parquet"))
    cache = tmp_path / "images"
    want, _ = load_hf(tmp_path / "saved", split="train", image_cache=cache)
    assert len(want) == 5 and want[1].answers == ["1"] * 9 + ["lots"] and want[1].question_id == 101
    assert want[1].turns == [Turn("user", "how many 1?"), Turn("assistant", "1")]
    for source in (tmp_path / "pq", tmp_path / "pq" / "train-00000-of-00001.parquet", tmp_path / "saved"):
        for streaming in (False, True):
            got, report = load_hf(source, split="train", image_cache=cache, streaming=streaming)
            assert comparable(got) == comparable(want), (source, streaming)
            assert report.source == str(source) and report.loaded == 5
    streamed, _ = load_hf(tmp_path / "pq", split="train", image_cache=cache, streaming=True)
    val_want, _ = load_hf(tmp_path / "saved", split="validation", image_cache=cache)
    val_got, _ = load_hf(tmp_path / "pq", split="validation", image_cache=cache, streaming=True)
    assert comparable(val_got) == comparable(val_want) and len(val_got) == 2
    # a streamed dataset's images are cached under a key of its source, split and files: stable across loads
    again, _ = load_hf(tmp_path / "pq", split="train", image_cache=cache, streaming=True, limit=2)
    assert [s.image for s in again] == [s.image for s in streamed[:2]] and "stream-" in again[0].image
    with pytest.raises(DataError, match=r"pq: no split 'test'"):
        load_hf(tmp_path / "pq", split="test", image_cache=cache)


def test_hf_streaming_reads_only_the_rows_it_keeps(tmp_path, hf):
    """JSON data files whose second file is not JSON: loading everything fails (datasets converts all files
    first) with a one-line error naming the folder; streaming the first 2 samples never opens that file."""
    folder = tmp_path / "js"
    folder.mkdir()
    rows = [{"id": f"r{i}", "question": f"q{i}?", "answer": f"a{i}"} for i in range(3)]
    (folder / "train-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "train-1.jsonl").write_text("{this is not json\n")
    samples, report = load_hf(folder, streaming=True, limit=2)
    assert [(s.id, s.turns[1].text) for s in samples] == [("r0", "a0"), ("r1", "a1")]
    assert report.loaded == 2 and samples[0].image is None
    with pytest.raises(DataError, match=r"js: .*cannot") as e:
        load_hf(folder)
    assert "\n" not in str(e.value)


def test_hf_hub_id_offline_and_missing_paths_are_one_line_errors(hf, tmp_path):
    """A hub id goes to datasets.load_dataset; offline (the tests run with HF_HUB_OFFLINE=1) that is a
    one-line DataError naming it, as is a path that does not exist."""
    with pytest.raises(
        DataError, match=r"^someone/no-such-set: not a local folder or file, and the Hugging Face hub"
    ) as e:
        load_hf("someone/no-such-set")
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"no such folder or file"):
        load_hf(str(tmp_path / "absent" / "data"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: not a data file"):
        load_hf(tmp_path / "notes.txt")
    # a recipe's hf_dataset that is not under data.root: the message names where it was looked for
    from gpt2mm.data.splits import load_hf_split
    from gpt2mm.train.config import DataConfig

    cfg = DataConfig(format="hf", root=str(tmp_path), hf_dataset="my-set")
    with pytest.raises(DataError) as e:
        load_hf_split(cfg, "train", None)
    assert str(e.value).startswith(f"no {tmp_path / 'my-set'}, so data.hf_dataset was tried as a hub id: ")
    assert "\n" not in str(e.value)


def bad_record_data(tmp_path: Path, fmt: str, datasets) -> tuple[dict, str]:
    """Training data of `fmt` with 3 good records and 1 bad one: (the recipe's data: section, the bad
    record's place as a one-line error names it)."""
    write_image(tmp_path / "a.jpg")
    data = {"root": str(tmp_path), "format": fmt}
    if fmt == "vqa":  # the last question asks about an image that is not there
        qs = [
            {"image_id": 1, "question": "What color?", "question_id": 10},
            {"image_id": 42, "question": "How many?", "question_id": 11},
            {"image_id": 1, "question": "Is it?", "question_id": 12},
            {"image_id": 7, "question": "Where?", "question_id": 13},
        ]
        anns = [
            {"image_id": q["image_id"], "question_id": q["question_id"], "multiple_choice_answer": "yes",
             "answers": [{"answer": "yes"}] * 10}
            for q in qs
        ]  # fmt: skip
        vqa_files(tmp_path, questions=qs, annotations=anns)
        data |= {"train_questions": "questions.json", "train_annotations": "annotations.json"}
        return data | {"train_images": "images"}, r"questions\.json: question_id 13: image .* not found"
    if fmt == "llava":  # the second record has no reply
        conv = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "hello"}]
        records = [{"id": f"r{i}", "image": "a.jpg", "conversations": conv} for i in range(4)]
        records[1]["conversations"] = conv[:1]
        write_json(tmp_path / "llava.json", records)
        where = r"llava\.json: record 1 \(id 'r1'\): the conversation ends"
        return data | {"llava_train": "llava.json", "llava_images": "."}, where
    if fmt == "hf":  # row 2 has an empty answer
        rows = {"image": ["a.jpg"] * 4, "question": ["q?"] * 4, "answer": ["yes", "no", " ", "yes"]}
        (tmp_path / "pq").mkdir()
        datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "pq" / "train.parquet"))
        return data | {"hf_dataset": "pq", "hf_val_split": None}, r"pq: row 2: empty question or answer"
    lines = ["a.jpg,Q: ok? A: yes", "a.jpg,Q: fine? A: no", "a.jpg,not a question", "a.jpg,Q: x? A: y"]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    return data, r"train\.csv: line 3: text 'not a question' is not of the form"


@pytest.mark.parametrize("fmt", ["vqa", "llava", "hf", "csv"])
def test_a_bad_record_is_a_one_line_error_or_skipped_and_counted_in_every_format(tmp_path, hf, fmt):
    """What `gpt2mm train` and `gpt2mm ppo` load (`load_samples`): without data.skip_bad a bad record stops
    the load with one line naming the file and the record; with it, it is counted in the load report."""
    from gpt2mm.data.splits import load_samples
    from gpt2mm.train.args import build
    from gpt2mm.train.config import DataConfig

    data, where = bad_record_data(tmp_path, fmt, hf)
    with pytest.raises(DataError, match=where) as e:
        load_samples(build(DataConfig, data), "train")
    assert "\n" not in str(e.value)
    samples, summary = load_samples(build(DataConfig, data | {"skip_bad": True}), "train")
    assert len(samples) == 3 and "3 samples; skipped 1 record: 1 " in summary
