#!/usr/bin/env bash
# Downloads the training data stack's wheels into .whl/ at the repository root, for a GPU machine that has no network
# (experiments/gpu_checks.sh, step deps, installs them there when an import fails). Needs the network: run it by hand
# on a machine that has it, never in CI.
#   bash experiments/gpu_wheels.sh            # -> .whl/*.whl (~11 MB) and .whl/optional/protobuf-*.whl
#
# Wheels for CPython 3.12 on manylinux x86_64 (the device image's Python), whatever Python runs pip here; the versions
# pinned in requirements.txt where it pins them, else the ones the project's environment resolved. promise 2.3 is an
# sdist only on PyPI: built here (pure Python) with `pip wheel --no-deps`. Every wheel comes without its dependencies
# (--no-deps): the list below is the closure the device image lacks (jax, numpy, etils, absl, optax, orbax,
# tokenizers are expected there; gpu_checks.sh's deps step import-checks them and names what is missing).
# protobuf goes to .whl/optional/: gpu_checks.sh installs it only where the device's protobuf is older than grain
# needs (5.28.3), so that it does not shadow a newer one.
#
# Carrying .whl to the device: the device tool copies the working tree's tracked and untracked-but-not-ignored files;
# .whl must be git-ignored (11 MB of binaries are no part of the repository) and named in the run's `carry` list:
#   run(command="bash experiments/gpu_checks.sh", carry=[".whl"], timeout_s=600)
# Ignore it with the line `/.whl/` in .gitignore (or in .git/info/exclude for one checkout only).
# On the device gpu_checks.sh runs `pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl` and puts
# /tmp/site on PYTHONPATH, only when an import of the data stack fails.
set -euo pipefail
cd "$(dirname "$0")/.."

PIP=${PIP:-pip}
if ! $PIP --version > /dev/null 2>&1; then
    if [ -x .venv/bin/pip ]; then PIP=.venv/bin/pip; else PIP="python3 -m pip"; fi
fi
DEST=.whl
mkdir -p "$DEST/optional"

# name==version: requirements.txt's pins (ml_collections, tensorflow-datasets, array_record, grain, tensorboardX) and
# the versions the project's environment resolved for their dependencies
WHEELS=(
    ml_collections==1.1.0
    tensorflow-datasets==4.9.10
    array_record==0.8.6
    grain==0.2.18
    dm-tree==0.1.10
    immutabledict==4.3.1
    simple-parsing==0.1.9
    docstring_parser==0.18.0
    tensorflow-metadata==1.21.0
    googleapis-common-protos==1.76.0
    termcolor==3.3.0
    toml==0.10.2
    portpicker==1.6.0
    tensorboardX==2.6.5
)
# the same pins from requirements.txt where it lists the package (it wins over the list above)
for i in "${!WHEELS[@]}"; do
    name=${WHEELS[$i]%%==*}
    pin=$(grep -iE "^${name//[-_]/[-_]}==" requirements.txt | head -n 1 || true)
    [ -n "$pin" ] && WHEELS[$i]=$pin
done

TARGET=(--python-version 3.12 --implementation cp --abi cp312 --platform manylinux2014_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --only-binary=:all: --no-deps)
echo "gpu_wheels: ${#WHEELS[@]} wheels for cp312 manylinux x86_64 -> $DEST/"
$PIP download -q -d "$DEST" "${TARGET[@]}" "${WHEELS[@]}"
# promise: sdist only on PyPI; a pure-Python wheel (py3-none-any) built here installs on any Python 3
$PIP wheel -q --no-deps -w "$DEST" promise==2.3
# protobuf >= 5.28.3 (grain's floor), installed on the device only where its own is older
$PIP download -q -d "$DEST/optional" "${TARGET[@]}" "protobuf>=5.28.3,<8"

ls -l "$DEST" "$DEST/optional"
du -sh "$DEST"
missing=0
for spec in "${WHEELS[@]}" promise==2.3; do
    name=${spec%%==*}
    ver=${spec#*==}
    # wheel file names use underscores for - and . in the project name (PEP 427)
    pat=$(echo "$name" | tr '.-' '__')
    ls "$DEST" | grep -qiE "^${pat}-${ver}-.*\.whl$" || { echo "gpu_wheels: no wheel for $spec in $DEST"; missing=1; }
done
exit $missing
