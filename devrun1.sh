python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 VISATTN_GOLDEN_DIR=$PWD/.golden
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
T="1x8x8 1x4x8 1x2x8 1x4x16 1x8x16"
timeout 250 python3 tools/tune_na.py --shapes nat-t-s1 dinat-t-s1-d8 --tiles $T --rows 1 2 4 --warps 2 4 2>&1 | tee $OUT/tune1.txt
timeout 150 python3 tools/tune_na.py --shapes nat-t-s3 --tiles $T --rows 1 2 4 --warps 2 4 2>&1 | tee $OUT/tune2.txt
timeout 150 python3 tools/tune_na.py --shapes nat-t-s1 --no-rpb --tiles $T --rows 1 2 4 --warps 2 4 2>&1 | tee $OUT/tune3.txt
