# Sourced by the benchmarks/issue*_gpu.sh scripts (not run on its own): from the repository root, with DIR set to
# the output folder (DRY=1: a CPU dry run, no wheels and no device query), it installs the carried wheels of .whl/
# (if any) into /tmp/site, puts the project on
# PYTHONPATH, records the versions and the device in $DIR/env.txt, points Triton's cache at $TRITON_CACHE_DIR (seeded
# from a carried .autotune.tar.gz) and defines `step`, `save_autotune` and `pack_results`; $DIR/status.txt starts empty.
mkdir -p "$DIR"
export PYTHONPATH="$PWD"
if [ "${DRY:-0}" = 1 ]; then  # a CPU dry run of a script's commands (gloo): no wheels, no device to name
    python3 -c 'import torch; print("torch", torch.__version__, "CPU dry run (gloo)")' | tee "$DIR/env.txt"
else
    if compgen -G ".whl/*.whl" >/dev/null; then  # fla, mamba_ssm's Triton kernels & co. (benchmarks/wheels.py builds them)
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && export PYTHONPATH="/tmp/site:$PWD"
    fi
    python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuDNN",
          torch.backends.cudnn.version(), torch.cuda.get_device_name())' | tee "$DIR/env.txt"
fi

# Triton's autotuning results (fla autotunes for minutes on its first call; its kernels cache their timings on disk):
# a carried .autotune.tar.gz (an earlier call's $DIR/autotune.tar.gz, copied to the repository root) seeds this call's
# Triton cache, and `save_autotune` (the scripts' last step) packs this call's *.autotune.json files into
# $DIR/autotune.tar.gz (one file: the device hands back only so many).
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton-cache}"
mkdir -p "$TRITON_CACHE_DIR"
if [ -f .autotune.tar.gz ]; then
    tar xzf .autotune.tar.gz -C "$TRITON_CACHE_DIR"
fi

save_autotune() {
    local dest n
    dest="$(cd "$DIR" && pwd)/autotune.tar.gz"
    n=$(cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tee /tmp/autotune.list | wc -l)
    (cd "$TRITON_CACHE_DIR" && tar czf "$dest" -T /tmp/autotune.list)
    echo "autotune: $n cached tunings in $dest"
}

pack_results() {  # the device hands back at most 8 files: everything else in $DIR (logs, JSON rows, tables, profile/,
    # memory/) goes into $DIR/results.tar.gz beside env.txt, status.txt and autotune.tar.gz (unpack it where it lands)
    (cd "$DIR" && find . -mindepth 1 -maxdepth 1 ! -name results.tar.gz ! -name autotune.tar.gz ! -name env.txt \
        ! -name status.txt -printf '%P\n' >/tmp/results.list && tar czf results.tar.gz -T /tmp/results.list \
        && xargs -d '\n' rm -rf </tmp/results.list)
    echo "results: $(wc -l </tmp/results.list) entries in $DIR/results.tar.gz"
}

step() {  # step NAME SECONDS COMMAND...: run with a time limit (at most $STEP_CAP s where set), log to
    # $DIR/NAME.log, report its status
    local name=$1 limit=$2
    shift 2
    if [ -n "${STEP_CAP:-}" ] && [ "$limit" -gt "$STEP_CAP" ]; then
        limit=$STEP_CAP
    fi
    echo "== $name: $*"
    timeout "$limit" "$@" >"$DIR/$name.log" 2>&1
    local rc=$?
    tail -n 30 "$DIR/$name.log"
    echo "== $name: exit $rc"
    echo "$name $rc" >>"$DIR/status.txt"
}

: >"$DIR/status.txt"
