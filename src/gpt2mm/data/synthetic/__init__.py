"""The synthetic shapes world: procedural scenes with checkable ground truth, written as VQA v2 and LLaVA data.

No dataset can be downloaded everywhere this project runs, so this package renders one. Every file has the
format of the real data (official VQA v2 questions/annotations, LLaVA conversations, COCO-style image names),
and every answer is computed from a plain scene record, so the whole pipeline (loading, training, scoring)
can be checked end to end offline.

The world is built to be LEARNABLE by the `tiny` preset (48 px ViT, 16 px patches): colours are saturated
and far apart, shapes are drawn without anti-aliasing, question templates are few and regular. Answers are
balanced within each template so that a question-only ("blind") model cannot do well: `blind_accuracy`
measures the best such predictor and `write_world` records it. Two layouts (`layout=`):

- "grid" (the default): objects sit on a 3x3 grid, one object per cell and one cell per patch at the
  default size, on a flat background, so a pixel's colour names its object exactly: easy to learn, but a
  model can read cells without learning to see;
- "free": objects of two clearly separated size ranges (9-12 and 17-22 px at 48 px) anywhere in the image,
  polygons turned by up to 15 degrees, overlapping a little (every object stays at least 75% visible), on a
  dark textured background with per-pixel noise. Positions are the 3x3 regions holding the objects'
  centres, and a position or relation question is asked only when the pixels make its answer clear (a
  centre well inside its region, centres well apart).

Same vocabulary, templates, answers and formats in both.

    gpt2mm synth data/synth --train 8000 --val 500 --test 500 --seed 0
    gpt2mm synth data/synth-free --layout free
    write_world("data/synth", 8000, 500, 500, seed=0, holdout=[("red", "circle")])

Layout of OUT_DIR (split is "train", "val" or "test"):

    images/{split}/COCO_{split}2014_{image_id:012d}.png
    scenes/{split}_scenes.json          # scene records (objects + the questions asked with their answers)
    {split}_questions.json              # VQA v2 questions, official format
    {split}_annotations.json            # VQA v2 annotations, official format (10 simulated human answers)
    {split}_llava.json                  # LLaVA conversations: a detailed description, then the Q&A turns
    world.json                          # parameters, counts and the blind accuracy; written last

Modules: `world` (vocabulary, scene records, rendering), `questions` (question families, simulated human
answers, the blind baseline), `descriptions` (describe a scene, parse and score free-text descriptions),
`write` (write_world, its splits and files, load_scenes). The `gpt2mm synth` command is
`gpt2mm.commands.synth`. Everything public is re-exported here: import from `gpt2mm.data.synthetic`.
"""

from gpt2mm.data.synthetic.descriptions import (
    DESCRIBE_PROMPT,
    FACT_ATTRIBUTES,
    describe,
    parse_description,
    score_description,
)
from gpt2mm.data.synthetic.questions import (
    FAMILIES,
    QID_FACTOR,
    TEMPLATES,
    answer_vocab,
    blind_accuracy,
    find_object,
    human_answers,
    make_questions,
    object_centre,
    object_phrases,
    qa_rows,
)
from gpt2mm.data.synthetic.world import (
    BACKGROUND,
    COLORS,
    COLUMNS,
    FREE_SIZE_RANGE,
    GRID,
    LAYOUTS,
    MAX_HIDDEN,
    MAX_OBJECTS,
    NOISE,
    NUMBERS,
    PLURALS,
    POSITIONS,
    REGION_MARGIN,
    RELATION_MARGIN,
    RELATIONS,
    ROWS,
    SHAPES,
    SIZE_FRACTION,
    SIZES,
    WORDS,
    YES_NO,
    article,
    clearly_in_region,
    make_scene,
    near_region,
    object_mask,
    position_name,
    region_of,
    relation_holds,
    render,
)
from gpt2mm.data.synthetic.write import (
    ID_OFFSET,
    SPLITS,
    load_scenes,
    parse_holdout,
    world_mismatch,
    world_params,
    write_world,
)

__all__ = [
    "BACKGROUND",
    "COLORS",
    "COLUMNS",
    "DESCRIBE_PROMPT",
    "FACT_ATTRIBUTES",
    "FAMILIES",
    "FREE_SIZE_RANGE",
    "GRID",
    "ID_OFFSET",
    "LAYOUTS",
    "MAX_HIDDEN",
    "MAX_OBJECTS",
    "NOISE",
    "NUMBERS",
    "PLURALS",
    "POSITIONS",
    "QID_FACTOR",
    "REGION_MARGIN",
    "RELATIONS",
    "RELATION_MARGIN",
    "ROWS",
    "SHAPES",
    "SIZES",
    "SIZE_FRACTION",
    "SPLITS",
    "TEMPLATES",
    "WORDS",
    "YES_NO",
    "answer_vocab",
    "article",
    "blind_accuracy",
    "clearly_in_region",
    "describe",
    "find_object",
    "human_answers",
    "load_scenes",
    "make_questions",
    "make_scene",
    "near_region",
    "object_centre",
    "object_mask",
    "object_phrases",
    "parse_description",
    "parse_holdout",
    "position_name",
    "qa_rows",
    "region_of",
    "relation_holds",
    "render",
    "score_description",
    "world_mismatch",
    "world_params",
    "write_world",
]
