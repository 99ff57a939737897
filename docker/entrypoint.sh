#!/bin/sh
# Entrypoint of the imgembed image: runs the Snakemake workflow in /workspace.
#
# Every argument goes to snakemake unchanged. `--cores all` is added unless the
# arguments already choose the parallelism (--cores/-c or --jobs/-j, in any
# spelling: `--cores 4`, `--cores=4`, `-c4`, `-c 4`, `-j 2`, `--jobs=2`), so
#   docker run IMAGE                 ->  snakemake --cores all
#   docker run IMAGE -n train        ->  snakemake --cores all -n train
#   docker run IMAGE --cores 2 all   ->  snakemake --cores 2 all
# Snakemake itself refuses to run a workflow without --cores (or --jobs), so a
# plain CMD ["--cores", "all"] that vanished whenever arguments were given would
# turn `docker run IMAGE train` into an error. IMGEMBED_CORES=N changes the
# default ("all" = every CPU snakemake sees); IMGEMBED_CORES= (empty) adds
# nothing, e.g. to let a --profile decide.
# For a shell instead: docker run -it --entrypoint bash IMAGE
#
# Two first arguments run imgembed itself instead of the workflow:
#   docker run IMAGE doctor [--configfile ...]   ->  imgembed doctor (versions, GPUs, precision)
#   docker run IMAGE imgembed ARGS               ->  imgembed ARGS, e.g. `imgembed --version`
#
# Before snakemake starts, every work folder in /workspace (mounted from the host
# or not) must be writable by the container's user: otherwise it stops at once
# with one line naming the folder and the fix, instead of a traceback from deep
# inside a rule (a folder the Docker daemon created for a missing bind mount is
# owned by root; one owned by another host user is not writable by this uid).
set -eu

# Under `docker run --user UID:GID` with a uid the image has no passwd entry
# for, give programs a user name (snakemake's log header calls
# getpass.getuser(), which fails without one) and a writable HOME.
if ! id -un > /dev/null 2>&1; then
    export USER="${USER:-imgembed}" LOGNAME="${LOGNAME:-imgembed}"
fi
if [ ! -w "${HOME:-/}" ]; then
    export HOME=/tmp
fi

case "${1-}" in
    doctor) exec python -m imgembed "$@" ;;
    imgembed) shift; exec python -m imgembed "$@" ;;
esac

for folder in data models embeddings reports logs .snakemake; do
    if [ -e "$folder" ] && { [ ! -d "$folder" ] || [ ! -w "$folder" ] || [ ! -x "$folder" ]; }; then
        echo "imgembed: $PWD/$folder is not writable by uid $(id -u) (gid $(id -g)): create the host folder as yourself first (mkdir -p data reports models embeddings logs) and run docker with --user \"\$(id -u):\$(id -g)\"" >&2
        exit 1
    fi
done

has_cores=0
for arg in "$@"; do
    case "$arg" in
        --) break ;;
        --cores | --cores=* | --jobs | --jobs=* | -c | -c[0-9a]* | -j | -j[0-9a]*)
            has_cores=1
            break
            ;;
    esac
done

if [ "$has_cores" -eq 1 ] || [ -z "${IMGEMBED_CORES-all}" ]; then
    exec snakemake "$@"
fi
# Put first, so that a trailing `--` or an option taking several values
# (--config, --configfile) cannot swallow it.
exec snakemake --cores "${IMGEMBED_CORES:-all}" "$@"
