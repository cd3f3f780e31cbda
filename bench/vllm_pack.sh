#!/usr/bin/env bash
# vLLM for a GPU machine without network, in parts that fit the device tool's 64 MiB a call:
#   bash bench/vllm_pack.sh CHECKPOINT WORLD      # writes .vx/a, .vx/b, .vx/c (add /.vx/ to .git/info/exclude)
# then three device calls, in one message (they run one after another on the same machine; see the printed
# commands; the last, with timeout_s 600: vLLM gets 150 s to come up compiled, then 150 s eager): part a
# unpacks vLLM's kernels, part c its flash-attention kernels and the checkpoint, part b vLLM's Python code and
# the packages neither the machine's image nor vLLM's kernels bring, then runs bench/vllm_check.sh. Made for
# the lent H200 image (Python 3.12, torch 2.11.0+cu130, transformers 5.17):
# vLLM 0.26.0 is the release built for that torch, and its wheel is cut to what serving this model needs
# (FA2, MoE, FlashMLA, QuTLASS, the Rust front end and third_party's headers and binaries left out;
# attention through TRITON_ATTN, sampling without FlashInfer). The versions are those this was run with
# (2026-12-04); gpt2mm's own process gets the transformers and huggingface_hub it is tested with.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: bash bench/vllm_pack.sh CHECKPOINT WORLD" >&2; exit 2; }
ckpt=$1 world=$2
cd "$(dirname "$0")/.."
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
download() {  # wheels for the device's Python (3.12, x86-64), without their dependencies
    PIP_CONSTRAINT= python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$@"
}
rm -rf .vx && mkdir -p .vx/a .vx/b/vdeps .vx/b/gdeps .vx/c "$tmp/vllm"
download "$tmp" vllm==0.26.0
(cd "$tmp/vllm" && python3 -m zipfile -e "$tmp"/vllm-0.26.0-*.whl . \
    && rm -f vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/_moe_C_stable_libtorch.abi3.so vllm/vllm-rs \
        vllm/_flashmla_C.abi3.so vllm/_flashmla_extension_C.abi3.so vllm/_qutlass_C.abi3.so \
    && find vllm/third_party -type f ! -name '*.py' -delete \
    && zip -q -9 "$OLDPWD/.vx/a/vllm_C.zip" vllm/_C_stable_libtorch.abi3.so \
    && zip -q -1 "$OLDPWD/.vx/c/fa3.zip" vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so \
    && zip -q -9 -r "$OLDPWD/.vx/b/vllm_py.zip" vllm vllm-0.26.0.dist-info \
        -x vllm/_C_stable_libtorch.abi3.so vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so)
# what `import vllm` and its OpenAI server import that the image lacks (found by importing every module of
# vllm.entrypoints beside the image's packages)
download .vx/b/vdeps annotated-types==0.8.0 apache-tvm-ffi==0.1.15.post2 cachetools==8.0.2 cbor2==6.3.0 \
    fastapi==0.136.3 httpx2==2.16.2 importlib-metadata==10.2.0 jmespath==1.1.0 llguidance==1.9.1 \
    model-hosting-container-standards==0.1.16 msgspec==0.23.0 openai==3.60.0 openai-harmony==0.0.8 \
    opentelemetry-api==1.45.2 partial-json-parser==0.2.1.1.post7 prometheus-fastapi-instrumentator==8.1.0 \
    pybase64==1.5.1 pydantic==2.14.4 pydantic-core==2.50.5 pyzmq==27.3.0 sniffio==1.3.1 starlette==1.10.0 \
    typing-inspection==0.4.5 tzdata==2026.6 uvicorn==0.55.0 watchfiles==1.3.0 xgrammar==0.2.9
download .vx/b/gdeps transformers==5.25.0 huggingface_hub==2.4.0 httpcore2==2.16.2 truststore==0.10.5
cp -r "$ckpt" .vx/c/ckpt && rm -f .vx/c/ckpt/trainer_state.pt
mkdir -p .vx/a/world/images/test && .venv/bin/python - "$world" .vx/a/world <<'EOF'
import json, shutil, sys
from pathlib import Path
from gpt2mm.data.vqa import coco_image_name
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
questions = json.loads((src / "test_questions.json").read_text())
questions["questions"] = questions["questions"][:1000]
keep = {q["question_id"] for q in questions["questions"]}
annotations = json.loads((src / "test_annotations.json").read_text())
annotations["annotations"] = [a for a in annotations["annotations"] if a["question_id"] in keep]
(dst / "test_questions.json").write_text(json.dumps(questions))
(dst / "test_annotations.json").write_text(json.dumps(annotations))
for image_id in {q["image_id"] for q in questions["questions"]}:
    name = coco_image_name(image_id, "test2014", ".png")
    shutil.copy(src / "images" / "test" / name, dst / "images" / "test" / name)
EOF
du -sh .vx/a .vx/b .vx/c
x='python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])"'
cat <<EOF
device calls, in this order (carry, then command):
1. [".vx/a"]  mkdir -p /tmp/vsite && $x .vx/a/vllm_C.zip /tmp/vsite && cp -r .vx/a/world /tmp/vworld
2. [".vx/c"]  $x .vx/c/fa3.zip /tmp/vsite && cp -r .vx/c/ckpt /tmp/vckpt
3. [".vx/b"]  $x .vx/b/vllm_py.zip /tmp/vsite && P="python3 -m pip install -q --no-index --no-deps --no-compile --target" && \$P /tmp/vdeps .vx/b/vdeps/*.whl && \$P /tmp/gsite .vx/b/gdeps/*.whl && VLLM_USE_FLASHINFER_SAMPLER=0 READY_S=150 VLLM_PYTHONPATH=/tmp/vsite:/tmp/vdeps GPT2MM_PYTHONPATH=\$PWD/src:/tmp/gsite:/tmp/vdeps LOGDIR=\$OUT bash bench/vllm_check.sh /tmp/vckpt /tmp/vworld
EOF
