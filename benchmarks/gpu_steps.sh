# Sourced by the benchmarks/issue*_gpu.sh scripts (not run on its own): from the repository root, with DIR set to
# the output folder, it installs the carried wheels of .whl/ (if any) into /tmp/site, puts the project on
# PYTHONPATH, records the versions and the device in $DIR/env.txt and defines `step`; $DIR/status.txt starts empty.
mkdir -p "$DIR"
export PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" >/dev/null; then  # zarr, fla & co. (see .whl/INSTALL.txt)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PWD"
fi
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuDNN",
      torch.backends.cudnn.version(), torch.cuda.get_device_name())' | tee "$DIR/env.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $DIR/NAME.log, report its status
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" >"$DIR/$name.log" 2>&1
    local rc=$?
    tail -n 30 "$DIR/$name.log"
    echo "== $name: exit $rc"
    echo "$name $rc" >>"$DIR/status.txt"
}

: >"$DIR/status.txt"
