set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 VISATTN_GOLDEN_DIR=$PWD/.golden
nvidia-smi --query-gpu=name --format=csv,noheader; nproc; lscpu | grep "Model name"
python tools/profile_step.py --models visattn_dinat_t@triton --host --python 60 --rows 60 > $OUT/profile_dinat.txt 2>&1 || true
tail -5 $OUT/profile_dinat.txt
