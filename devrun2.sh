python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 VISATTN_GOLDEN_DIR=$PWD/.golden
timeout 200 python3 tools/tune_na.py --shapes nat-t-s1 dinat-t-s1-d8 nat-t-s3 dinat-l384-s1 k13-128-d64 hat-window16 2>&1 | tee $OUT/tune.txt
timeout 330 python3 -m visattn.cli bench na --shapes nat-t-s1 dinat-t-s1-d8 nat-t-s3 --competitors triton "triton no-rpb" flex "flex no-rpb" "sdpa dense" --out $OUT 2>&1 | grep -v Warning | tail -30
