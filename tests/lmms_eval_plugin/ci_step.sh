#!/usr/bin/env bash
# The lmms-eval plugin's CI step (called by .ci/run after the main install): a venv that sees the
# main environment (torch, transformers, peft, accelerate and the adsc_ext build, with its
# `lmms_eval.models` entry point) through a .pth file and adds lmms-eval 0.7.3 and its few runtime
# requirements (requirements.txt) without touching the main environment, then tests/lmms_eval_plugin;
# then TRL's SFTTrainer test (tests/test_train_trainer.py), which needs this venv's datasets.
#
# Why its own venv: lmms-eval 0.7.3's declared requirements (wandb==0.25.0, torchvision, opencv,
# sentence-transformers, yt-dlp, ...) serve models and tasks we never run; installed into the main
# environment they would pull a torchvision (and with it a torch) other than the one adsc_ext was
# built against, and a long list of packages the main suite never imports.
# So lmms-eval goes in --no-deps and requirements.txt lists what it imports on our path.
#
# Environment: ADSC_MAIN_PYTHON (the interpreter whose environment has adsc_ext installed; default
# python3), ADSC_LMMS_VENV (default .venv-lmms).
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
step() { echo "[lmms-eval step, $(( $(date +%s) - start )) s] $*"; }
main_py=${ADSC_MAIN_PYTHON:-python3}
venv=$(realpath -m "${ADSC_LMMS_VENV:-.venv-lmms}")

main_site=$("$main_py" -c "import adsc_ext, sysconfig; print(sysconfig.get_paths()['purelib'])")
base_py=$("$main_py" -c "import sys; print(getattr(sys, '_base_executable', sys.executable))")
[ -x "$venv/bin/python" ] || "$base_py" -m venv "$venv"
py="$venv/bin/python"
venv_site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# addsitedir (not a plain path line) so the main environment's own .pth files (an editable
# adsc_ext) are processed too.
echo "import site; site.addsitedir('$main_site')" > "$venv_site/adsc-main-environment.pth"

step "lmms-eval 0.7.3 (no deps) + its runtime requirements"
"$py" -m pip install -q --disable-pip-version-check --no-deps lmms-eval==0.7.3
"$py" -m pip install -q --disable-pip-version-check -r tests/lmms_eval_plugin/requirements.txt
"$py" -c "import adsc_ext.integrations.lmms_eval, lmms_eval.evaluator"

step "tests/lmms_eval_plugin"
"$py" -m pytest -q -p no:cacheprovider tests/lmms_eval_plugin

# TRL's SFTTrainer (what LLaVA fine-tuners use) on adsc_ext.train's dataset and collator: it needs
# datasets, which only this venv has; trl 1.16.0 without its dependencies (all of them are here).
step "trl 1.16.0 (no deps): tests/test_train_trainer.py"
"$py" -m pip install -q --disable-pip-version-check --no-deps trl==1.16.0
"$py" -m pytest -q -p no:cacheprovider tests/test_train_trainer.py
step "done"
