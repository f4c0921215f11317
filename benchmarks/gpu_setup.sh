#!/usr/bin/env bash
# Install porter on a GPU machine (no network there): wheels/ may hold a libcst wheel for its Python;
# no build isolation (it would fetch setuptools). Sourced by the gpu_*.sh scripts.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
if compgen -G "wheels/*.whl" > /dev/null; then python3 -m pip install -q --no-deps wheels/*.whl 2>&1 | grep -v -i warning; fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
