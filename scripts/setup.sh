#!/usr/bin/env bash
# Set-up of a clone (main.sh and test.sh run it; it is quick when nothing changed): a virtual
# environment in .venv with PyTorch, minigpt-taps installed editable with its test extras, and GPT-2's
# tokenizer vocabulary, checked (`minigpt setup`). What was installed is recorded in $STAMP; while
# pyproject.toml, this script, the torch choice and the installed torch are unchanged, pip is not run.
#
#   MINIGPT_TORCH=cpu   (default) the CPU build: on Linux torch==$TORCH_VERSION+cpu from PyTorch's CPU index
#                       (about 200 MB); elsewhere PyPI's torch (CPU on macOS and Windows)
#   MINIGPT_TORCH=cuda  PyPI's default build: on Linux x86_64 the CUDA one (about 2.7 GB with its nvidia wheels)
#   MINIGPT_TORCH=keep  leave the torch already in .venv as it is (a build you installed yourself)
#   TORCH_VERSION       the torch release (default 2.13.0);  PYTHON  the interpreter for .venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
MINIGPT_TORCH=${MINIGPT_TORCH:-cpu}
CPU_INDEX=https://download.pytorch.org/whl/cpu
STAMP=.venv/minigpt-setup.stamp
# pip, quiet; less the notes of a pip configuration whose local index lacks a package (they are not problems)
pip_install() {
    .venv/bin/python -m pip -q --disable-pip-version-check install "$@" 2>&1 |
        { grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory" || true; }
}

installed_torch() { .venv/bin/python -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || echo none; }
# What this set-up installs, in one line: if the stamp holds it, everything below is already done.
wanted() { echo "$(cat pyproject.toml scripts/setup.sh | cksum | tr ' ' -) torch=$MINIGPT_TORCH:$TORCH_VERSION installed=$(installed_torch)"; }

case $MINIGPT_TORCH in cpu|cuda|keep) ;;
    *) echo "error: MINIGPT_TORCH=$MINIGPT_TORCH: use cpu (the default), cuda or keep" >&2; exit 2 ;;
esac
if [ -x .venv/bin/python ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(wanted)" ]; then
    echo "set-up: nothing changed since the last one ($(cat "$STAMP")); delete $STAMP to redo it"
    exec .venv/bin/python -m minigpt setup  # a second: says where the checked vocabulary is, or fetches it again
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    { echo "error: .venv has Python $(.venv/bin/python -V); minigpt needs 3.11 or later: delete .venv and rerun with PYTHON=python3.11 (or later)" >&2; exit 2; }
pip_install --upgrade pip

# torch first, pinned to one build: an unpinned torch on Linux would pull the CUDA build (gigabytes).
extra=()
case $MINIGPT_TORCH in
    cpu) spec="torch==$TORCH_VERSION"
         if [ "$(uname -s)" = Linux ]; then
             spec="torch==$TORCH_VERSION+cpu"  # on PyTorch's CPU index only (PyPI holds no +cpu builds)
             # Named only if it answers: pip retries an index it cannot reach five times for every package.
             if .venv/bin/python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=20)' \
                    "$CPU_INDEX/torch/" 2>/dev/null; then
                 extra=(--extra-index-url "$CPU_INDEX")
             else
                 echo "note: $CPU_INDEX cannot be reached; $spec must then come from pip's own configuration (a mirror, find-links)"
             fi
         fi ;;
    cuda) spec="torch==$TORCH_VERSION" ;;
    keep) spec="" ;;
esac
if [ -n "$spec" ] && ! pip_install ${extra[@]+"${extra[@]}"} "$spec"; then
    echo "error: pip could not install $spec. Ways out: MINIGPT_TORCH=cuda (PyPI's torch), or install a torch" \
         "into .venv yourself and rerun with MINIGPT_TORCH=keep; TORCH_VERSION=... picks another release" >&2
    exit 1
fi
# This clone was installed as "minigpt" before it took the name minigpt-taps: two copies of its metadata
# would list every plug-in command twice.
if .venv/bin/python -c 'import importlib.metadata as m; m.version("minigpt")' 2>/dev/null; then
    .venv/bin/python -m pip -q uninstall -y minigpt
fi
pip_install -e ".[dev]"
.venv/bin/python -m minigpt setup
wanted > "$STAMP"
echo "set-up done: $(cat "$STAMP")"
